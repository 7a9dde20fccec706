"""The driver loop: Optuna asks, Ray workers compress and evaluate, Optuna is told, Parquet is rewritten."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
import pandas as pd
import psutil
import ray
from ray.exceptions import OutOfMemoryError, RayTaskError

from compsearch.compress import plan_bits_per_weight
from compsearch.evaluators.quality import merged_references
from compsearch.paths import variant_store_bytes
from compsearch.search.capacity import hessian_bytes, memory_warning, needs_hessians, needs_statistics
from compsearch.search.cluster import check_reachable, protect_token_file
from compsearch.search.errors import UserError
from compsearch.search.job import JobContext
from compsearch.search.results import (
    CONSTRAINTS, DISTILLED_ATTR, DISTILLED_COLUMNS, SEARCH_SOURCE, TASK_SCORES_ATTR, storable, trials_frame, violations,
    write_results,
)
from compsearch.search.spec import OBJECTIVES, STUDENT_STEPS, JobSpec, objective_sign
from compsearch.search.guided import GuidedChildren
from compsearch.search.interrupts import interrupts_remembered, raise_if_interrupted
from compsearch.search.seeding import PRESET_SEED, seed_profile, seed_uniform
from compsearch.search.sensitivity import PROFILE_ATTR, measure_profile
from compsearch.search.worker_lost import WORKER_LOST
from compsearch.search.study import (BASE_METRICS_ATTR, ERROR_ATTR, HEARTBEAT_S, ask, beat, done_count, make_sampler,
                                     requeue, requeue_interrupted, run_seed)
from compsearch.search.trial import PRUNE_FACTOR, TrialEvaluator, WorkerSettings
from compsearch.spaces.plan import Plan

log = logging.getLogger(__name__)
REWRITE_SHARE = 0.02  # the most of the driver's time that rebuilding the Parquet tables may take mid-study
# Merging the workers' calibration Hessians holds two shares, the merged statistics and their copy in Ray's
# object store on the driver's machine: where that much memory is not free, each worker measures its own.
SHARED_HESSIAN_COPIES = 4
_LAST_REWRITE: dict[str, tuple[float, float]] = {}  # results/<study> -> (end of the last rebuild, its seconds)
_UNWRITABLE: set[str] = set()  # results/<study> folders whose last rebuild failed (said once)


@dataclass
class TrialEvent:
    """What the progress display needs after each finished trial."""

    done: int
    target: int
    trial: int
    state: str
    metrics: dict
    feasible: bool | None
    best: dict | None  # the best feasible trial so far by the first objective
    feasible_count: int
    error: str | None = None
    violated: tuple[str, ...] = ()  # the constraints an infeasible trial breaks: memory, latency, quality


@dataclass(frozen=True)
class WorkerResources:
    """What each worker (one Ray actor holding the base model) asks Ray for."""

    cpus: int = 1
    gpus: float = 0.0  # fractional packs workers on one GPU, e.g. 0.5: two per GPU
    custom: dict[str, float] = field(default_factory=dict)  # e.g. {"node_b": 1} to pin workers to nodes

    def actor_options(self) -> dict:
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, "resources": dict(self.custom), "max_restarts": 0}

    def asked(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {}), **self.custom}


class _RayTrialEvaluator(TrialEvaluator):
    """The Ray actor: the base model on the actor's device (CUDA when Ray gave it a GPU), kept across trials."""

    def __init__(self, model_ref: str, eval_ids, calib_ids, settings: WorkerSettings):
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        super().__init__(model_ref, eval_ids, calib_ids, dataclasses.replace(settings, device=device))

    def evaluate(self, plan_json: str) -> dict:
        metrics = super().evaluate(plan_json)
        metrics["node_id"] = ray.get_runtime_context().get_node_id()
        return metrics

    def where(self) -> dict:
        """The actor's process id, node id and device (for tests, and to find a worker to stop)."""
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(), "device": self.device}


def start_ray(address: str | None, num_cpus: int) -> bool:
    """Connect to `address`, or start a local instance on loopback; True when this call started Ray."""
    if ray.is_initialized():
        return False
    if address:
        check_reachable(address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return False
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=False)
    protect_token_file()
    return True


def check_resources(asked: WorkerResources, local: bool) -> None:
    """Refuse workers that no node can host: at once on a local instance; on a cluster (which may
    autoscale) only a warning, the workers wait for a node."""
    total = ray.cluster_resources()
    missing = {name: amount for name, amount in asked.asked().items() if total.get(name, 0) < amount}
    if not missing:
        return
    have = ", ".join(f"{name}={total.get(name, 0):g}" for name in missing)
    message = (f"each worker asks for {asked.asked()} but the Ray cluster has {have}; lower --gpus-per-worker / "
               "--cpus-per-worker, fix --worker-resources, or add nodes that have them")
    if local:
        raise UserError(message)
    log.warning("%s (waiting for the autoscaler)", message)


def start_workers(ctx: JobContext, count: int, cpus_per_worker: int, gpus_per_worker: float = 0.0,
                  resources: dict[str, float] | None = None, evaluator: type = _RayTrialEvaluator,
                  cache_dir: Path | None = None) -> list:
    """`count` actors, each holding the base model on its device; `evaluator` is the class they run;
    `cache_dir` where they keep compressed-layer variants (None: the default cache)."""
    eval_ref, calib_ref = ray.put(ctx.windows.eval_ids), ray.put(ctx.windows.calib_ids)
    actor = ray.remote(**WorkerResources(cpus_per_worker, gpus_per_worker, resources or {}).actor_options())(evaluator)
    try:
        store_bytes = variant_store_bytes()
    except ValueError as err:
        raise UserError(str(err)) from None
    settings = WorkerSettings.for_job(ctx.spec, threads=max(1, int(cpus_per_worker)),
                                      cache_dir=str(cache_dir) if cache_dir else None, variant_store_bytes=store_bytes)
    return [actor.remote(ctx.model_ref, eval_ref, calib_ref, settings) for _ in range(count)]


def _window_shares(pool: list, windows: int) -> list[tuple]:
    """(worker, first window, end) for each worker given a share of `windows` consecutive windows."""
    bounds = [round(index * windows / len(pool)) for index in range(len(pool) + 1)]
    return [(worker, start, end) for worker, start, end in zip(pool, bounds, bounds[1:]) if end > start]


def share_base_reference(ctx: JobContext, pool: list) -> list:
    """The base model's distributions on the evaluation windows (for KL), each worker measuring a share of
    the windows, given to every worker: one forward pass over the windows per study, not one per worker.
    Returns [its object ref], or [] when the study measures no KL or a worker died (then each worker
    measures its own on first use)."""
    if not ctx.spec.needs_kl:
        return []
    try:
        shares = ray.get([worker.base_reference_share.remote(start, end)
                          for worker, start, end in _window_shares(pool, len(ctx.windows.eval_ids))])
    except (*WORKER_LOST, RayTaskError) as err:
        log.warning("the base reference could not be shared (%s); each worker measures its own", err)
        return []
    reference = ray.put(merged_references(shares))
    for worker in pool:
        worker.set_base_reference.remote(reference)
    return [reference]


def share_calibration(ctx: JobContext, pool: list) -> list:
    """The calibration statistics the space's plans use (input norms; Hessians too where a plan needs them),
    each worker measuring a share of the windows, merged here and given to every worker: one pass over the
    windows per study, not one per worker. Returns [its object ref], or [] when no plan uses statistics or
    a worker died (then each worker measures its own on first use)."""
    if not needs_statistics(ctx):
        return []
    with_hessians = needs_hessians(ctx)
    if with_hessians and SHARED_HESSIAN_COPIES * hessian_bytes(ctx) > psutil.virtual_memory().available:
        log.info("calibration Hessians (%.1f GB) too large to merge here: each worker measures its own",
                 hessian_bytes(ctx) / 1e9)
        return []
    try:
        shares = [worker.calibration_share.remote(start, end, with_hessians)
                  for worker, start, end in _window_shares(pool, len(ctx.windows.calib_ids))]
        statistics = ray.get(shares[0])
        for share in shares[1:]:  # one share at a time: the merged statistics and one share in memory
            statistics = statistics.merged_with(ray.get(share))
    except (*WORKER_LOST, RayTaskError) as err:
        log.warning("the calibration statistics could not be shared (%s); each worker measures its own", err)
        return []
    reference = ray.put(statistics)
    for worker in pool:
        worker.set_calibration.remote(reference)
    return [reference]


@interrupts_remembered()
def run_study(ctx: JobContext, study: optuna.Study, target: int, workers: int, results_dir: Path,
              cpus_per_worker: int = 1, address: str | None = None,
              on_trial: Callable[[TrialEvent], None] | None = None,
              on_status: Callable[[str], None] | None = None, cache_dir: Path | None = None,
              gpus_per_worker: float = 0.0, worker_resources: dict[str, float] | None = None,
              evaluator: type = _RayTrialEvaluator,
              on_progress: Callable[[str, int, int], None] | None = None) -> pd.DataFrame:
    """Run trials on Ray workers until `target` trials are done; returns the trials table.

    Each of the `workers` actors asks for `cpus_per_worker` CPUs, `gpus_per_worker` GPUs (fractions
    pack several on one GPU) and the custom `worker_resources`; a worker that dies is replaced.

    Before the search: the base model is measured once per study; the uniform seed trials run (they
    need no profile); the sensitivity profile is read from the cache or measured (guided studies) and
    the profile's seed trials are enqueued (seeds once per study). `on_progress(stage, done, total)`
    hears of the profile's measurements as they finish.
    """
    say = on_status or log.info
    started_ray = start_ray(address, workers * cpus_per_worker)
    try:
        check_resources(WorkerResources(cpus_per_worker, gpus_per_worker, worker_resources or {}), started_ray)
        warning = memory_warning(ctx, workers) if started_ray else None
        if warning:
            say(f"warning: {warning}")

        shared_reference: list = []  # the base model's distributions, once the workers have measured them
        shared_statistics: list = []  # the calibration statistics, likewise

        def spawn(count: int) -> list:
            started = start_workers(ctx, count, cpus_per_worker, gpus_per_worker, worker_resources, evaluator, cache_dir)
            for worker in started:
                for reference in shared_reference:
                    worker.set_base_reference.remote(reference)
                for statistics in shared_statistics:
                    worker.set_calibration.remote(statistics)
            return started

        pool = spawn(workers)
        shared_reference.extend(share_base_reference(ctx, pool))
        beat(study, [])
        if BASE_METRICS_ATTR not in study.user_attrs:
            study.set_user_attr(BASE_METRICS_ATTR, storable(ray.get(pool[0].evaluate.remote(Plan().to_json()))))
        _check_latency_budget(ctx, pool[0])
        on_trial = on_trial or (lambda event: None)
        seeds = seed_uniform(ctx, study, target)
        if seeds and ctx.spec.guided:  # the first answers, while nothing depends on the profile yet
            presets = [kind.removeprefix(PRESET_SEED) for kind in seeds if kind.startswith(PRESET_SEED)]
            say((f"llama.cpp's {', '.join(presets)} mixes" if presets else f"{len(seeds)} uniform seed")
                + " trials first; the sensitivity profile after them")
            _drive(ctx, study, target, pool, spawn, results_dir, on_trial, until=done_count(study) + len(seeds))
        shared_statistics.extend(share_calibration(ctx, pool))
        _prepare_search(ctx, study, target, pool, spawn, workers, say, cache_dir, on_progress)
        _drive(ctx, study, target, pool, spawn, results_dir, on_trial)
        _score_front_tasks(ctx, study, pool)
        _distill_best(ctx, study, pool, say)
    finally:
        beat(study, [], running=False)
        trials = _write_tables(study, results_dir)
        if started_ray:
            ray.shutdown()
    return trials


def _check_latency_budget(ctx: JobContext, worker) -> None:
    """Refuse a latency budget that even the fastest uniform plan is predicted to miss by more than the
    cost model's margin (`PRUNE_FACTOR`): every trial would be pruned or infeasible."""
    budget = ctx.spec.latency_budget_ms
    if budget is None:
        return
    plans = [ctx.space.plan(ctx.layers, choice).to_json() for choice in ctx.space.uniform_choices()]
    predicted = [ms for ms in ray.get(worker.predicted_latency_ms.remote(plans)) if ms is not None]
    if predicted and min(predicted) > PRUNE_FACTOR * budget:
        raise UserError(f"latency budget {budget:g} ms is out of reach: the fastest plan of space {ctx.spec.space!r} "
                        f"is predicted at {min(predicted):.1f} ms per forward pass on these workers; raise "
                        "--latency-budget or allow faster choices")


def _prepare_search(ctx: JobContext, study: optuna.Study, target: int, pool: list, spawn: Callable[[int], list],
                    workers: int, say: Callable[[str], None], cache_dir: Path | None,
                    on_progress: Callable[[str, int, int], None] | None) -> None:
    if ctx.spec.guided:
        def progress(what: str, done: int, total: int) -> None:
            if on_progress is not None:
                on_progress(f"sensitivity profile, {what}", done, total)
            elif done == total or done % 40 < 8:
                say(f"sensitivity profile: {done}/{total} {what}")

        ctx.profile, profile_s = measure_profile(ctx, pool, cache_dir, progress, spawn)
        study.set_user_attr("profile_s", study.user_attrs.get("profile_s", 0.0) + profile_s)
        study.set_user_attr(PROFILE_ATTR, ctx.profile.kl)  # for the report: group -> factor -> option -> KL
        say(f"sensitivity profile ready ({'cached' if not profile_s else f'measured in {profile_s:.0f}s'})")
        if ctx.spec.sampler == "nsga2":
            seed = run_seed(ctx.spec, study)
            study.sampler = make_sampler(ctx.spec, GuidedChildren(ctx, ctx.profile, seed), seed)
    seed_profile(ctx, study, ctx.profile, target, workers)
    queued = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    remaining = max(0, target - done_count(study))
    took = [t.user_attrs["compress_s"] + t.user_attrs["evaluate_s"] for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if "evaluate_s" in t.user_attrs]
    per_trial_s = float(pd.Series(took).median()) if took else None
    say(f"{queued} trials queued first (seeds, re-runs)" + (
        f"; about {per_trial_s:.0f}s per trial, {per_trial_s * remaining / max(1, workers) / 60:.1f} min for the "
        f"{remaining} trials left" if per_trial_s is not None else ""))


def _drive(ctx: JobContext, study: optuna.Study, target: int, pool: list, spawn: Callable[[int], list],
           results_dir: Path, on_trial: Callable[[TrialEvent], None], until: int | None = None) -> None:
    """Run trials until `until` (default: the study's `target`) are done; progress is told against `target`."""
    until = target if until is None else min(until, target)
    idle = list(pool)
    in_flight: dict = {}  # object ref -> (trial, worker)
    last_beat = time.monotonic()
    try:
        while True:
            done = done_count(study)
            while idle and done + len(in_flight) < until:
                trial = ask(study)
                try:
                    plan_json = _propose(ctx, trial)
                except Exception as err:  # the trial boundary: record it, keep the study going
                    _fail(study, trial, f"could not build a plan: {type(err).__name__}: {err}")
                    _report(study, trial.number, target, ctx, results_dir, on_trial)
                    done = done_count(study)
                    continue
                worker = idle.pop()
                in_flight[worker.evaluate.remote(plan_json)] = (trial, worker)
            if not in_flight:
                return
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=HEARTBEAT_S)
            raise_if_interrupted()
            if time.monotonic() - last_beat >= HEARTBEAT_S or ready:
                beat(study, [trial for trial, _ in in_flight.values()])
                last_beat = time.monotonic()
            for ref in ready:
                trial, worker = in_flight.pop(ref)
                idle.append(_finish(ctx, study, trial, ref, worker, spawn))
                _report(study, trial.number, target, ctx, results_dir, on_trial)
    except BaseException:  # a stop (Ctrl-C, an error of the driver): what did not end runs again on resume.
        # This driver is the study's only one, so every RUNNING trial is its own: also one asked for and
        # not yet sent, or one a stop caught between its result and `tell`.
        requeue_interrupted(study)
        raise


def _propose(ctx: JobContext, trial: optuna.Trial) -> str:
    """Turn an asked trial into a plan and record what is known before running it."""
    plan = ctx.space.suggest_plan(trial, ctx.layers)
    memory = ctx.plan_bytes(plan)
    if ctx.profile is not None:
        trial.set_user_attr("estimated_kl", ctx.profile.estimate(ctx.space.choices_of(trial.params, ctx.layers)))
    trial.set_user_attr("plan_json", plan.to_json())
    trial.set_user_attr("memory_bytes", memory)
    trial.set_user_attr("bits_per_weight", plan_bits_per_weight(ctx.layers, plan))
    return plan.to_json()


def _finish(ctx: JobContext, study: optuna.Study, trial: optuna.Trial, ref, worker, spawn: Callable[[int], list]):
    """Tell Optuna how a trial ended; returns the worker to reuse (a fresh one if it died).

    A dead worker (process killed, node lost, stopped by Ray's memory monitor) is not the trial's fault:
    the trial is failed as interrupted, its parameters are enqueued again (asked first), and a new worker
    takes its place. A retried trial whose worker the memory monitor stops again is failed for good (it
    may be what fills the memory).
    """
    try:
        metrics = ray.get(ref)
    except WORKER_LOST as err:
        reason = str(err).splitlines()[0]
        if isinstance(err, OutOfMemoryError) and "retry_of" in trial.user_attrs:
            _fail(study, trial, f"out of memory twice (lower --workers, or use a machine with more memory): {reason}")
        else:
            requeue(study, trial, f"worker died: {reason}")
        return spawn(1)[0]
    except RayTaskError as err:
        _fail(study, trial, f"{type(err.cause).__name__}: {err.cause}")
        return worker
    metrics["memory_bytes"] = trial.user_attrs["memory_bytes"]
    if "pruned" in metrics:  # the latency cost model ruled it out before it ran
        for key, value in storable(metrics).items():
            trial.set_user_attr(key, value)
        _fail(study, trial, f"pruned: {metrics['pruned']}")
        return worker
    values = [metrics.get(OBJECTIVES[name]) for name in ctx.spec.objectives]
    bad = [f"{name}={value}" for name, value in zip(ctx.spec.objectives, values)
           if value is None or not math.isfinite(value)]
    for key, value in storable(metrics).items():
        trial.set_user_attr(key, value)
    if bad:
        _fail(study, trial, f"non-finite metrics: {', '.join(bad)} (the compressed model diverged)")
        return worker
    for name, value in violations(ctx.spec, metrics, ctx.memory_budget_bytes, study).items():
        trial.set_constraint(name, value)
    study.tell(trial, [objective_sign(name) * value for name, value in zip(ctx.spec.objectives, values)])
    return worker


def _score_front_tasks(ctx: JobContext, study: optuna.Study, pool: list) -> None:
    """With `--tasks-on pareto`: score the tasks on the feasible Pareto front, once the search is done.

    Optuna refuses new attributes on finished trials, so the scores are kept as study attributes
    (`task_scores:<trial>`), which the Parquet tables merge into the trials' rows.
    """
    if ctx.spec.tasks_on != "pareto" or ctx.spec.task_settings is None:
        return
    trials = trials_frame(study)
    front = trials[trials["on_front"] & (trials["feasible"] == True)]  # noqa: E712
    todo = [(int(row.trial), row.plan_json) for row in front.itertuples()
            if f"{TASK_SCORES_ATTR}:{int(row.trial)}" not in study.user_attrs]
    refs = {pool[i % len(pool)].score_tasks.remote(plan_json): number for i, (number, plan_json) in enumerate(todo)}
    log.info("scoring tasks on %d Pareto candidates", len(refs))
    for ref, number in refs.items():
        try:
            scores = ray.get(ref)
        except RayTaskError as err:
            log.warning("task scoring of trial %d failed: %s", number, err.cause)
            scores = {"task_error": f"{type(err.cause).__name__}: {err.cause}"}
        study.set_user_attr(f"{TASK_SCORES_ATTR}:{number}", storable(scores))


def plans_to_distill(study: optuna.Study, spec: JobSpec) -> list[tuple[int, str, int | None]]:
    """(trial number, plan, steps) of the plans to distill that are not distilled yet: the `spec.distill_top`
    best feasible trials (`spec.distill_steps` each; None: the default) and the `spec.students` best feasible
    trials that remove MLP channels or attention heads (`spec.student_steps` each, which a plan that is
    both gets)."""
    if not (spec.distill_top or spec.students):
        return []
    trials = trials_frame(study)
    best = trials[(trials["source"] == SEARCH_SOURCE) & (trials["feasible"] == True)].sort_values("rank")  # noqa: E712
    plans = dict(zip(best["trial"].astype(int), best["plan_json"]))
    steps = {number: spec.distill_steps for number in list(plans)[:spec.distill_top]}
    students = [number for number, plan_json in plans.items() if _is_student(plan_json)] if spec.students else []
    steps.update({number: spec.student_steps or STUDENT_STEPS for number in students[:spec.students]})
    return [(number, plans[number], count) for number, count in steps.items()
            if f"{DISTILLED_ATTR}:{number}" not in study.user_attrs]


def _is_student(plan_json: str) -> bool:
    """Whether a plan makes a smaller dense model (removes MLP channels or attention heads)."""
    return any(layer_plan.is_structured for layer_plan in Plan.from_json(plan_json).layers.values())


def _distill_best(ctx: JobContext, study: optuna.Study, pool: list, say: Callable[[str], None]) -> None:
    """With `--distill-top K` (and `--students S`): once the search is done, the K best feasible trials
    (ranks 1..K) and the S best that remove channels or heads are distilled on the workers, one plan per
    worker at a time (`plans_to_distill`); what each measured after distillation joins its row
    (`distilled:<trial>` study attributes, as `tasks-on pareto` scores do). A resumed study distills only
    those not distilled yet; a worker lost on the way leaves its plan to the next resume."""
    todo = plans_to_distill(study, ctx.spec)
    if not todo:
        return
    say(f"distilling {len(todo)} of the best feasible plans on {min(len(pool), len(todo))} workers")
    refs = {pool[i % len(pool)].distilled.remote(plan_json, steps): number
            for i, (number, plan_json, steps) in enumerate(todo)}
    for ref, number in refs.items():
        try:
            result = ray.get(ref)
        except WORKER_LOST as err:
            log.warning("the worker distilling trial %d was lost (%s); resume the study to distill it", number, err)
            continue
        except RayTaskError as err:
            log.warning("distilling trial %d failed: %s", number, err.cause)
            result = {"distill_error": f"{type(err.cause).__name__}: {err.cause}"}
        study.set_user_attr(f"{DISTILLED_ATTR}:{number}",
                            storable({key: value for key, value in result.items() if key in DISTILLED_COLUMNS}))
        if "distilled_ppl" in result:
            say(f"trial {number} distilled in {result['distill_s']:.0f}s: ppl {result['ppl_before_distill']:.3f} -> "
                f"{result['distilled_ppl']:.3f}")


def _fail(study: optuna.Study, trial: optuna.Trial, error: str) -> None:
    log.warning("trial %d failed: %s", trial.number, error)
    trial.set_user_attr(ERROR_ATTR, error)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)


def _report(study: optuna.Study, number: int, target: int, ctx: JobContext, results_dir: Path,
            on_trial: Callable[[TrialEvent], None]) -> None:
    """Rewrite the tables after a trial ended (see `_rewrite_due`) and tell the caller."""
    key = str(Path(results_dir) / study.study_name)
    if _rewrite_due(key):
        started = time.monotonic()
        trials = _write_tables(study, results_dir)
        _LAST_REWRITE[key] = (time.monotonic(), time.monotonic() - started)
    else:
        trials = trials_frame(study)
    on_trial(_event(study, trials, number, target, ctx))


def _write_tables(study: optuna.Study, results_dir: Path) -> pd.DataFrame:
    """The study's tables rebuilt (`write_results`); a results folder that cannot take them (full,
    read-only, gone) does not stop the study, which lives in its storage: that is said once, and the
    tables are rebuilt by the next write that succeeds (or by `resume`)."""
    folder = str(Path(results_dir) / study.study_name)
    try:
        trials = write_results(study, results_dir)
    except OSError as err:
        if folder not in _UNWRITABLE:
            log.warning("the tables in %s cannot be written (%s); the study goes on in its storage and they are "
                        "rebuilt once the folder takes them again (or by `compsearch resume`)", folder,
                        err.strerror or err)
            _UNWRITABLE.add(folder)
        return trials_frame(study)
    _UNWRITABLE.discard(folder)
    return trials


def _rewrite_due(key: str) -> bool:
    """Whether to rebuild the Parquet tables now. Each rebuild reads every trial from the storage, so it
    grows with the study; rebuilding after every trial would make it a growing share of the driver's
    time. Rebuilds are spaced so they take at most REWRITE_SHARE of it; `run_study` always rebuilds at
    the end, and every rebuild is complete (nothing is appended), so no trial is missed or doubled."""
    last_end, cost = _LAST_REWRITE.get(key, (0.0, 0.0))
    return time.monotonic() - last_end >= cost / REWRITE_SHARE


def _event(study: optuna.Study, trials: pd.DataFrame, number: int, target: int, ctx: JobContext) -> TrialEvent:
    row = trials[trials["trial"] == number].iloc[0]
    primary = OBJECTIVES[ctx.spec.objectives[0]]
    searched = trials[trials["source"] == SEARCH_SOURCE]
    feasible = searched[(searched["state"] == "COMPLETE") & (searched["feasible"] == True)]  # noqa: E712
    ascending = objective_sign(ctx.spec.objectives[0]) > 0
    best = feasible.sort_values(primary, ascending=ascending).iloc[0].to_dict() if len(feasible) else None
    metrics = {key: row[key] for key in ("ppl", "kl", "memory_bytes", "bits_per_weight", "latency_ms")}
    violated = tuple(name for name in CONSTRAINTS if (row[f"{name}_violation"] or 0) > 0)
    return TrialEvent(done_count(study), target, number, row["state"], metrics, row["feasible"], best, len(feasible),
                      row["error"], violated)
