"""Calibration size benchmark: what more calibration windows buy, and what they cost.

For each calibration size (windows of 256 tokens from the calibration split, each size the first N of
the same windows), on the default model: the one-shot statistics pass every worker runs once (input
X^T X per distinct Linear input, hooks batch by batch: seconds and the resident memory it adds), then GPTQ
3-bit and 4-bit g128, SparseGPT 50% and 2:4 and Wanda 50% of every Linear with those statistics:
perplexity on the evaluation windows (the project's protocol) and compress seconds. Prints a table and
writes benchmarks/results/calibration_size.csv; the README's default (`JobSpec.calib_windows`) is chosen
from it.

    python benchmarks/calibration_size.py [--windows 16,32,64,128] [--eval-windows 8]
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from common import default_model_and_windows, reset_peak_rss, rss_gib, write_table  # noqa: E402
from compsearch.compress import apply_plan_, input_statistics  # noqa: E402
from compsearch.evaluators.quality import perplexity_and_kl  # noqa: E402
from compsearch.spaces.layers import linear_layers  # noqa: E402
from compsearch.spaces.plan import LayerPlan, Plan  # noqa: E402

METHODS = {
    "gptq 3-bit g128": LayerPlan(bits=3, group_size=128, quant_method="gptq"),
    "gptq 4-bit g128": LayerPlan(bits=4, group_size=128, quant_method="gptq"),
    "sparsegpt 50%": LayerPlan(sparsity=0.5, prune_method="sparsegpt"),
    "sparsegpt 2:4": LayerPlan(sparsity=0.5, pattern="2:4", prune_method="sparsegpt"),
    "wanda 50%": LayerPlan(sparsity=0.5, prune_method="wanda"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", default="16,32,64,128", help="calibration sizes, in windows")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "calibration_size.csv")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.windows.split(","))
    model, _, windows = default_model_and_windows(args.seq_len, args.eval_windows, sizes[-1])
    names = [layer.name for layer in linear_layers(model)]
    base_ppl = perplexity_and_kl(model, windows.eval_ids, args.batch_size)["ppl"]
    rows = []
    for size in sizes:
        calib_ids = windows.calib_ids[:size]
        reset_peak_rss()
        before_gib = rss_gib("VmRSS")
        started = time.perf_counter()
        norms, hessians = input_statistics(model, calib_ids, names, args.batch_size)
        statistics = {"calib_windows": size, "calib_tokens": calib_ids.numel(),
                      "statistics_s": round(time.perf_counter() - started, 1),
                      "statistics_added_gib": round(rss_gib("VmHWM") - before_gib, 2)}
        for method, layer_plan in METHODS.items():
            compressed = copy.deepcopy(model)
            started = time.perf_counter()
            apply_plan_(compressed, Plan.uniform(names, layer_plan), norms, hessians=hessians)
            compress_s = time.perf_counter() - started
            ppl = perplexity_and_kl(compressed, windows.eval_ids, args.batch_size)["ppl"]
            rows.append({**statistics, "method": method, "ppl": round(ppl, 3), "base_ppl": round(base_ppl, 3),
                         "compress_s": round(compress_s, 1), "threads": torch.get_num_threads()})
            print(rows[-1], flush=True)
            pd.DataFrame(rows).to_csv(args.out, index=False)  # a stopped run keeps what it measured
        del hessians, norms
    print(f"\nSmolLM2-135M, {args.eval_windows} x {args.seq_len}-token eval windows; statistics_added_gib: resident "
          "memory the statistics pass added, at its peak, to what the process held before it (the statistics of "
          "the size before are freed first, so 0 means no more than that size needed)\n")
    write_table(pd.DataFrame(rows), args.out)


if __name__ == "__main__":
    main()
