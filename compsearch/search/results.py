"""Parquet tables of a study, rebuilt from the Optuna storage (the single source of truth)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from compsearch.compress import layer_nbytes, stored_layouts
from compsearch.evaluators.metrics import METRICS, is_task_metric
from compsearch.search.spec import OBJECTIVES, JobSpec, objective_sign
from compsearch.search.study import BASE_METRICS_ATTR, ERROR_ATTR, INTERRUPTED_ATTR, SPEC_ATTR
from compsearch.spaces.layers import LayerInfo
from compsearch.spaces.plan import Plan

TRIALS_FILE, LAYERS_FILE, PARETO_FILE, BEST_DIR = "trials.parquet", "layers.parquet", "pareto.parquet", "best"
_CONSTRAINT_PREFIX = "constraints:"
CONSTRAINTS = ("memory", "latency", "quality")  # a study's limits; `<name>_violation` columns
TASK_SCORES_ATTR = "task_scores"  # study attribute `task_scores:<trial>`: tasks scored after the search
DISTILLED_ATTR = "distilled"  # study attribute `distilled:<trial>`: a candidate after distillation (export, --distill-top)
REFERENCE_ATTR = "reference"  # study attribute `reference:<name>`: a configuration scored by `compsearch evaluate`
SEARCH_SOURCE = "search"  # the `source` of the study's own trials (a reference's is its kind: uniform, plan, gguf)
# What distilling a trial's plan measured (its row holds it beside what the trial measured).
DISTILLED_COLUMNS = ["distilled_ppl", "distilled_kl", "distill_steps", "distill_final_loss", "distill_s", "distill_error"]
# Every declared metric is a column (`evaluators.metrics`); task metrics add `task_<task>_<metric>` columns.
_METRIC_COLUMNS = [metric.name for metric in METRICS]


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial of the study, ranked (see `rank_trials`), then one per reference configuration
    scored beside it (`source` says which: the search's trials, or the reference's kind; references
    have a `name` and no trial number or rank); columns carry their units."""
    spec = JobSpec.from_dict(study.user_attrs[SPEC_ATTR])
    protocol = study.user_attrs.get("protocol", {})
    front = {t.number for t in study.best_trials} if _has_complete(study) else set()
    rows = [_trial_row(study, spec, protocol, trial, front) for trial in study.get_trials(deepcopy=False)]
    rows += [_reference_row(study, spec, protocol, record) for key, record in sorted(study.user_attrs.items())
             if key.startswith(f"{REFERENCE_ATTR}:")]
    tasks = sorted({key for row in rows for key in row if is_task_metric(key)})
    frame = pd.DataFrame(rows, columns=trials_columns(tasks, protocol))
    frame["trial"] = frame["trial"].astype("Int64")
    return rank_trials(frame, spec)


# What the driver records about each trial besides its metrics.
_TRIAL_COLUMNS = [
    "study", "trial", "source", "name", "state", "rank", "on_front", "feasible", "memory_budget_bytes", "latency_budget_ms",
    "memory_violation", "latency_violation", "quality_violation", "objectives", "plan_json", "trial_s", "started_at", "finished_at",
    "retry_of", "error", "interrupted", "seed",
]


def trials_columns(tasks: list[str] = (), protocol: dict | None = None) -> list[str]:
    """The columns of trials.parquet: bookkeeping, every declared metric, distillation, tasks, protocol."""
    return _TRIAL_COLUMNS + _METRIC_COLUMNS + DISTILLED_COLUMNS + list(tasks) + [f"protocol_{k}" for k in protocol or {}]


def _trial_row(study: optuna.Study, spec: JobSpec, protocol: dict, trial: FrozenTrial, front: set[int]) -> dict:
    attrs = trial.user_attrs
    constraints = {key[len(_CONSTRAINT_PREFIX):]: value for key, value in trial.system_attrs.items()
                   if key.startswith(_CONSTRAINT_PREFIX)}
    duration = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else None
    row = {
        "study": study.study_name, "trial": trial.number, "source": SEARCH_SOURCE, "state": trial.state.name,
        "on_front": trial.number in front,
        "feasible": all(v <= 0 for v in constraints.values()) if trial.state == TrialState.COMPLETE else None,
        "memory_budget_bytes": study.user_attrs.get("memory_budget_bytes"),
        "latency_budget_ms": study.user_attrs.get("latency_budget_ms"),
        "memory_violation": constraints.get("memory"), "latency_violation": constraints.get("latency"),
        "quality_violation": constraints.get("quality"),
        "objectives": ",".join(spec.objectives), "trial_s": duration,
        "started_at": trial.datetime_start, "finished_at": trial.datetime_complete,
        "error": attrs.get(ERROR_ATTR), "interrupted": attrs.get(INTERRUPTED_ATTR),
    }
    for column in ("plan_json", "retry_of", "seed", *_METRIC_COLUMNS):
        row[column] = attrs.get(column)
    row.update({key: value for key, value in attrs.items() if is_task_metric(key)})
    row.update(study.user_attrs.get(f"{TASK_SCORES_ATTR}:{trial.number}", {}))
    row.update(study.user_attrs.get(f"{DISTILLED_ATTR}:{trial.number}", {}))
    row.update({f"protocol_{key}": value for key, value in protocol.items()})
    return row


def _reference_row(study: optuna.Study, spec: JobSpec, protocol: dict, record: dict) -> dict:
    """A configuration scored by `compsearch evaluate` (`record`: its source, name, plan and metrics),
    held against the study's budgets and quality floor as its trials are (a metric it lacks counts as over)."""
    memory_budget, latency_budget = study.user_attrs.get("memory_budget_bytes"), study.user_attrs.get("latency_budget_ms")
    row = {"study": study.study_name, "trial": None, "state": "COMPLETE", "on_front": False,
           "objectives": ",".join(spec.objectives), "memory_budget_bytes": memory_budget,
           "latency_budget_ms": latency_budget, **record}
    for name, value in violations(spec, record, memory_budget, study).items():
        row[f"{name}_violation"] = value
    row["feasible"] = all(row.get(f"{name}_violation", 0) <= 0 for name in CONSTRAINTS)
    row.update({f"protocol_{key}": value for key, value in protocol.items()})
    return row


def violations(spec: JobSpec, metrics: dict, memory_budget_bytes: int | None, study: optuna.Study) -> dict[str, float]:
    """How far past each of the study's limits a plan's `metrics` are, relative to the limit (<= 0: within):
    the memory and latency budgets and the quality floor, those the study has; a metric that is missing
    counts as infinitely over."""
    over = {}
    for name, budget, value in (("memory", memory_budget_bytes, metrics.get("memory_bytes")),
                                ("latency", spec.latency_budget_ms, metrics.get("latency_ms"))):
        if budget is not None:
            over[name] = (value - budget) / budget if value is not None else math.inf
    if spec.max_ppl_ratio is not None:
        over["quality"] = spec.quality_violation(metrics.get("ppl"), study.user_attrs[BASE_METRICS_ATTR]["ppl"])
    return over


def rank_trials(frame: pd.DataFrame, spec: JobSpec) -> pd.DataFrame:
    """Rank the search's completed trials: the feasible Pareto front first, then other feasible, then
    infeasible ones; within each, by the first objective. Failed and running trials, and reference
    configurations, get no rank (references are listed after the trials)."""
    primary = OBJECTIVES[spec.objectives[0]]
    complete = frame[(frame["state"] == "COMPLETE") & (frame["source"] == SEARCH_SOURCE)].copy()
    complete["_tier"] = [0 if front and feasible else 1 if feasible else 2
                         for front, feasible in zip(complete["on_front"], complete["feasible"])]
    ascending = objective_sign(spec.objectives[0]) > 0  # a task accuracy ranks highest first
    if primary not in complete:  # a task objective no trial has scored (every trial failed)
        complete[primary] = float("nan")
    complete = complete.sort_values(["_tier", primary, "trial"], ascending=[True, ascending, True], kind="stable")
    frame = frame.copy()
    frame["rank"] = pd.Series(range(1, len(complete) + 1), index=complete.index, dtype="Int64")
    frame["_reference"] = frame["source"] != SEARCH_SOURCE
    frame = frame.sort_values(["_reference", "rank", "trial"], na_position="last", kind="stable")
    return frame.drop(columns="_reference").reset_index(drop=True)


def layers_frame(study: optuna.Study, trials: pd.DataFrame) -> pd.DataFrame:
    """One row per trial x planned layer: the choices and the bytes they take."""
    layers = [LayerInfo(**info) for info in study.user_attrs.get("layers", [])]
    rows = []
    searched = trials[trials["source"] == SEARCH_SOURCE]
    for trial, plan_json in zip(searched["trial"], searched["plan_json"]):
        if not isinstance(plan_json, str):  # a trial that failed before it had a plan
            continue
        plan = Plan.from_json(plan_json)
        for layer in layers:
            layer_plan = plan[layer.name]
            rows.append({"study": study.study_name, "trial": trial, "layer": layer.name, "kind": layer.kind,
                         "block": layer.block, "out_features": layer.out_features, "in_features": layer.in_features,
                         **layer_plan.to_dict(), "stored_matrices": len(stored_layouts(layer, layer_plan)),
                         "params": layer.num_params, "bytes": layer_nbytes(layer, layer_plan)})
    return pd.DataFrame(rows)


def write_results(study: optuna.Study, results_dir: Path) -> pd.DataFrame:
    """Rewrite every table of the study (atomically) and the JSON plans of its front; returns the trials."""
    folder = Path(results_dir) / study.study_name
    folder.mkdir(parents=True, exist_ok=True)
    trials = trials_frame(study)
    _write_parquet(trials, folder / TRIALS_FILE)
    _write_parquet(layers_frame(study, trials), folder / LAYERS_FILE)
    front = trials[trials["on_front"] & (trials["feasible"] == True)]  # noqa: E712 (nullable column)
    _write_parquet(front, folder / PARETO_FILE)
    _write_best_plans(front, folder / BEST_DIR)
    return trials


def _write_best_plans(front: pd.DataFrame, folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    wanted = set()
    for row in front.itertuples():
        name = f"rank{int(row.rank):03d}_trial{row.trial:05d}.json"
        wanted.add(name)
        metrics = {key: _plain(getattr(row, key)) for key in ("ppl", "kl", "memory_bytes", "bits_per_weight", "latency_ms")}
        payload = {"study": row.study, "trial": int(row.trial), "rank": int(row.rank), "metrics": metrics,
                   "plan": json.loads(row.plan_json)}
        _write_atomic(folder / name, lambda path: Path(path).write_text(json.dumps(payload, indent=1) + "\n"))
    for stale in folder.glob("rank*_trial*.json"):
        if stale.name not in wanted:
            stale.unlink()


def storable(metrics: dict) -> dict:
    """Metrics a storage attribute holds (JSON): non-finite floats become strings."""
    return {key: (value if not isinstance(value, float) or math.isfinite(value) else str(value))
            for key, value in metrics.items()}


def _plain(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    _write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def _write_atomic(path: Path, write) -> None:
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _has_complete(study: optuna.Study) -> bool:
    return any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
