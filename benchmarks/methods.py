"""Compression methods benchmark: perplexity of each method at matching size on the default model.

SmolLM2-135M, the default data (pydoc text), calibration on the calibration split (first half of the
tokens), perplexity on the evaluation split (second half). Every compared plan touches the same
layers with the same bytes, so within a group only the method differs:
- quantization of every Linear at 4, 3 and 2 bits, groups of 128: RTN, GPTQ, HQQ-style, k-means
  (k-means has one codebook per row instead of group scales: its bytes are in the table);
- 50% unstructured and 2:4 sparsity of every Linear: magnitude, Wanda, SparseGPT (and OWL's
  non-uniform 50% profile with Wanda);
- the calibrated methods (GPTQ at 4 and 3 bits, SparseGPT, Wanda) also calibrated in sequence
  (setting "... sequential": each block's statistics from the compressed blocks before it,
  `compress.sequential`; its compress_s includes measuring those statistics) against the default
  one-shot statistics of the base model;
- low-rank of the MLP projections: plain SVD vs whitened (SVD-LLM) at equal ranks;
- parameter sharing across layers (family `sharing`): Basis Sharing (runs of 2 or 4 blocks share each
  projection's whitened basis, `LayerPlan.share_blocks`) at the bytes of per-layer whitened and plain
  low-rank, on the MLP projections and on the attention projections (the largest shared rank whose
  bytes do not exceed the per-layer plan's), every projection sharing or only those that read the
  residual stream (methods "... (inputs)": q/k/v, gate/up);
- structured removal of 25% and 50% of every MLP's channels, of a third of the attention heads (one
  of each key/value group's three), and both, with the measured forward time vs the base.
- with `--library llm-compressor`: GPTQ (3 and 4 bits, g128), SparseGPT and Wanda (50%, 2:4) run by
  llm-compressor itself with its defaults (`llmcompressor_run.py`, in the library's own environment, on
  the same calibration windows), scored here by the same protocol (column `library`).
Prints a table and writes benchmarks/results/methods.csv.

    python benchmarks/methods.py [--eval-windows 8] [--calib-windows 16] [--seq-len 256]
    python benchmarks/methods.py --resume --calib-windows 128 --methods gptq,sparsegpt,wanda --one-shot
    python benchmarks/methods.py --resume --library llm-compressor --library-python /tmp/llmc-venv/bin/python

Rows are keyed by library, family, method, setting and `calib_windows`: `--resume` with another calibration
size or library adds rows beside the others. compress_s of a one-shot row leaves out the statistics pass
that all one-shot rows share (printed first); rows in sequence and the library's rows include theirs.
The library's environment: `python -m venv /tmp/llmc-venv && /tmp/llmc-venv/bin/pip install torch==2.13.0
"llmcompressor==0.14.*"`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from compsearch.compress import apply_plan_, input_statistics, plan_bits_per_weight, plan_nbytes  # noqa: E402
from compsearch.compress.owl import owl_plan  # noqa: E402
from compsearch.compress.sequential import apply_plan_sequentially_  # noqa: E402
from common import default_model_and_windows, write_table  # noqa: E402
from compsearch.evaluators.quality import perplexity_and_kl  # noqa: E402
from compsearch.spaces.layers import count_params, linear_layers  # noqa: E402
from compsearch.search.models import resolve_model  # noqa: E402
from compsearch.spaces.plan import ATTENTION_KINDS, LayerPlan, Plan  # noqa: E402

MLP_KINDS = ("gate_proj", "up_proj", "down_proj")
RESIDUAL_WRITERS = ("o_proj", "down_proj")  # read the attention's or the MLP's inner activations
FAMILY_ORDER = {"base": 0, "quant": 1, "sparse": 2, "lowrank": 3, "sharing": 4, "structured": 5}
SEQUENTIAL_METHODS = ("gptq", "sparsegpt", "wanda")  # calibrated: compared one-shot and in sequence
SEQUENTIAL = " sequential"  # the setting's suffix for a plan calibrated in sequence
LIBRARY = "compsearch"
PEER = "llm-compressor"
PEER_METHODS = ("gptq", "sparsegpt", "wanda")  # what `llmcompressor_run.py` runs
PEER_BITS = (3, 4)


def shared_at_bytes(layers, names: list[str], per_layer: Plan, share_blocks: int, total: int) -> Plan:
    """`per_layer` with the layers `names` sharing each projection's whitened basis over runs of `share_blocks`
    blocks, at the largest rank (a multiple of 8) whose bytes do not exceed `per_layer`'s."""
    budget = plan_nbytes(layers, per_layer, total)
    width = min(min(layer.out_features, layer.in_features) for layer in layers if layer.name in names)
    best = None
    for rank in range(8, width, 8):
        shared = Plan({**per_layer.layers, **Plan.uniform(names, LayerPlan(
            rank_fraction=rank / width, lowrank_method="whiten", share_blocks=share_blocks)).layers})
        try:
            if plan_nbytes(layers, shared, total) > budget:
                break
        except ValueError:  # stores more than the dense matrices
            break
        best = shared
    return best


def sharing(layers, total: int) -> list[tuple[str, str, str, Plan]]:
    """Per-layer low-rank (plain, whitened) against Basis Sharing over 2 and 4 blocks at the same bytes: every
    projection sharing, or only those that read the block's normalized residual stream (q/k/v, gate/up;
    o and down keep their own whitened factors)."""
    configs = []
    for part, kinds, fractions in (("MLP", MLP_KINDS, (0.625, 0.5)), ("attention", ATTENTION_KINDS, (0.375,))):
        names = [layer.name for layer in layers if layer.kind in kinds]
        readers = [layer.name for layer in layers if layer.kind in kinds and layer.kind not in RESIDUAL_WRITERS]
        for fraction in fractions:
            setting = f"{part} bytes of rank {fraction}"
            per_layer = {method: Plan.uniform(names, LayerPlan(rank_fraction=fraction, lowrank_method=method))
                         for method in ("svd", "whiten")}
            configs += [("sharing", method, setting, plan) for method, plan in per_layer.items()]
            for blocks in (2, 4):
                configs += [("sharing", f"whiten shared x{blocks}", setting,
                             shared_at_bytes(layers, names, per_layer["whiten"], blocks, total)),
                            ("sharing", f"whiten shared x{blocks} (inputs)", setting,
                             shared_at_bytes(layers, readers, per_layer["whiten"], blocks, total))]
    return configs


def plans(layers, total: int) -> list[tuple[str, str, str, Plan]]:
    """(family, method, setting, plan) for every compared configuration, the most telling first; a
    setting that ends in `SEQUENTIAL` is calibrated in sequence."""
    names = [layer.name for layer in layers]
    mlp = [layer.name for layer in layers if layer.kind in MLP_KINDS]

    def quant(bits: int) -> list:
        return [("quant", method, f"{bits}-bit g128", Plan.uniform(names, LayerPlan(
            bits=bits, group_size=128, quant_method=method))) for method in ("rtn", "gptq", "hqq", "kmeans")]

    def sparse(pattern: str) -> list:
        setting = "50%" if pattern == "unstructured" else pattern
        return [("sparse", method, setting, Plan.uniform(names, LayerPlan(sparsity=0.5, pattern=pattern,
                                                                          prune_method=method)))
                for method in ("magnitude", "wanda", "sparsegpt")]

    # rank 0.75 of a 576x1536 MLP matrix stores more than the matrix (break-even 0.727): `run` skips it
    lowrank = [("lowrank", method, f"MLP rank -{1 - fraction:.1%}", Plan.uniform(mlp, LayerPlan(
        rank_fraction=fraction, lowrank_method=method)))
        for fraction in (0.75, 0.5, 0.375) for method in ("svd", "whiten")]
    attention = [layer.name for layer in layers if layer.kind in ATTENTION_KINDS]
    fewer_heads = Plan.uniform(attention, LayerPlan(head_fraction=2 / 3))  # 2 of each key/value group's 3 heads
    structured = [("structured", "mlp-channels", f"MLP channels -{1 - kept:.0%}", Plan.uniform(mlp, LayerPlan(
                      channel_fraction=kept))) for kept in (0.75, 0.5)] + [
                  ("structured", "attention-heads", "heads -33% (6 of 9)", fewer_heads),
                  ("structured", "mlp-channels+heads", "MLP -25% + heads -33%", Plan({
                      **fewer_heads.layers, **{name: LayerPlan(channel_fraction=0.75) for name in mlp}}))]

    def sequential(configs: list) -> list:
        return [(family, method, setting + SEQUENTIAL, plan) for family, method, setting, plan in configs
                if method in SEQUENTIAL_METHODS]

    return [("base", "fp16", "-", Plan())] + quant(3) + sparse("unstructured") + lowrank + structured \
        + quant(2) + sparse("2:4") + quant(4) + sequential(quant(3) + quant(4) + sparse("unstructured") + sparse("2:4")) \
        + sharing(layers, total)


def forward_ms(models: list, windows: torch.Tensor, repeats: int = 7) -> list[float]:
    """Median wall time (ms) of one forward pass over `windows` (no vocabulary projection) per model.

    The models take turns within every repeat, so load from other processes on a shared machine
    hits them alike and their ratio stays meaningful.
    """
    decoders = [model.get_decoder() for model in models]
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for decoder in decoders:
            decoder(input_ids=windows)  # warm-up
        for _ in range(repeats):
            for decoder, spent in zip(decoders, times):
                started = time.perf_counter()
                decoder(input_ids=windows)
                spent.append(1000 * (time.perf_counter() - started))
    return [statistics.median(spent) for spent in times]


def run(model, plan: Plan, layers, total: int, windows, norms, hessians, cache: dict, batch_size: int,
        sequential: bool = False) -> dict | None:
    """Compress a copy of `model` by `plan` (calibrated in sequence when `sequential`) and measure it; None
    when the plan is not storable."""
    try:
        plan_bytes = plan_nbytes(layers, plan, total)
    except ValueError:
        return None
    compressed = copy.deepcopy(model)
    started = time.perf_counter()
    if sequential:
        apply_plan_sequentially_(compressed, plan, windows.calib_ids, batch_size)
    else:
        apply_plan_(compressed, plan, norms, svd_cache=cache, hessians=hessians)
    compress_s = time.perf_counter() - started
    ppl = perplexity_and_kl(compressed, windows.eval_ids, batch_size)["ppl"]
    row = {"ppl": round(ppl, 3), "plan_bytes": plan_bytes, "bits_per_weight": round(plan_bits_per_weight(layers, plan), 3),
           "compress_s": round(compress_s, 1)}
    if any(lp.is_structured for lp in plan.layers.values()):
        base_ms, row_ms = forward_ms([model, compressed], windows.eval_ids[:batch_size])
        row.update(forward_ms=round(row_ms, 1), base_forward_ms=round(base_ms, 1), forward_ratio=round(row_ms / base_ms, 3))
    return row


def run_peer(python: str, model, plan: Plan, method: str, layers, total: int, windows, batch_size: int) -> dict:
    """`plan`'s method and setting run by llm-compressor (`llmcompressor_run.py` under `python`), its weights
    measured here like `run`'s rows."""
    layer_plan = next(iter(plan.layers.values()))
    with tempfile.TemporaryDirectory() as folder:
        calib, out = Path(folder) / "calib.safetensors", Path(folder) / "weights.safetensors"
        save_file({"input_ids": windows.calib_ids.contiguous()}, str(calib))
        command = [python, str(ROOT / "benchmarks" / "llmcompressor_run.py"), "--model", resolve_model("smollm2-135m"),
                   "--calib", str(calib), "--method", method, "--out", str(out)]
        if method == "gptq":
            command += ["--bits", str(layer_plan.bits), "--group-size", str(layer_plan.group_size)]
        else:
            command += ["--sparsity", str(layer_plan.sparsity), "--mask", layer_plan.pattern]
        environment = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=folder)
        if done.returncode:
            raise RuntimeError(f"llm-compressor failed ({done.returncode}):\n{done.stderr[-3000:]}")
        compress_s = json.loads(done.stdout.strip().splitlines()[-1])["compress_s"]
        weights = load_file(str(out))
    compressed = copy.deepcopy(model)
    missing, unexpected = compressed.load_state_dict(weights, strict=False)
    planned = {f"{name}.weight" for name in plan.layers}
    if unexpected or planned - set(weights):
        raise RuntimeError(f"llm-compressor's weights do not match the plan: {unexpected[:3]} {sorted(planned - set(weights))[:3]}")
    ppl = perplexity_and_kl(compressed, windows.eval_ids, batch_size)["ppl"]
    return {"ppl": round(ppl, 3), "plan_bytes": plan_nbytes(layers, plan, total),
            "bits_per_weight": round(plan_bits_per_weight(layers, plan), 3), "compress_s": compress_s}


def peer_configs(configs: list) -> list:
    """The configurations llm-compressor runs: its methods, one-shot settings (it calibrates in sequence)."""
    return [(family, method, setting, plan) for family, method, setting, plan in configs
            if method in PEER_METHODS and not setting.endswith(SEQUENTIAL) and (
                family == "sparse" or next(iter(plan.layers.values())).bits in PEER_BITS)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out, run the others")
    parser.add_argument("--only", help="run only this family (quant, sparse, lowrank, sharing, structured), e.g. to re-time")
    parser.add_argument("--methods", help="run only these methods, e.g. gptq,sparsegpt,wanda")
    parser.add_argument("--one-shot", action="store_true", help="leave out the rows calibrated in sequence")
    parser.add_argument("--library", choices=(LIBRARY, PEER), default=LIBRARY, help="whose compression to measure")
    parser.add_argument("--library-python", default="/tmp/llmc-venv/bin/python",
                        help="the Python of llm-compressor's environment (--library llm-compressor)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "methods.csv")
    args = parser.parse_args()

    model, _, windows = default_model_and_windows(args.seq_len, args.eval_windows, args.calib_windows)
    layers = linear_layers(model)
    names, total = [layer.name for layer in layers], count_params(model)
    peer = args.library == PEER
    if peer:
        hessians = norms = {}  # the library measures its own
        configs = peer_configs(plans(layers, total))
    else:
        started = time.perf_counter()
        # ||X_j|| is sqrt(tokens * H_jj): one calibration pass instead of two (input_norms agrees to float round-off)
        norms, hessians = input_statistics(model, windows.calib_ids, names, args.batch_size)
        print(f"calibration statistics: {time.perf_counter() - started:.1f} s on {windows.calib_ids.numel()} tokens")
        configs = plans(layers, total) + [("sparse", "wanda+owl", "50% (OWL profile)", owl_plan(model, layers, norms, 0.5))]
    cache: dict = {}
    table = pd.read_csv(args.out) if args.resume and args.out.exists() else pd.DataFrame()
    if len(table):
        table["calib_windows"] = table.get("calib_windows", pd.Series(16, index=table.index)).fillna(16).astype(int)
        table["library"] = table.get("library", pd.Series(LIBRARY, index=table.index)).fillna(LIBRARY)
    done = set(zip(table["library"], table["family"], table["method"], table["setting"], table["calib_windows"])) \
        if len(table) else set()
    methods = args.methods.split(",") if args.methods else None
    for family, method, setting, plan in configs:
        if ((args.only and family not in (args.only, "base")) or (methods and family != "base" and method not in methods)
                or (args.one_shot and setting.endswith(SEQUENTIAL))
                or (args.library, family, method, setting, args.calib_windows) in done):
            continue
        if peer:
            row = run_peer(args.library_python, model, plan, method, layers, total, windows, args.batch_size)
        else:
            row = run(model, plan, layers, total, windows, norms, hessians, cache, args.batch_size,
                      sequential=setting.endswith(SEQUENTIAL))
        if row is None:
            print(f"skip {family} {method} {setting}: a rank that stores more than the dense matrix")
            continue
        table = pd.concat([table, pd.DataFrame([{"library": args.library, "family": family, "method": method,
                                                 "setting": setting, "calib_windows": args.calib_windows, **row}])],
                          ignore_index=True)
        table = table.sort_values("family", key=lambda f: f.map(FAMILY_ORDER), kind="stable")
        table = table[["library", *(column for column in table.columns if column != "library")]]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)  # after every row: a stopped run keeps what it measured
        print({"library": args.library, "family": family, "method": method, "setting": setting, **row}, flush=True)
    print(f"\nSmolLM2-135M, {args.eval_windows} x {args.seq_len}-token eval windows, "
          f"{args.calib_windows} x {args.seq_len} calibration windows\n")
    write_table(table, args.out)


if __name__ == "__main__":
    main()
