"""Faults that must not lose anything: a worker killed mid-trial, a trial that raises, a second submit.

One study runs in a thread of this process (on the session's Ray instance) with workers slow
enough to be caught mid-trial; the main thread kills a worker's process by PID and tries a
second `submit --force` while the driver is alive. The tests then read what the storage and
the Parquet tables hold.
"""
import json
import shutil
import threading
import time

import pandas as pd
import ray
import psutil
import pytest
import torch
from optuna.trial import TrialState

from compsearch.search.commands import RunOptions, submit
from compsearch.search.errors import UserError
from compsearch.search.job import prepare_job
from compsearch.search.runner import (WorkerResources, _RayTrialEvaluator, check_resources, run_study,
                                     start_workers)
from compsearch.search.study import create_study, default_storage_url, done_count, open_storage, study_exists
from tests.search.helpers import ray_actor_processes, tiny_spec

pytestmark = pytest.mark.slow
TARGET = 8


class SlowEvaluator(_RayTrialEvaluator):
    """A real worker whose trials take at least a second, so a kill lands mid-trial."""

    def evaluate(self, plan_json: str) -> dict:
        time.sleep(1.0)
        return super().evaluate(plan_json)


class SlowProfileEvaluator(_RayTrialEvaluator):
    """A real worker whose profile batches take at least half a second, so a kill lands mid-batch."""

    def profile_kl(self, plans: list[str], windows: int, seq_len: int) -> list[float]:
        time.sleep(0.5)
        return super().profile_kl(plans, windows, seq_len)

    def profile_error(self, plans: list[str], windows: int, seq_len: int) -> list[float | None]:
        time.sleep(0.5)
        return super().profile_error(plans, windows, seq_len)


class OutOfMemoryEvaluator(_RayTrialEvaluator):
    """A real worker that runs out of memory on every third trial it gets."""

    calls = 0

    def evaluate(self, plan_json: str) -> dict:
        self.calls += 1
        if self.calls % 3 == 0:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().evaluate(plan_json)


@pytest.fixture(scope="module")
def killed_run(ray_session, tiny_model_dir, tmp_path_factory):
    """Run a study in a thread; kill one worker mid-trial and try a second submit while it runs."""
    results = tmp_path_factory.mktemp("faults")
    spec = tiny_spec(tiny_model_dir, "faults", guided=False)
    ctx = prepare_job(spec)
    storage = open_storage(default_storage_url(results, spec.study))
    study = create_study(spec, storage, ctx.study_attrs())
    outcome: dict = {}

    def drive():
        try:
            outcome["trials"] = run_study(ctx, study, TARGET, 2, results, evaluator=SlowEvaluator)
        except BaseException as err:  # reported by the tests below
            outcome["error"] = err

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and "killed" not in outcome:
        busy = ray_actor_processes(psutil.Process(), "ray::SlowEvaluator.evaluate")
        if done_count(study) >= 2 and busy:
            outcome["killed"] = busy[0].pid
            busy[0].kill()
        time.sleep(0.05)
    try:
        submit(spec, TARGET, RunOptions(results_dir=results, workers=1), force=True)
        outcome["second_submit"] = "accepted"
    except UserError as err:
        outcome["second_submit"] = str(err)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the study did not finish"
    return outcome, study, results


def test_worker_killed_mid_trial_is_requeued_and_study_reaches_target(killed_run):
    outcome, study, results = killed_run
    assert "error" not in outcome, outcome.get("error")
    assert "killed" in outcome, "no worker was caught mid-trial"
    trials = study.get_trials()
    died = [t for t in trials if "worker died" in t.user_attrs.get("interrupted", "")]
    assert len(died) == 1 and died[0].state == TrialState.FAIL
    retry = [t for t in trials if t.user_attrs.get("retry_of") == died[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == died[0].params
    assert done_count(study) == TARGET
    table = pd.read_parquet(results / "faults" / "trials.parquet")
    assert table["trial"].is_unique and sorted(table["trial"]) == [t.number for t in trials]
    assert table["state"].eq("COMPLETE").sum() == TARGET
    assert not retry[0].user_attrs["worker"].endswith(f":{outcome['killed']}")  # re-run on a live worker
    later = table[table["started_at"] > died[0].datetime_start]
    assert not later["worker"].dropna().str.endswith(f":{outcome['killed']}").any()  # the dead one got no more


def test_second_submit_is_refused_while_the_driver_runs_even_with_force(killed_run):
    outcome, _, _ = killed_run
    assert "already running" in outcome["second_submit"], outcome["second_submit"]
    assert "--force" in outcome["second_submit"]


def test_trial_that_raises_is_failed_with_its_error_and_study_goes_on(ray_session, tiny_model_dir, tmp_path):
    spec = tiny_spec(tiny_model_dir, "oom", guided=False)
    ctx = prepare_job(spec)
    study = create_study(spec, open_storage(default_storage_url(tmp_path, spec.study)), ctx.study_attrs())
    table = run_study(ctx, study, TARGET, 2, tmp_path, evaluator=OutOfMemoryEvaluator)
    failed = table[table["state"] == "FAIL"]
    assert len(failed) >= 1
    assert failed["error"].str.contains("OutOfMemoryError: CUDA out of memory").all()
    assert failed["interrupted"].isna().all()  # its own fault: counted, not re-run
    assert done_count(study) == TARGET and len(table) == TARGET
    assert table["state"].eq("COMPLETE").sum() == TARGET - len(failed)


def test_workers_no_node_can_host_are_refused_on_a_local_instance(ray_session):
    if ray_session.cluster_resources().get("GPU"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match=r"GPU=0.*--gpus-per-worker"):
        check_resources(WorkerResources(1, 0.5), local=True)
    with pytest.raises(UserError, match="node_zzz=0"):
        check_resources(WorkerResources(1, 0.0, {"node_zzz": 1}), local=True)
    check_resources(WorkerResources(1, 0.0, {"node_zzz": 1}), local=False)  # a cluster may still scale up


def test_a_submit_that_fails_before_any_trial_leaves_no_study_behind(ray_session, tiny_model_dir, tmp_path):
    broken = tmp_path / "broken-model"  # weights that do not fit their config: every worker fails to load them
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] // 2}))
    options = RunOptions(results_dir=tmp_path / "results", workers=1)
    with pytest.raises(Exception, match="size"):
        submit(tiny_spec(broken, "retried", guided=False), 1, options)
    assert not study_exists(open_storage(options.storage_url("retried")), "retried")
    trials = submit(tiny_spec(tiny_model_dir, "retried", guided=False), 1, options)  # the fixed submit is not refused
    assert len(trials) == 1


def test_a_worker_killed_while_the_profile_is_measured_is_replaced(ray_session, tiny_model_dir, tmp_path):
    from compsearch.search.sensitivity import measure_profile

    ctx = prepare_job(tiny_spec(tiny_model_dir, "profiled"))

    def spawn(count: int) -> list:
        return start_workers(ctx, count, 1, evaluator=SlowProfileEvaluator)

    pool, outcome = spawn(2), {}

    def measure():
        try:
            outcome["profile"], _ = measure_profile(ctx, pool, tmp_path, spawn=spawn)
        except BaseException as err:  # reported below
            outcome["error"] = err

    thread = threading.Thread(target=measure, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "killed" not in outcome and thread.is_alive():
        busy = ray_actor_processes(psutil.Process(), "ray::SlowProfileEvaluator.profile_")
        if busy:
            outcome["killed"] = busy[0].pid
            busy[0].kill()
        time.sleep(0.05)
    thread.join(timeout=300)
    assert "killed" in outcome, "no worker was caught measuring"
    assert "error" not in outcome, outcome.get("error")
    assert all(kl >= 0 for factors in outcome["profile"].kl.values() for options in factors.values()
               for kl in options.values())
    assert outcome["killed"] not in {ray.get(worker.where.remote())["pid"] for worker in pool}  # replaced in the pool
