"""Trial time with compressed-layer variants kept on disk (`compress.variants.VariantStore`) and without.

Studies of one space on the default model, the same trial count and workers, each with a fresh worker
pool (so each worker's memory cache starts empty):
- off:  no store (only each worker's memory cache, as before the store), seed 0;
- cold: an empty store, seed 0: what the first study of a model pays to fill it;
- warm: seed 1 (other plans), reading the store the cold study filled;
- off-1: no store, seed 1: the warm study's plans without it.
A study's sensitivity profile is measured with its trials' variants too: `off` and `cold` measure it (each
their own cache folder), `warm` and `off-1` read their folder's profile, so their compress seconds are the
trials' alone. Prints compress seconds per trial (mean, median), profile and study seconds, the store's
files and bytes, and writes benchmarks/results/variant_store.csv.

    python benchmarks/variant_store.py --space sota --trials 16 [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when Ray is imported: loopback only

import pandas as pd

from compsearch.paths import default_cache_dir
from compsearch.search.commands import RunOptions, submit
from compsearch.search.runner import start_ray
from compsearch.search.spec import JobSpec

RESULTS = Path(__file__).parent / "results"
STUDIES = (("off", 0, False), ("cold", 0, True), ("warm", 1, True), ("off-1", 1, False))


def store_contents(cache_dir: Path) -> tuple[int, int]:
    """(files, bytes) of the variant store folders under `cache_dir`."""
    files = list((cache_dir / "variants").glob("*/*.safetensors"))
    return len(files), sum(path.stat().st_size for path in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="sota")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "variant_store.csv")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="variant-store-"))
    caches = {True: workdir / "cache-store", False: workdir / "cache-off"}
    for cache in caches.values():  # the converted default model is reused; profiles and variants are not
        (cache / "models").mkdir(parents=True)
        for model in (default_cache_dir() / "models").iterdir():
            (cache / "models" / model.name).symlink_to(model)
    start_ray(None, args.workers)
    rows = []
    for name, seed, stored in STUDIES:
        os.environ["COMPSEARCH_VARIANT_CACHE_GB"] = "8" if stored else "0"
        spec = JobSpec(study=name, space=args.space, seed=seed)
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
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"\n{table.to_string(index=False)}\n\nwrote {args.out} (load: {os.getloadavg()[0]:.1f})")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
