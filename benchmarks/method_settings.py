"""Method settings benchmark: GPTQ's damping and group-range fitting, SparseGPT's damping and refit.

Every Linear of the default model compressed one-shot (GPTQ 3-bit and 4-bit g128; SparseGPT 50% and 2:4)
under one setting changed at a time from the defaults (`gptq.DAMPING`, `quantize.CLIP_FRACTIONS` with the
Hessian's diagonal as importance, `sparsegpt.REFIT_ITERATIONS` / `REFIT_DAMPING`), scored on the
evaluation windows (the protocol of `methods.py`) and on validation windows: calibration-split windows
past the ones calibrated on (windows 128-159), which choose settings without looking at the evaluation
split. Prints a table and writes benchmarks/results/method_settings.csv.

    python benchmarks/method_settings.py [--calib-windows 16] [--eval-windows 8]
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

from common import default_model_and_windows, write_table  # noqa: E402
from compsearch.compress import input_hessians  # noqa: E402
from compsearch.compress.gptq import DAMPING, inverse_hessian_factor, quantize_gptq  # noqa: E402
from compsearch.compress.matrix import MatrixStats  # noqa: E402
from compsearch.compress.sparsegpt import REFIT_DAMPING, REFIT_ITERATIONS, prune_sparsegpt, refit_kept  # noqa: E402
from compsearch.evaluators.quality import perplexity_and_kl  # noqa: E402
from compsearch.spaces.layers import linear_layers  # noqa: E402

VALIDATION = slice(128, 160)  # calibration-split windows no calibration size up to 128 reads


def gptq(bits: int, damping: float = DAMPING, fitted: bool = True):
    def compress(weight, hessian):
        order = MatrixStats(hessian=hessian).activation_order()
        factor = inverse_hessian_factor(hessian[order][:, order], damping)
        return quantize_gptq(weight, bits, 128, factor, order, torch.diagonal(hessian) if fitted else None).dequantize()
    return compress


def sparsegpt(pattern: str, damping: float = DAMPING, iterations: int = REFIT_ITERATIONS,
              refit_damping: float = REFIT_DAMPING):
    def compress(weight, hessian):
        values, mask = prune_sparsegpt(weight, 0.5, pattern, inverse_hessian_factor(hessian, damping), hessian, 0)
        return refit_kept(weight.float(), mask, hessian, iterations, refit_damping) if iterations else values
    return compress


SETTINGS = [
    ("gptq 4-bit g128", "defaults", gptq(4)),
    ("gptq 4-bit g128", "full group ranges (no fitting)", gptq(4, fitted=False)),
    *[("gptq 4-bit g128", f"damping {d}", gptq(4, damping=d)) for d in (0.001, 0.003, 0.03, 0.1)],
    ("gptq 3-bit g128", "defaults", gptq(3)),
    ("gptq 3-bit g128", "full group ranges (no fitting)", gptq(3, fitted=False)),
    *[("gptq 3-bit g128", f"damping {d}", gptq(3, damping=d)) for d in (0.003, 0.03)],
    ("sparsegpt 50%", "defaults", sparsegpt("unstructured")),
    ("sparsegpt 50%", "no refit", sparsegpt("unstructured", iterations=0)),
    *[("sparsegpt 50%", f"refit {n} steps", sparsegpt("unstructured", iterations=n)) for n in (5, 20, 50)],
    *[("sparsegpt 50%", f"refit damping {d}", sparsegpt("unstructured", refit_damping=d)) for d in (0.01, 0.1)],
    ("sparsegpt 50%", "damping 0.03", sparsegpt("unstructured", damping=0.03)),
    ("sparsegpt 2:4", "defaults", sparsegpt("2:4")),
    ("sparsegpt 2:4", "no refit", sparsegpt("2:4", iterations=0)),
    *[("sparsegpt 2:4", f"refit {n} steps", sparsegpt("2:4", iterations=n)) for n in (5, 20)],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "method_settings.csv")
    args = parser.parse_args()
    if args.calib_windows > VALIDATION.start:
        parser.error(f"--calib-windows {args.calib_windows}: at most {VALIDATION.start}, so the validation windows stay unseen")
    model, _, windows = default_model_and_windows(args.seq_len, args.eval_windows, VALIDATION.stop)
    calib_ids, validation_ids = windows.calib_ids[:args.calib_windows], windows.calib_ids[VALIDATION]
    names = [layer.name for layer in linear_layers(model)]
    hessians = input_hessians(model, calib_ids, names, args.batch_size)
    rows = []
    for method, setting, compress in SETTINGS:
        compressed = copy.deepcopy(model)
        started = time.perf_counter()
        for name in names:
            linear = compressed.get_submodule(name)
            linear.weight.data = compress(linear.weight.data.float(), hessians[name]).to(linear.weight.dtype)
        compress_s = time.perf_counter() - started
        rows.append({"method": method, "setting": setting, "calib_windows": args.calib_windows,
                     "ppl": round(perplexity_and_kl(compressed, windows.eval_ids, args.batch_size)["ppl"], 3),
                     "validation_ppl": round(perplexity_and_kl(compressed, validation_ids, args.batch_size)["ppl"], 3),
                     "compress_s": round(compress_s, 1)})
        print(rows[-1], flush=True)
        pd.DataFrame(rows).to_csv(args.out, index=False)  # a stopped run keeps what it measured
    print(f"\nSmolLM2-135M, {args.calib_windows} x {args.seq_len} calibration windows, {args.eval_windows} evaluation "
          f"windows, {VALIDATION.stop - VALIDATION.start} validation windows (calibration split {VALIDATION.start}-{VALIDATION.stop - 1})\n")
    write_table(pd.DataFrame(rows), args.out)


if __name__ == "__main__":
    main()
