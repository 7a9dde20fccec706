"""A study on a real PostgreSQL server (started here on 127.0.0.1): submit, resume, status, tables.

Skipped only where the PostgreSQL server binaries are not installed; `.ci/run` installs them.
"""
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from compsearch.search.commands import RunOptions, resume, status, submit
from compsearch.search.study import done_count, load_study, open_storage
from tests.search.helpers import tiny_spec

pytestmark = pytest.mark.slow


def _pg_binary(name: str) -> str | None:
    """`name` from PATH or from Debian's versioned folder (/usr/lib/postgresql/N/bin, not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` account the package creates."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@pytest.fixture(scope="module")
def postgres_url():
    initdb, postgres = _pg_binary("initdb"), _pg_binary("postgres")
    if not (initdb and postgres):
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="compsearch-pg-", dir="/tmp"))  # short: holds the socket too
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root needs the `postgres` account (Debian's postgresql package creates it)")
        os.chown(folder, account.pw_uid, account.pw_gid)
    data, port = folder / "data", _free_port()
    subprocess.run(_as_server_user([initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync",
                                    "--no-locale", "-E", "UTF8"]), check=True, capture_output=True, timeout=120)
    server = subprocess.Popen(_as_server_user([postgres, "-D", str(data), "-k", str(folder), "-h", "127.0.0.1",
                                               "-p", str(port), "-F", "-c", "max_connections=40"]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        _wait_ready(url, server)
        yield url
    finally:
        _stop(server, data)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_ready(url: str, server: subprocess.Popen) -> None:
    import psycopg

    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg.connect(url).close()
            return
        except psycopg.OperationalError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {server.stderr.read() if server.poll() is not None else 'timeout'}")
            time.sleep(0.3)


def _stop(server: subprocess.Popen, data: Path) -> None:
    """Fast shutdown of the postmaster we started (its PID is the first line of postmaster.pid)."""
    pid_file = data / "postmaster.pid"
    if pid_file.exists():
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=30)


def test_study_on_postgresql_submits_resumes_and_rebuilds_tables(ray_session, tiny_model_dir, tmp_path, postgres_url):
    import psycopg  # SQLAlchemy 2.1's driver for postgresql:// URLs

    spec = tiny_spec(tiny_model_dir, "pg", guided=False)
    options = RunOptions(results_dir=tmp_path, storage=postgres_url, workers=2)
    submit(spec, 5, options)
    table = resume("pg", 8, options)

    storage = open_storage(postgres_url)
    assert isinstance(storage, RDBStorage) and storage.get_heartbeat_interval()  # stale trials can be reaped
    study, _ = load_study("pg", storage)
    assert done_count(study) == 8 and not study.get_trials(states=(TrialState.RUNNING,))
    with psycopg.connect(postgres_url) as conn, conn.cursor() as cursor:  # the rows really live in PostgreSQL
        cursor.execute("SELECT count(*) FROM trials t JOIN studies s USING (study_id) WHERE s.study_name = 'pg'")
        assert cursor.fetchone()[0] == len(study.trials)
    on_disk = pd.read_parquet(tmp_path / "pg" / "trials.parquet")
    assert on_disk["trial"].is_unique and len(on_disk) == len(table) == len(study.trials)
    assert not (tmp_path / "pg" / "study.db").exists()  # nothing fell back to sqlite
    info = status("pg", options)
    assert info["done"] == 8 and info["driver"] is None
