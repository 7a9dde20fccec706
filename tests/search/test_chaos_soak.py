"""A chaos soak: a 100-trial study with 2 workers, during which a random worker is SIGKILLed every few
trials and the driver twice (each time followed by `resume`). At the end: exactly the asked number of
completed trials, the Parquet table equal to the storage row for row, no trial lost or run twice, and
no process of the run left behind (checked by PID). The counts are printed (`-s` shows them)."""
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from optuna.trial import TrialState

from compsearch.search.study import default_storage_url, done_count, load_study, open_storage
from tests.search.helpers import cli_args, ray_actor_processes

pytestmark = pytest.mark.slow
TARGET = 100
WORKER_KILL_EVERY = 6  # completed trials between two worker kills
DRIVER_KILLS_AT = (30, 65)  # completed trials at which the driver is killed and the study resumed
ORPHAN_GRACE_S = 120  # Ray's agents outlive a killed raylet by about a minute (their GCS reconnect timeout)


def _cli(log: Path, *args: str) -> subprocess.Popen:
    """The CLI in its own process, its output in `log` (a pipe nobody reads could fill and block it)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "compsearch.search.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, text=True)


class Run:
    """The study's current driver, every process the run has started (pid -> start time), the kills."""

    def __init__(self, driver: subprocess.Popen):
        self.driver, self.seen, self.kills = driver, {}, {"worker": 0, "driver": 0}

    def tree(self) -> list[psutil.Process]:
        try:
            processes = [psutil.Process(self.driver.pid), *psutil.Process(self.driver.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for process in processes:
            try:
                self.seen.setdefault(process.pid, process.create_time())
            except psutil.NoSuchProcess:
                continue
        return processes

    def kill_a_worker(self, rng: random.Random) -> bool:
        self.tree()
        try:
            workers = ray_actor_processes(psutil.Process(self.driver.pid), "ray::_RayTrialEvaluator")
        except psutil.NoSuchProcess:
            return False
        if not workers:
            return False
        rng.choice(workers).send_signal(signal.SIGKILL)
        self.kills["worker"] += 1
        return True

    def kill_the_driver(self, then: subprocess.Popen) -> None:
        """SIGKILL the driver alone (a crash: Ray's processes are left to end by themselves), start `then`."""
        self.tree()
        self.driver.send_signal(signal.SIGKILL)
        self.driver.wait(timeout=60)
        self.kills["driver"] += 1
        self.driver = then

    def left_behind(self) -> list[str]:
        alive = []
        for pid, started in self.seen.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {process.name()}")
            except psutil.NoSuchProcess:
                continue
        return alive


def test_a_study_survives_killed_workers_and_drivers(tiny_model_dir, tmp_path):
    rng = random.Random(0)
    results = tmp_path / "results"
    argv = cli_args(tiny_model_dir, results, "soak", TARGET, "--workers", "2", "--space", "quant")
    resume = ["resume", "--study", "soak", "--results-dir", str(results), "--trials", str(TARGET), "--workers", "2"]
    storage = open_storage(default_storage_url(results, "soak"))
    started = time.monotonic()
    run = Run(_cli(tmp_path / "driver-0.log", *argv))
    next_worker_kill, driver_kills = WORKER_KILL_EVERY, list(DRIVER_KILLS_AT)
    while run.driver.poll() is None:
        assert time.monotonic() - started < 900, "the soak did not finish in 15 minutes"
        time.sleep(0.2)
        run.tree()
        try:
            done = done_count(load_study("soak", storage)[0])
        except Exception:  # not created yet
            continue
        if driver_kills and done >= driver_kills[0]:
            driver_kills.pop(0)
            run.kill_the_driver(then=_cli(tmp_path / f"driver-{run.kills['driver'] + 1}.log", *resume))
        elif done >= next_worker_kill and run.kill_a_worker(rng):
            next_worker_kill = done + WORKER_KILL_EVERY
    assert run.driver.wait(timeout=60) == 0, (tmp_path / f"driver-{run.kills['driver']}.log").read_text()[-3000:]
    wall_s = time.monotonic() - started

    study, _ = load_study("soak", storage)
    trials = study.get_trials()
    table = pd.read_parquet(results / "soak" / "trials.parquet").sort_values("trial")  # (ranked order on disk)
    interrupted = [t for t in trials if "interrupted" in t.user_attrs]
    by_worker = [t for t in interrupted if t.user_attrs["interrupted"].startswith("worker died")]
    retries: dict[int, list] = {}
    for trial in trials:
        if "retry_of" in trial.user_attrs:
            retries.setdefault(trial.user_attrs["retry_of"], []).append(trial)
    lost = [t.number for t in interrupted if t.params and len(retries.get(t.number, ())) != 1]
    doubled = [number for number, again in retries.items() if len(again) > 1]
    deadline = time.monotonic() + ORPHAN_GRACE_S
    while run.left_behind() and time.monotonic() < deadline:
        time.sleep(2)
    orphans = run.left_behind()
    print(f"\nchaos soak: {TARGET} trials asked, {done_count(study)} done ({len(trials)} stored); killed "
          f"{run.kills['worker']} workers and {run.kills['driver']} drivers; {len(by_worker)} trials interrupted by "
          f"a worker kill, {len(interrupted) - len(by_worker)} by a driver kill, all re-run; lost {len(lost)}, "
          f"run twice {len(doubled)}; {len(run.seen)} processes seen, {len(orphans)} left behind; {wall_s:.0f}s")

    assert run.kills["driver"] == len(DRIVER_KILLS_AT) and run.kills["worker"] >= 8
    assert done_count(study) == TARGET
    assert sum(t.state == TrialState.COMPLETE for t in trials) == TARGET
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert by_worker, "no worker kill landed on a trial"
    assert not lost and not doubled
    # the Parquet table is the storage, row for row
    assert list(table["trial"]) == [t.number for t in trials]
    assert list(table["state"]) == [t.state.name for t in trials]
    complete = table[table["state"] == "COMPLETE"].set_index("trial")
    for trial in (t for t in trials if t.state == TrialState.COMPLETE):
        assert complete.loc[trial.number, "ppl"] == pytest.approx(trial.user_attrs["ppl"], rel=0, abs=0)
        assert complete.loc[trial.number, "memory_bytes"] == trial.user_attrs["memory_bytes"]
    assert not orphans, orphans
