"""A Ctrl-C that always stops a study.

Python raises KeyboardInterrupt wherever the signal lands; one that lands in a `__del__` or a weakref
callback (SQLAlchemy's connection pool runs them) is printed as "Exception ignored in ..." and lost, and
the study would run on. Inside `interrupts_remembered()` a SIGINT is also remembered, and the study's
waiting loops call `raise_if_interrupted()` between waits of at most `POLL_S`.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

POLL_S = 5.0  # the longest a loop waits before it looks again

_interrupted = threading.Event()


@contextmanager
def interrupts_remembered() -> Iterator[None]:
    """While active (in the main thread, where SIGINT raises KeyboardInterrupt), remember each SIGINT
    besides raising it. A SIGINT that is ignored or handled otherwise (a background job, an embedding
    application) is left as it is."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def on_interrupt(signum, frame):
        _interrupted.set()
        raise KeyboardInterrupt

    _interrupted.clear()
    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _interrupted.clear()


def raise_if_interrupted() -> None:
    """Raise the KeyboardInterrupt of a SIGINT that something swallowed."""
    if _interrupted.is_set():
        raise KeyboardInterrupt
