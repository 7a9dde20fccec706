"""Throughput and machinery overhead of the Ray + Optuna + Parquet runner on the default model.

The same study (same spec and seed) runs twice as a real study, with 1 and with 2 workers, on a
local Ray instance. Printed per run:
- trials/min over the trial phase (first trial start to last trial end: model loading excluded),
  and the 2-worker / 1-worker ratio;
- overhead per trial: everything that is not the worker's compress + evaluate, as a fraction of the
  trial's wall time. `in-trial` is Optuna's ask -> tell span minus compress + evaluate (dispatch,
  result transfer, storage writes); `cycle` (1 worker only) is start-to-next-start minus compress +
  evaluate, so it also holds the driver's Parquet rewrite and the next ask between trials.

    python benchmarks/cluster.py                      # SmolLM2-135M, 8 eval windows, 8 trials
    python benchmarks/cluster.py --model /path --trials 16 --workers 1 2 4 --gpus-per-worker 0.5
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when Ray is imported: loopback only

import pandas as pd

from compsearch.search.commands import RunOptions, submit
from compsearch.search.results import write_results
from compsearch.search.study import default_storage_url, load_study, open_storage
from compsearch.search.spec import DEFAULT_MODEL, JobSpec


def run_once(args: argparse.Namespace, workers: int, folder: Path) -> dict:
    """One study with `workers` workers; returns its throughput and overhead figures."""
    spec = JobSpec(study=f"bench-w{workers}", model=args.model, eval_windows=args.eval_windows,
                   calib_windows=args.eval_windows, seed=0, guided=False, memory_budget=args.memory_budget)
    started = time.perf_counter()
    trials = submit(spec, args.trials, RunOptions(results_dir=folder, workers=workers,
                                                  gpus_per_worker=args.gpus_per_worker), force=True)
    wall = time.perf_counter() - started
    done = trials[trials["state"].isin(["COMPLETE", "FAIL"]) & trials["compress_s"].notna()].sort_values("started_at")
    compute = done["compress_s"] + done["evaluate_s"]
    span = (done["finished_at"].max() - done["started_at"].min()).total_seconds()
    in_trial = (done["trial_s"] - compute) / done["trial_s"]
    row = {"workers": workers, "trials": len(done), "wall_s": wall, "trial_phase_s": span,
           "trials_per_min": len(done) / span * 60, "compute_s_median": compute.median(),
           "trial_s_median": done["trial_s"].median(), "overhead_in_trial_median": in_trial.median()}
    study, _ = load_study(spec.study, open_storage(default_storage_url(folder, spec.study)))
    rewrite = time.perf_counter()
    write_results(study, folder)  # what the driver does after every trial, at the study's final size
    row["parquet_rewrite_s"] = time.perf_counter() - rewrite
    if workers == 1:
        cycle = done["started_at"].diff().dt.total_seconds().shift(-1)  # start to the next trial's start
        row["overhead_cycle_median"] = ((cycle - compute) / cycle).dropna().median()
        row["overhead_cycle_s_median"] = (cycle - compute).dropna().median()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--memory-budget", default="0.35")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="compsearch-bench-") as folder:
        rows = [run_once(args, workers, Path(folder)) for workers in args.workers]
    table = pd.DataFrame(rows)
    table["speedup_vs_first"] = table["trials_per_min"] / table["trials_per_min"].iloc[0]
    pd.set_option("display.width", 200)
    print(f"\nmodel {args.model}, {args.eval_windows} eval windows, {args.trials} trials, "
          f"{args.gpus_per_worker or 0} GPUs per worker, {os.cpu_count()} CPU cores")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
