"""Two Ray nodes on this machine (`ray start --head` + `ray start --address`, loopback only), a study
submitted through the Jobs API, trials on both nodes; what was started is stopped by PID.

Ray's `ray start --address` refuses to join when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the setting that
keeps Ray on 127.0.0.1), and with it on, Ray rewrites 127.0.0.1 to the machine's outward address and
listens on every interface. So the second node runs Ray's own `ray start` code with that one
platform check lifted (`_JOIN_ON_LOOPBACK`): both nodes then live on 127.0.0.1 only.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from compsearch.search.study import default_storage_url, done_count, load_study, open_storage
from tests.search.helpers import cli_args

pytestmark = pytest.mark.slow
TARGET = 8
_JOIN_ON_LOOPBACK = (
    "import sys, types\n"
    "from ray._private import ray_constants\n"
    "import ray.scripts.scripts as scripts\n"
    "constants = {k: getattr(ray_constants, k) for k in dir(ray_constants) if not k.startswith('__')}\n"
    "scripts.ray_constants = types.SimpleNamespace(**{**constants, 'ENABLE_RAY_CLUSTER': True})\n"
    "sys.argv = ['ray', *sys.argv[1:]]\n"
    "scripts.main()\n"
)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _env() -> dict:
    bin_dir = str(Path(sys.executable).parent)  # the job's `python` is this environment's
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
            "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _node_args(temp_dir: Path, name: str) -> list[str]:
    agent, grpc, metrics, runtime_env = _free_ports(4)  # Ray's fixed defaults would clash with other instances
    return ["--node-ip-address=127.0.0.1", "--num-cpus=1", f"--resources={{\"{name}\": 1}}",
            f"--temp-dir={temp_dir}", "--object-store-memory=200000000", "--disable-usage-stats",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"]


def _ours(temp_dirs: list[Path]) -> list[psutil.Process]:
    """Every process of the two nodes: those naming our temp dirs, and their descendants."""
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        if process.pid != os.getpid() and any(str(d) in " ".join(process.info["cmdline"] or []) for d in temp_dirs):
            found[process.pid] = process
            try:
                found.update({child.pid: child for child in process.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
    return list(found.values())


@pytest.fixture(scope="module")
def two_nodes():
    """A head (resource node_a) and a second node (node_b) on 127.0.0.1; yields the Jobs API address."""
    temp_dirs = [Path(tempfile.mkdtemp(prefix="cs-ray-", dir="/tmp")) for _ in range(2)]  # short: sockets live there
    gcs_port, dashboard_port = _free_ports(2)
    ray_cli = str(Path(sys.executable).parent / "ray")
    try:
        subprocess.run([ray_cli, "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
                        f"--dashboard-port={dashboard_port}", *_node_args(temp_dirs[0], "node_a")],
                       env=_env(), check=True, capture_output=True, timeout=120)
        subprocess.run([sys.executable, "-c", _JOIN_ON_LOOPBACK, "start", f"--address=127.0.0.1:{gcs_port}",
                        *_node_args(temp_dirs[1], "node_b")], env=_env(), check=True, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dashboard_port}"
    finally:
        processes = _ours(temp_dirs)
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(processes, timeout=30)
        for folder in temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compsearch.search.cli", *args], capture_output=True, text=True,
                          timeout=300, env=_env())


def test_study_submitted_as_a_ray_job_runs_trials_on_both_nodes(two_nodes, tiny_model_dir, tmp_path):
    address, results = two_nodes, tmp_path / "results"
    args = cli_args(tiny_model_dir, results, "multi", TARGET, "--workers", "2", "--no-guided", "--address", address)
    sent = _cli(*args)
    assert sent.returncode == 0, sent.stderr
    assert "submitted Ray job compsearch-multi-" in sent.stdout
    job_id = sent.stdout.split("submitted Ray job ")[1].split()[0]

    again = _cli(*args)  # a second submit of the same study while its job is alive
    assert again.returncode == 2 and f"already has Ray job {job_id}" in again.stderr

    storage = open_storage(default_storage_url(results, "multi"))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        shown = _cli("status", "--address", address, "--study", "multi", "--results-dir", str(results))
        if f"ray job: {job_id} SUCCEEDED" in shown.stdout or " FAILED" in shown.stdout:
            break
        time.sleep(3)
    assert f"ray job: {job_id} SUCCEEDED" in shown.stdout, shown.stdout + shown.stderr
    assert f"study multi: {TARGET}/{TARGET} trials done" in shown.stdout
    assert done_count(load_study("multi", storage)[0]) == TARGET

    table = pd.read_parquet(results / "multi" / "trials.parquet")
    print("\n" + table[["trial", "state", "worker", "node_id", "compress_s", "evaluate_s"]].sort_values("trial")
          .to_string(index=False))
    assert table["trial"].is_unique and table["state"].eq("COMPLETE").sum() == TARGET
    assert table["node_id"].nunique() == 2  # both nodes ran trials

    logs = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "logs", "--address", address, job_id],
                          capture_output=True, text=True, timeout=60, env=_env())
    assert f"[{TARGET}/{TARGET}]" in logs.stdout  # the driver's progress, through Ray's own `ray job logs`
