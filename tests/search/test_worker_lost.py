"""A worker Ray's memory monitor stops is a lost worker, not a crash of the study."""
import optuna
from optuna.trial import TrialState
from ray.exceptions import OutOfMemoryError

from compsearch.search import runner
from compsearch.search.study import ERROR_ATTR, INTERRUPTED_ATTR


def test_a_worker_stopped_for_memory_is_replaced_and_its_trial_retried_once(monkeypatch):
    def out_of_memory(_ref):
        raise OutOfMemoryError("1 worker(s) were killed due to the node running low on memory.\nMemory on the node ...")

    monkeypatch.setattr(runner.ray, "get", out_of_memory)
    study = optuna.create_study(directions=["minimize", "minimize"])
    distributions = {"x": optuna.distributions.CategoricalDistribution([1, 2])}
    spawned = []

    def spawn(count: int) -> list:
        spawned.append(count)
        return [f"new-{len(spawned)}"]

    first = study.ask(distributions)
    assert runner._finish(None, study, first, None, "old", spawn) == "new-1"  # a fresh worker takes its place
    frozen = study.trials[first.number]
    assert frozen.state == TrialState.FAIL and "running low on memory" in frozen.user_attrs[INTERRUPTED_ATTR]
    retry = study.ask(distributions)  # the same plan again, asked first
    assert retry.params == first.params and retry.user_attrs["retry_of"] == first.number
    assert runner._finish(None, study, retry, None, "new-1", spawn) == "new-2"
    again = study.trials[retry.number]  # stopped again: failed for good, not queued a third time
    assert again.state == TrialState.FAIL and "out of memory twice" in again.user_attrs[ERROR_ATTR]
    assert not study.get_trials(states=(TrialState.WAITING,))
