"""The Optuna side of a job: storage, sampler, the study and its bookkeeping across stops."""
from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from compsearch.search.errors import UserError
from compsearch.search.optuna_internals import storage_of, trial_id
from compsearch.search.spec import OBJECTIVES, SEED_LIMIT, JobSpec

log = logging.getLogger(__name__)
HEARTBEAT_S = 5  # the driver's heartbeat period; a driver silent for GRACE_S is taken as dead
GRACE_S = 30
JOURNAL_PREFIX = "journal:"
ERROR_ATTR = "error"  # a trial that failed on its own (counted as done)
INTERRUPTED_ATTR = "interrupted"  # a trial cut short by a stop (re-run, not counted)
DRIVER_ATTR = "driver"
SPEC_ATTR = "spec"
BASE_METRICS_ATTR = "base_metrics"  # the uncompressed model measured as a trial is


def default_storage_url(results_dir: Path, study: str) -> str:
    return f"sqlite:///{(Path(results_dir) / study / 'study.db').resolve()}"


def open_storage(url: str) -> BaseStorage:
    """An Optuna storage from a URL: any SQLAlchemy URL (with trial heartbeats), or `journal:PATH`."""
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX):])
        _make_folder(path.parent, url)
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as err:
            raise UserError(f"storage {url!r} cannot be opened ({err.strerror}); give journal:PATH with a file "
                            "you can write") from None
    if url.startswith("sqlite:///"):
        _make_folder(Path(url[len("sqlite:///"):]).parent, url)
    try:
        with warnings.catch_warnings(category=ExperimentalWarning, action="ignore"):
            storage = RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                 engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
        if url.startswith("sqlite"):
            _write_ahead_log(storage)
        return storage
    except Exception as err:  # SQLAlchemy raises many kinds for bad URLs or unreachable servers
        raise UserError(f"storage {shown_url(url)!r} cannot be opened ({type(err).__name__}: {str(err).splitlines()[0]}); "
                        f"give an SQLAlchemy URL like sqlite:///path.db or postgresql://..., or journal:PATH") from None


def shown_url(url: str) -> str:
    """A storage URL as messages and logs show it: with its password masked (postgresql://u:***@db/x)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:  # not an SQLAlchemy URL (journal:PATH): nothing to hide
        return url


def _make_folder(folder: Path, url: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"storage {url!r} needs the folder {str(folder)!r}, which cannot be made ({err.strerror}"
                        f"{': a file of that name is in the way' if isinstance(err, FileExistsError) else ''}); "
                        "pass another --results-dir or --storage") from None


def _write_ahead_log(storage: RDBStorage) -> None:
    """sqlite in WAL mode with synchronous=NORMAL: a commit no longer waits for a disk flush (a trial
    writes a hundred or more params and attrs, each its own commit: about 27 ms each otherwise, 2 ms
    with WAL). Still safe when a process is killed; WAL needs the file on a local disk, which the
    default `results/<study>/study.db` is (shared storage is PostgreSQL or a journal file)."""
    @event.listens_for(storage.engine, "connect")
    def _pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    storage.engine.dispose()  # connections opened while the storage set itself up get the pragmas too


def make_sampler(spec: JobSpec, child_generation=None, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The spec's sampler, drawing from `seed` (default the spec's: see `run_seed`); NSGA-II makes its
    children with `child_generation` when given (guided search)."""
    seed = spec.seed if seed is None else seed
    if spec.sampler == "nsga2":
        with warnings.catch_warnings(category=ExperimentalWarning, action="ignore"):
            return optuna.samplers.NSGAIISampler(population_size=spec.population_size, seed=seed,
                                                 child_generation_strategy=child_generation)
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.population_size, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def run_seed(spec: JobSpec, study: optuna.Study) -> int:
    """The seed of this run of the study: the spec's, shifted by the trials the study already holds, so
    that a resumed study does not draw the first run's random plans again (and measure them twice);
    the same history still gives the same seed."""
    return (spec.seed + len(study.get_trials(deepcopy=False))) % SEED_LIMIT


def study_exists(storage: BaseStorage, name: str) -> bool:
    return any(summary.study_name == name for summary in optuna.get_all_study_summaries(storage, include_best_trial=False))


def create_study(spec: JobSpec, storage: BaseStorage, attrs: dict) -> optuna.Study:
    study = optuna.create_study(study_name=spec.study, storage=storage, sampler=make_sampler(spec),
                                directions=["minimize"] * len(spec.objectives))
    with warnings.catch_warnings(category=ExperimentalWarning, action="ignore"):
        study.set_metric_names([OBJECTIVES[name] for name in spec.objectives])
    study.set_user_attr(SPEC_ATTR, spec.to_dict())
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    return study


def load_study(name: str, storage: BaseStorage) -> tuple[optuna.Study, JobSpec]:
    if not study_exists(storage, name):
        raise UserError(f"study {name!r} does not exist in this storage; start it with `compsearch submit --study {name}`")
    study = optuna.load_study(study_name=name, storage=storage)
    spec = JobSpec.from_dict(study.user_attrs[SPEC_ATTR])
    study.sampler = make_sampler(spec, seed=run_seed(spec, study))
    return study, spec


def ask(study: optuna.Study) -> optuna.Trial:
    """`study.ask()`, plus: an enqueued trial (a seed, a retry) joins the genetic sampler's current
    generation, which Optuna only does for trials it samples itself; otherwise NSGA-II would never
    take the seeds as parents. (The driver keeps trial heartbeats itself, outside `Study.optimize`.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    if hasattr(study.sampler, "get_trial_generation"):  # NSGA-II/III: sets the generation when missing
        study.sampler.get_trial_generation(study, storage_of(study).get_trial(trial_id(trial)))
    return trial


def done_count(study: optuna.Study) -> int:
    """Trials that count towards the target: completed, or failed by their own error (not interrupted)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if is_done(t))


def is_done(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and ERROR_ATTR in trial.user_attrs)


def live_driver(study: optuna.Study) -> str | None:
    """A description of another driver that is running this study, or None."""
    driver = study.user_attrs.get(DRIVER_ATTR)
    if not driver or not driver.get("heartbeat"):
        return None
    age = time.time() - driver["heartbeat"]
    if age > GRACE_S or (driver["host"] == socket.gethostname() and not _pid_alive(driver["pid"])):
        return None
    return f"pid {driver['pid']} on {driver['host']}, last heartbeat {age:.0f}s ago"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def beat(study: optuna.Study, in_flight: list[optuna.Trial], running: bool = True) -> None:
    """Record that this driver is alive, and heartbeats for its trials in flight."""
    heartbeat = time.time() if running else 0.0
    study.set_user_attr(DRIVER_ATTR, {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": heartbeat})
    storage = storage_of(study)
    if running and hasattr(storage, "record_heartbeat") and getattr(storage, "get_heartbeat_interval", lambda: None)():
        for trial in in_flight:
            storage.record_heartbeat(trial_id(trial))


def requeue(study: optuna.Study, trial: FrozenTrial | optuna.Trial, reason: str) -> None:
    """Fail a trial that was cut short (not by its own fault) and enqueue the same parameters again.

    A trial stopped before its plan was drawn has no parameters: there is nothing to repeat, and the
    driver asks for a new trial in its place anyway.
    """
    number = trial.number
    storage = storage_of(study)
    frozen = storage.get_trial(trial_id(trial))
    if frozen.state == TrialState.RUNNING:
        storage.set_trial_user_attr(trial_id(frozen), INTERRUPTED_ATTR, reason)
        storage.set_trial_state_values(trial_id(frozen), TrialState.FAIL)
    if frozen.params:
        study.enqueue_trial(frozen.params, user_attrs={"retry_of": number}, skip_if_exists=False)
    log.info("trial %d interrupted (%s)%s", number, reason, "; re-queued" if frozen.params else "")


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """After a stop: fail every RUNNING trial (no driver is running them) and re-queue its parameters."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        requeue(study, trial, "the driver stopped before the trial finished")
    return [trial.number for trial in stale]
