"""optuna-dashboard over a study's own storage, served until Ctrl-C (or SIGTERM)."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from optuna.storages import BaseStorage
from optuna_dashboard import wsgi

from compsearch.search.errors import UserError

log = logging.getLogger(__name__)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # a line per request would drown the address
        log.debug(*args)


def serve_dashboard(storage: BaseStorage, study_name: str, host: str, port: int,
                    on_ready: Callable[[str], None]) -> None:
    """Serve until interrupted (then raise KeyboardInterrupt); `on_ready` gets the study's address once
    the server listens (`port` 0: a free port)."""
    try:
        server = make_server(host, port, wsgi(storage), handler_class=_QuietHandler)
    except OSError as err:
        raise UserError(f"the dashboard cannot listen on {host}:{port} ({err.strerror}); pass another --port") from None
    stopped = []

    def stop(signum, _frame) -> None:
        # A KeyboardInterrupt raised while a request is being served would be swallowed by wsgiref as a
        # failed request: stop the server loop from another thread instead.
        stopped.append(signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    with server:
        study_id = storage.get_study_id_from_name(study_name)  # how the dashboard addresses the study
        on_ready(f"http://{host}:{server.server_port}/dashboard/studies/{study_id}")
        server.serve_forever()
    if stopped:
        raise KeyboardInterrupt
