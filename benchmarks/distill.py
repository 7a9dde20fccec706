"""Distillation benchmark: how much perplexity `export --distill-steps` recovers, per kind of plan.

SmolLM2-135M, the default data: distillation trains on the calibration split (16 x 256 tokens),
perplexity is measured on the evaluation split (8 x 256 tokens), before and after. Plans: 3-bit
GPTQ g128 everywhere (only scales and norms train), 2:4 SparseGPT everywhere (16-bit pruned weights
train, masks fixed), half the MLP channels removed, and a third of the heads plus a quarter of the
MLP channels removed. Prints a table and writes benchmarks/results/distill.csv.

    python benchmarks/distill.py [--steps 30]
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

from compsearch.compress import apply_plan_, input_hessians, plan_nbytes  # noqa: E402
from compsearch.compress.distill import DistillSettings, distill_  # noqa: E402
from common import default_model_and_windows, write_table  # noqa: E402
from compsearch.evaluators.quality import perplexity_and_kl  # noqa: E402
from compsearch.spaces.layers import count_params, linear_layers  # noqa: E402
from compsearch.spaces.plan import ATTENTION_KINDS, LayerPlan, Plan  # noqa: E402

MLP_KINDS = ("gate_proj", "up_proj", "down_proj")


def plans(layers) -> dict[str, Plan]:
    names = [layer.name for layer in layers]
    mlp = [layer.name for layer in layers if layer.kind in MLP_KINDS]
    attention = [layer.name for layer in layers if layer.kind in ATTENTION_KINDS]
    return {
        "gptq 3-bit g128": Plan.uniform(names, LayerPlan(bits=3, group_size=128, quant_method="gptq")),
        "sparsegpt 2:4": Plan.uniform(names, LayerPlan(sparsity=0.5, pattern="2:4", prune_method="sparsegpt")),
        "MLP channels -50%": Plan.uniform(mlp, LayerPlan(channel_fraction=0.5)),
        "heads -33% + MLP -25%": Plan({**{name: LayerPlan(head_fraction=2 / 3) for name in attention},
                                       **{name: LayerPlan(channel_fraction=0.75) for name in mlp}}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill.csv")
    args = parser.parse_args()

    base, _, windows = default_model_and_windows(args.seq_len, args.eval_windows, args.calib_windows)
    layers = linear_layers(base)
    hessians = input_hessians(base, windows.calib_ids, [layer.name for layer in layers], args.batch_size)
    settings = DistillSettings(steps=args.steps, batch_size=args.batch_size)
    base_ppl = perplexity_and_kl(base, windows.eval_ids, args.batch_size)["ppl"]
    rows = []
    for name, plan in plans(layers).items():
        model = copy.deepcopy(base)
        stored = apply_plan_(model, plan, keep_stored=True, hessians=hessians).stored
        before = perplexity_and_kl(model, windows.eval_ids, args.batch_size)["ppl"]
        started = time.perf_counter()
        losses = distill_(model, base, stored, windows.calib_ids, settings)
        seconds = time.perf_counter() - started
        after = perplexity_and_kl(model, windows.eval_ids, args.batch_size)["ppl"]
        rows.append({"plan": name, "plan_bytes": plan_nbytes(layers, plan, count_params(base)),
                     "base_ppl": round(base_ppl, 3), "ppl_before": round(before, 3), "ppl_after": round(after, 3),
                     "steps": args.steps, "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4),
                     "distill_s": round(seconds, 1), "threads": torch.get_num_threads()})
        print(rows[-1], flush=True)
    write_table(pd.DataFrame(rows), args.out)


if __name__ == "__main__":
    main()
