"""The predicted sensitivity profile against the fully measured one.

A study's profile is the KL each option does to each decision group alone. Measured in full, every
option costs a forward pass of the whole model; predicted (the default), one option per group and
factor is measured and the others are scaled from it by their relative block output error, which
costs only the changed blocks (`compsearch/search/sensitivity.py`). Both are made here from empty
caches on fresh Ray workers of the same kind, one after the other, for the README demo's job (default model,
`joint` space, block granularity), and compared option by option: Spearman rank correlation, the
median and 90th percentile of |log(predicted / measured)| over options with a measured KL above
the noise floor, how many KLs each measured, and the wall time.

    python benchmarks/sensitivity_profile.py [--space joint] [--workers 2]

Writes benchmarks/results/sensitivity_profile.csv (the rows of other spaces kept), one row per way of making the profile (space,way,groups,
options,kl_measured,seconds,load; the predicted row also spearman,median_log_error,p90_log_error).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from common import merged_rows, write_table  # noqa: E402
from compsearch.search.job import prepare_job  # noqa: E402
from compsearch.search.runner import start_ray, start_workers  # noqa: E402
from compsearch.search.sensitivity import (  # noqa: E402
    NOISE_KL, SensitivityCache, cache_path, measure_profile, profile_cells,
)
from compsearch.search.spec import JobSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", default="joint")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sensitivity_profile.csv")
    args = parser.parse_args()
    ctx = prepare_job(JobSpec(study="profile-bench", space=args.space, memory_budget="0.5"))
    start_ray(None, args.workers)
    rows, profiles = [], {}
    for way, predict in (("measured", False), ("predicted", True)):
        # Fresh workers for each way (a worker keeps compressed variants and factorizations it made), made
        # ready (model, base log-probs, block replay) before the clock starts.
        pool = start_workers(ctx, args.workers, 1)
        ray.get([worker.profile_kl.remote([], ctx.spec.profile_windows, ctx.spec.profile_seq_len) for worker in pool])
        with tempfile.TemporaryDirectory() as cache_dir:
            profile, seconds = measure_profile(ctx, pool, Path(cache_dir), predict=predict)
            cache = SensitivityCache(cache_path(ctx, Path(cache_dir)))
            plans = {plan for options in profile_cells(ctx.space, ctx.space.groups(ctx.layers)).values()
                     for plan in options.values()}
            measured = sum(cache.key(plan) in cache.values for plan in plans)
        for worker in pool:
            ray.kill(worker)
        profiles[way] = profile.options()
        rows.append({"space": args.space, "way": way, "groups": len(profile.kl), "options": len(profiles[way]),
                     "kl_measured": measured, "seconds": round(seconds, 1), "load": round(os.getloadavg()[0], 2)})
    keys = sorted(profiles["measured"])
    full = np.array([profiles["measured"][k] for k in keys])
    guess = np.array([profiles["predicted"][k] for k in keys])
    above = full > NOISE_KL
    log_error = np.abs(np.log(np.maximum(guess[above], 1e-12) / full[above]))
    rows[1].update(spearman=round(float(spearmanr(full, guess).statistic), 4),
                   median_log_error=round(float(np.median(log_error)), 3),
                   p90_log_error=round(float(np.quantile(log_error, 0.9)), 3))
    write_table(merged_rows(args.out, pd.DataFrame(rows), ["space"]), args.out)  # the other spaces' rows stay


if __name__ == "__main__":
    main()
