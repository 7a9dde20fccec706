"""Calibration memory benchmark: does a 1B model's calibration fit this machine?

Builds a model of a given Llama shape with random weights (the memory and time of calibration depend
on shapes, not values; no download needed), runs the calibration statistics a worker gathers once
(input norms and X^T X per distinct Linear input, hooks batch by batch over the default data's
calibration split) and compresses one decoder block with the Hessian methods (GPTQ 4-bit, a third
of the heads removed, whitened low-rank of the MLP). Prints a table of time and peak resident memory
per phase and writes it to benchmarks/results/calibration_memory.csv.

    python benchmarks/calibration_memory.py [--shape llama-3.2-1b] [--calib-windows 16] [--seq-len 256]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from common import GIB, reset_peak_rss, rss_gib, write_table  # noqa: E402
from compsearch.compress import apply_plan_, input_hessians, input_norms  # noqa: E402
from compsearch.evaluators.data import load_text, make_windows  # noqa: E402
from compsearch.search.models import load_tokenizer, resolve_model  # noqa: E402
from compsearch.spaces.layers import count_params, linear_layers  # noqa: E402
from compsearch.spaces.plan import ATTENTION_KINDS, LayerPlan, Plan  # noqa: E402

# Published configurations (config.json of each checkpoint), tied embeddings as released.
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),
}


def phase(rows: list[dict], name: str, work) -> object:
    reset_peak_rss()
    started = time.perf_counter()
    result = work()
    rows.append({"phase": name, "seconds": round(time.perf_counter() - started, 1),
                 "peak_rss_gib": round(rss_gib("VmHWM"), 2), "rss_after_gib": round(rss_gib("VmRSS"), 2)})
    print(rows[-1], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "calibration_memory.csv")
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    rows: list[dict] = []
    text, source = load_text(None)
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))  # its ids fit both vocabularies
    windows = make_windows(tokenizer, text, source, args.seq_len, 1, args.calib_windows)
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096)
    model = phase(rows, "build model (float32)", lambda: LlamaForCausalLM(config).eval())
    layers = linear_layers(model)
    names = [layer.name for layer in layers]
    norms = phase(rows, "input norms", lambda: input_norms(model, windows.calib_ids, names, args.batch_size))
    hessians = phase(rows, "input Hessians", lambda: input_hessians(model, windows.calib_ids, names, args.batch_size))
    distinct = {id(h): h for h in hessians.values()}
    statistics_gib = sum(h.numel() * h.element_size() for h in distinct.values()) / GIB
    block = [layer for layer in layers if layer.block == "model.layers.0"]
    plan = Plan({layer.name: LayerPlan(bits=4, quant_method="gptq",
                                       head_fraction=2 / 3 if layer.kind in ATTENTION_KINDS else 1.0,
                                       rank_fraction=0.5 if layer.kind == "down_proj" else 1.0, lowrank_method="whiten")
                 for layer in block})
    phase(rows, "compress block 0 (GPTQ 4-bit, heads -33%, whitened down)",
          lambda: apply_plan_(model, plan, norms, hessians=hessians))  # in place: the base is not needed after
    table = pd.DataFrame(rows)
    table.insert(0, "shape", args.shape)
    table["params_b"] = round(count_params(model) / 1e9, 3)
    table["calib_tokens"] = windows.calib_ids.numel()
    table["statistics_gib"] = round(statistics_gib, 2)
    table["threads"] = torch.get_num_threads()
    write_table(table, args.out)


if __name__ == "__main__":
    main()
