"""Search quality: which method finds the best (memory, perplexity) front in the same number of trials.

Methods, each run as a real study (Optuna + Ray workers + Parquet) on the same model, data and space:
- uniform: every layer alike (granularity `model`), NSGA-II over those plans: the baseline users start from;
- nsga2:   per-block plans, plain NSGA-II (no seeds, no profile);
- tpe:     per-block plans, plain multivariate TPE;
- guided:  per-block plans, NSGA-II with the sensitivity profile: knapsack seeds per budget, uniform
           seeds, budget-preserving children (the product's default).

Quality is the hypervolume of the feasible front in (memory / 16-bit memory, perplexity), computed with
Optuna's own hypervolume function against the fixed reference point (1.0, REF_PPL_RATIO x base ppl).
`trials_to_beat_uniform` is the first trial count at which a method's front has a larger hypervolume
than the front of *every* uniform plan of the space (measured exhaustively once); `repeated_plans`
counts trials that measured a plan an earlier trial of the study had already measured;
`hypervolume_16` is the front's after 16 trials; `collapsed_trials` those whose perplexity exceeds 10x
the base model's (they teach the search nothing); `first_result_s` the seconds from `submit` to the
first finished trial (cold profile cache unless `--cache-dir` holds one); `estimate_error` the median
|ln(measured KL / profile estimate)| over the trials that have both, and `corrected_estimate_error`
the same for the estimate corrected by the trials before each one (`guided.Calibration`, as the
guided children use it).

Writes benchmarks/results/search.csv and search_bpw.csv (rows of the space, methods and seeds run replace
theirs; the others are kept) and prints the tables.

    python benchmarks/search.py --space quant --trials 32 --seeds 0 1 2 [--workdir DIR to resume an interrupted run]
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when Ray is imported: loopback only

import numpy as np
import optuna
import pandas as pd
import ray

from common import merged_rows
from compsearch.search.commands import RunOptions, submit
from compsearch.search.calibration import Calibration
from compsearch.search.optuna_internals import hypervolume as front_hypervolume
from compsearch.search.runner import start_ray
from compsearch.search.spec import JobSpec
from compsearch.search.study import BASE_METRICS_ATTR

RESULTS = Path(__file__).parent / "results"
REF_PPL_RATIO = 3.0  # plans worse than 3x the base perplexity add nothing to the hypervolume
COLLAPSED_PPL_RATIO = 10.0  # a trial past 10x the base perplexity is a collapsed model
METHODS = {
    "uniform": dict(granularity="model", guided=False, uniform_seeds=False),
    "nsga2": dict(guided=False, uniform_seeds=False),
    "tpe": dict(sampler="tpe", guided=False, uniform_seeds=False),
    "guided": dict(guided=True, uniform_seeds=True),
}
# Rows of methods that no longer run, kept for comparison: the guided search as it was before the quality
# floor, uniform-first seeds and calibrated children (its numbers from its own run, 2026-12-01), as it
# was at ee036b0 (4 ranked children, 4 uniform seeds, no optimism; its run of 2026-12-02), at d581bc9
# (children ranked in perplexity, no crowding), at 6b7f789 (no gap-filling candidates; its run of
# 2026-12-07) and at d553d56 (a quarter of the trials seeds, placed by the uncorrected estimate; run
# 2026-12-07 on the machine of the current rows, `quant` and `sota`) and at 8d0de3e (children predicted by
# the one calibration curve, no correction by size; run 2026-12-07/08, same machine). The `sota` rows of
# guided-before were run 2026-12-08 from a worktree at 4865b2a (its benchmark's run_method; no exhaustive
# uniform reference).
KEPT_METHODS = ("guided-before", "guided-ee036b0", "guided-d581bc9", "guided-6b7f789", "guided-d553d56",
                "guided-8d0de3e")
BPW_TARGETS = (3.0, 2.5)
UNIFORM_ALL_MAX = 64  # spaces with more uniform plans than this (sota: 480) get no exhaustive uniform reference


def hypervolume(trials: pd.DataFrame, base_bytes: int, reference: np.ndarray) -> float:
    done = trials[(trials["state"] == "COMPLETE")]
    if done.empty:
        return 0.0
    points = np.column_stack([done["memory_bytes"] / base_bytes, done["ppl"]])
    points = points[(points < reference).all(axis=1)]
    return front_hypervolume(points, reference) if len(points) else 0.0


def run_method(name: str, seed: int, args, workdir: Path) -> tuple[pd.DataFrame, optuna.Study, float | None]:
    """The method's study and its trials, run now or, when `workdir` already holds it finished, read back
    (then its time to the first result is unknown)."""
    spec = JobSpec(study=f"{name}-s{seed}", space=args.space, seed=seed, population_size=args.population,
                   eval_windows=args.eval_windows, calib_windows=args.calib_windows, **METHODS[name])
    options = RunOptions(results_dir=workdir, workers=args.workers, cache_dir=args.cache_dir)
    finished = workdir / spec.study / "trials.parquet"
    first_result_s = None
    if finished.exists() and len(pd.read_parquet(finished)) >= args.trials:
        trials = pd.read_parquet(finished)
    else:
        submitted = pd.Timestamp.now()  # naive local time, as Optuna stamps the trials
        trials = submit(spec, args.trials, options, force=True)
        first_result_s = (trials["finished_at"].min() - submitted).total_seconds()
    study = optuna.load_study(study_name=spec.study, storage=options.storage_url(spec.study))
    return trials.sort_values("trial"), study, first_result_s


def estimate_errors(trials: pd.DataFrame) -> tuple[float | None, float | None]:
    """Median |ln(measured / estimated KL)| of the profile's estimate, and of the estimate corrected by
    the trials before each one; None without estimates (unguided methods)."""
    if "estimated_kl" not in trials:
        return None, None
    estimated, measured = (pd.to_numeric(trials[c], errors="coerce") for c in ("estimated_kl", "kl"))  # "nan": NaN
    done = (trials["state"] == "COMPLETE") & estimated.gt(0) & measured.gt(0)
    if not done.any():
        return None, None
    pairs = list(zip(estimated[done], measured[done]))
    raw = [abs(np.log(measured / estimated)) for estimated, measured in pairs]
    corrected = [abs(np.log(measured / Calibration.fit(pairs[:i])(estimated)))
                 for i, (estimated, measured) in enumerate(pairs)]
    return float(np.median(raw)), float(np.median(corrected))


def uniform_reference(args, workdir: Path) -> pd.DataFrame | None:
    """Every uniform plan of the space, evaluated once (the best a user can do by hand); None when the space
    has more than `UNIFORM_ALL_MAX` of them."""
    spec = JobSpec(study="uniform-all", space=args.space, granularity="model", guided=False, uniform_seeds=False,
                   sampler="random", eval_windows=args.eval_windows, calib_windows=args.calib_windows)
    choices = list(spec.search_space().uniform_choices())
    if len(choices) > UNIFORM_ALL_MAX:
        print(f"{len(choices)} uniform plans in {args.space!r}: not all measured (no trials_to_beat_uniform)")
        return None
    options = RunOptions(results_dir=workdir, workers=args.workers, cache_dir=args.cache_dir)

    def enqueue_all(ctx, study, _requeued):
        for choice in choices:
            study.enqueue_trial(ctx.space.params_for({"model": choice}), skip_if_exists=True)

    options.on_ready = enqueue_all
    finished = workdir / spec.study / "trials.parquet"
    if finished.exists() and len(pd.read_parquet(finished)) >= len(choices):
        return pd.read_parquet(finished)
    return submit(spec, len(choices), options, force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--space", default="quant")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder of the studies; finished ones found there are read back, not re-run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start_ray(None, args.workers)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="compsearch-bench-"))
    print(f"studies in {workdir}")

    uniform = uniform_reference(args, workdir)
    if uniform is not None:
        print(f"every uniform plan ({len(uniform)}) measured")
    rows, bpw_rows = [], []
    for name in args.methods:
        for seed in args.seeds:
            trials, study, first_result_s = run_method(name, seed, args, workdir)
            base_bytes, base_ppl = study.user_attrs["base_bytes"], study.user_attrs[BASE_METRICS_ATTR]["ppl"]
            reference = np.array([1.0, REF_PPL_RATIO * base_ppl])
            uniform_hv = hypervolume(uniform, base_bytes, reference) if uniform is not None else None
            hv = [hypervolume(trials.head(n), base_bytes, reference) for n in range(1, len(trials) + 1)]
            beat = next((n for n, value in enumerate(hv, 1) if value > uniform_hv + 1e-12), None) \
                if uniform_hv is not None else None
            repeated = int(trials.loc[trials["state"] == "COMPLETE", "plan_json"].duplicated().sum())
            collapsed = int(((trials["state"] == "COMPLETE") & (trials["ppl"] > COLLAPSED_PPL_RATIO * base_ppl)).sum())
            raw_error, corrected_error = estimate_errors(trials)
            search_s = (trials["finished_at"].max() - trials["started_at"].min()).total_seconds()
            rows.append({"space": args.space, "method": name, "seed": seed, "trials": len(trials), "hypervolume": hv[-1],
                         "hypervolume_16": hv[min(16, len(hv)) - 1], "trials_to_beat_uniform": beat,
                         "repeated_plans": repeated, "collapsed_trials": collapsed, "first_result_s": first_result_s,
                         "estimate_error": raw_error, "corrected_estimate_error": corrected_error,
                         "search_s": search_s, "profile_s": study.user_attrs.get("profile_s", 0.0)})
            for target in BPW_TARGETS:
                bpw_rows.append({"space": args.space, "method": name, "seed": seed, "bpw_target": target,
                                 "best_ppl": _best_ppl_at(trials, target)})
            print(rows[-1], flush=True)
    for target in BPW_TARGETS if uniform is not None else ():  # the best uniform plan at the same or larger size
        bigger = uniform[(uniform["state"] == "COMPLETE") & (uniform["bits_per_weight"] >= target)]
        smallest = bigger.sort_values("bits_per_weight").head(1)
        bpw_rows.append({"space": args.space, "method": "uniform-all", "seed": -1, "bpw_target": target,
                         "best_ppl": float(smallest["ppl"].iloc[0]) if len(smallest) else None,
                         "uniform_bpw": float(smallest["bits_per_weight"].iloc[0]) if len(smallest) else None})
    RESULTS.mkdir(exist_ok=True)
    table = _merged(RESULTS / "search.csv", pd.DataFrame(rows))
    bpw = _merged(RESULTS / "search_bpw.csv", pd.DataFrame(bpw_rows))
    print("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\n" + table.groupby(["space", "method"])[["hypervolume", "hypervolume_16", "trials_to_beat_uniform", "repeated_plans",
                                          "collapsed_trials", "first_result_s", "estimate_error",
                                          "corrected_estimate_error", "search_s", "profile_s"]].mean().to_string())
    print("\n" + bpw.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    ray.shutdown()


def _merged(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """`new` written over the rows of the same (space, method, seed) in the CSV at `path`; the others kept."""
    key = ["space", "method", "seed"]
    table = merged_rows(path, new, key)
    order = {name: index for index, name in enumerate([*METHODS, *KEPT_METHODS, "uniform-all"])}
    table = table.sort_values(key, key=lambda col: col.map(order) if col.name == "method" else col)
    table.to_csv(path, index=False)
    return table


def _best_ppl_at(trials: pd.DataFrame, bpw_target: float) -> float | None:
    fit = trials[(trials["state"] == "COMPLETE") & (trials["bits_per_weight"] <= bpw_target)]
    return float(fit["ppl"].min()) if len(fit) else None


if __name__ == "__main__":
    main()
