"""Trial time with compressed-layer variants kept on disk (`compress.variants.VariantStore`) and without.

Studies of one space on the default model, the same trial count and workers, each with a fresh worker
pool (so each worker's memory cache starts empty):
- off:  no store (only each worker's memory cache, as before the store), seed 0;
- cold: an empty store, seed 0: what the first study of a model pays to fill it;
- warm: seed 1 (other plans), reading the store the cold study filled;
- off-1: no store, seed 1: the warm study's plans without it.
`off` and `cold` measure the sensitivity profile (each in its own cache folder), which compresses every
(layer, option) variant once and so fills each worker's memory cache and, in `cold`, the store; `warm`
and `off-1` read their folder's profile and start with empty memory caches: they compare the trials of a
resumed or later study with and without the store. Prints compress seconds per trial (mean, median),
study seconds, the store's files and bytes (benchmarks/results/variant_store.csv).

Then the mixed-plan check, on the `warm` study's feasible trials that mix the most distinct layer plans:
the perplexity the trial measured (its plan assembled from stored variants) against the same plan
compressed from scratch with the same one-shot statistics, on the workers' thread count, without any cache
(equal: a variant does not depend on the other layers), and against the plan calibrated in sequence from scratch (each block's
statistics from the compressed blocks before it: what one-shot, cacheable variants give up)
(benchmarks/results/variant_store_mixed.csv).

    python benchmarks/variant_store.py --space sota --trials 8 [--workers 2] [--eval-windows 4]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when Ray is imported: loopback only

import copy

import pandas as pd

from compsearch.compress.sequential import apply_plan_sequentially_
from compsearch.compress.variants import VariantCache
from compsearch.evaluators.quality import perplexity_and_kl
from compsearch.paths import default_cache_dir
from compsearch.search.commands import RunOptions, submit
from compsearch.search.job import prepare_job
from compsearch.search.runner import start_ray
from compsearch.search.spec import JobSpec
from compsearch.search.trial import TrialEvaluator, WorkerSettings
from compsearch.spaces.plan import Plan

RESULTS = Path(__file__).parent / "results"
STUDIES = (("off", 0, False), ("cold", 0, True), ("warm", 1, True), ("off-1", 1, False))


def store_contents(cache_dir: Path) -> tuple[int, int]:
    """(files, bytes) of the variant store folders under `cache_dir`."""
    files = list((cache_dir / "variants").glob("*/*.safetensors"))
    return len(files), sum(path.stat().st_size for path in files)


def mixed_plans(spec: JobSpec, trials: pd.DataFrame, count: int) -> pd.DataFrame:
    """The mixed-plan check (module docstring) on `count` of `trials`: the plans evaluated again by a fresh
    worker (same thread count and batch size: float sums, hence rounding, depend on them) without a store."""
    feasible = trials[(trials["state"] == "COMPLETE") & trials["feasible"].fillna(False).astype(bool)].copy()
    feasible["layer_plans"] = [len(set(Plan.from_json(text).layers.values())) for text in feasible["plan_json"]]
    threads = set(feasible["threads"])
    if len(threads) != 1:
        raise ValueError(f"the trials ran on {sorted(threads)} threads: the check compresses on one count")
    ctx = prepare_job(spec)
    settings = WorkerSettings.for_job(spec, threads=int(threads.pop()), variant_store_bytes=0)
    worker = TrialEvaluator(ctx.model_ref, ctx.windows.eval_ids, ctx.windows.calib_ids, settings)
    rows = []
    for _, trial in feasible.sort_values("layer_plans", ascending=False).head(count).iterrows():
        worker.variants = VariantCache(worker.variants.max_bytes)  # from scratch: nothing kept from the last plan
        scratch_ppl = worker.evaluate(trial["plan_json"])["ppl"]
        in_sequence = copy.deepcopy(worker.model)
        apply_plan_sequentially_(in_sequence, Plan.from_json(trial["plan_json"]), worker.calib_ids, worker.batch_size)
        rows.append({"trial": int(trial["trial"]), "layer_plans": int(trial["layer_plans"]),
                     "bits_per_weight": round(trial["bits_per_weight"], 3), "stored_ppl": round(trial["ppl"], 4),
                     "scratch_ppl": round(scratch_ppl, 4), "in_sequence_ppl": round(
                         perplexity_and_kl(in_sequence, worker.eval_ids, worker.batch_size)["ppl"], 4)})
        print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="sota")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=4, help="evaluation windows per trial (compression is timed)")
    parser.add_argument("--mixed", type=int, default=3, help="plans of the mixed-plan check")
    parser.add_argument("--out", type=Path, default=RESULTS / "variant_store.csv")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="variant-store-"))
    caches = {True: workdir / "cache-store", False: workdir / "cache-off"}
    for cache in caches.values():  # the converted default model is reused; profiles and variants are not
        (cache / "models").mkdir(parents=True)
        for model in (default_cache_dir() / "models").iterdir():
            (cache / "models" / model.name).symlink_to(model)
    start_ray(None, args.workers)
    rows, warm_study = [], None
    for name, seed, stored in STUDIES:
        os.environ["COMPSEARCH_VARIANT_CACHE_GB"] = "8" if stored else "0"
        spec = JobSpec(study=name, space=args.space, seed=seed, eval_windows=args.eval_windows)
        options = RunOptions(results_dir=workdir / "results", workers=args.workers, cache_dir=caches[stored])
        started = time.perf_counter()
        trials = submit(spec, args.trials, options, force=True)
        study_s = time.perf_counter() - started
        files, nbytes = store_contents(caches[True])
        finished = trials[trials["state"] == "COMPLETE"] if "state" in trials else trials
        rows.append({"space": args.space, "study": name, "seed": seed, "store": stored, "trials": len(finished),
                     "compress_s_mean": round(finished["compress_s"].mean(), 2),
                     "compress_s_median": round(finished["compress_s"].median(), 2),
                     "evaluate_s_median": round(finished["evaluate_s"].median(), 2),
                     "study_s": round(study_s, 1), "store_files": files if stored else 0,
                     "store_mb": round(nbytes / 1e6, 1) if stored else 0.0})
        print(rows[-1], flush=True)
        if name == "warm":
            warm_study = (spec, trials)
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"\n{table.to_string(index=False)}\n\nwrote {args.out} (load: {os.getloadavg()[0]:.1f})")
    mixed = mixed_plans(*warm_study, args.mixed)
    mixed_out = args.out.with_name(args.out.stem + "_mixed.csv")
    mixed.to_csv(mixed_out, index=False)
    print(f"\n{mixed.to_string(index=False)}\n\nwrote {mixed_out}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
