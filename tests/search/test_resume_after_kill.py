"""A driver killed with SIGKILL mid-study: `resume` fails its stale trials, re-runs them, hits the exact total."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pandas as pd
import pytest
from optuna.trial import TrialState

from compsearch.search.study import done_count, load_study, open_storage, default_storage_url
from tests.search.helpers import cli_args

pytestmark = pytest.mark.slow
TARGET = 12


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the driver, then whatever it started (its local Ray), each by PID."""
    children = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    for child in children:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)


def _wait_for_first_trial(driver: subprocess.Popen, results, study: str, timeout_s: float = 300) -> None:
    """Poll the study's storage until the driver has finished a trial (or stopped, or time ran out)."""
    storage = open_storage(default_storage_url(results, study))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.5)
        try:
            if done_count(load_study(study, storage)[0]) >= 1:
                return
        except Exception:  # the study is not created yet
            continue


def _start_driver(model_dir, results, study: str, trials: int, workers: int, **popen) -> subprocess.Popen:
    """`compsearch submit` in its own process (stderr joined to stdout unless `popen` says otherwise)."""
    popen = {"stderr": subprocess.STDOUT, **popen}
    return subprocess.Popen([sys.executable, "-m", "compsearch.search.cli",
                             *cli_args(model_dir, results, study, trials, "--workers", str(workers))],
                            stdout=subprocess.PIPE, text=True, **popen)


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compsearch.search.cli", *args], capture_output=True, text=True, timeout=600)


def test_resume_after_sigkill_reaches_exact_total(tiny_model_dir, tmp_path):
    results = tmp_path / "results"
    storage = open_storage(default_storage_url(results, "killed"))
    driver = _start_driver(tiny_model_dir, results, "killed", TARGET, workers=2)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.2)
            try:
                study, _ = load_study("killed", storage)
            except Exception:
                continue
            running = study.get_trials(states=(TrialState.RUNNING,))
            if done_count(study) >= 3 and running:
                break
        assert driver.poll() is None, driver.stdout.read()
    finally:
        _kill_tree(driver)

    study, _ = load_study("killed", storage)
    stale = [t.number for t in study.get_trials(states=(TrialState.RUNNING,))]
    done_before = done_count(study)
    assert stale and done_before < TARGET

    resumed = _run_cli(["resume", "--study", "killed", "--results-dir", str(results), "--trials", str(TARGET)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"re-queued interrupted trials {stale}" in resumed.stdout
    assert not resumed.stderr.strip(), resumed.stderr  # no library warnings (torch, torchao, Ray's token notice)

    study, _ = load_study("killed", storage)
    trials = study.get_trials()
    assert done_count(study) == TARGET
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if "interrupted" in t.user_attrs]
    assert sorted(t.number for t in interrupted) == stale
    retries = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    for number in stale:  # every interrupted trial ran again, keeping every parameter it had drawn
        if study.trials[number].params:  # (a kill mid-plan leaves a partial draw; the rest is drawn anew)
            assert retries[number].state == TrialState.COMPLETE
            assert retries[number].params.items() >= study.trials[number].params.items()
        else:  # stopped between ask and plan: nothing to repeat, a new trial took its place
            assert number not in retries

    table = pd.read_parquet(results / "killed" / "trials.parquet")
    assert sorted(table["trial"]) == [t.number for t in trials]  # one row per stored trial, none lost or doubled
    assert table["state"].eq("COMPLETE").sum() == TARGET


def test_second_driver_is_refused_while_one_runs(tiny_model_dir, tmp_path):
    results = tmp_path / "results"
    first = _start_driver(tiny_model_dir, results, "busy", 200, workers=1)
    try:
        _wait_for_first_trial(first, results, "busy")
        second = _run_cli(["resume", "--study", "busy", "--results-dir", str(results), "--trials", "300"])
        assert second.returncode == 2
        assert "already running" in second.stderr and f"pid {first.pid}" in second.stderr
    finally:
        _kill_tree(first)


def test_local_ray_listens_on_loopback_only(tiny_model_dir, tmp_path):
    results = tmp_path / "results"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    driver = _start_driver(tiny_model_dir, results, "loopback", 200, workers=1, env=env)  # the CLI keeps Ray on loopback
    try:
        _wait_for_first_trial(driver, results, "loopback")
        tree = {driver.pid} | {p.pid for p in psutil.Process(driver.pid).children(recursive=True)}
        listening = [c.laddr.ip for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in tree]
        assert listening, "the driver's Ray processes listen on no port?"
        assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in listening), listening
    finally:
        _kill_tree(driver)


def test_ctrl_c_stops_a_study_with_one_message_and_no_traceback(tiny_model_dir, tmp_path):
    results = tmp_path / "results"
    # far more trials than run in the second below (the tiny model's trials take a fraction of a second each,
    # so a study of TARGET could end before the interrupt)
    driver = _start_driver(tiny_model_dir, results, "stopped", 20 * TARGET, workers=2, stderr=subprocess.PIPE)
    try:
        _wait_for_first_trial(driver, results, "stopped")
        time.sleep(1.0)  # mid-trial: the driver waits on its workers and beats the storage
        assert driver.poll() is None, "the study ended before it could be interrupted"
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            _kill_tree(driver)
    assert driver.returncode == 130, err
    assert "interrupted; trials in flight were re-queued" in err
    assert "Traceback" not in err and "Error closing cursor" not in err, err
    study, _ = load_study("stopped", open_storage(default_storage_url(results, "stopped")))
    assert not study.get_trials(states=(TrialState.RUNNING,))  # re-queued, none left running
