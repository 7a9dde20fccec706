"""Evaluators benchmark: quality, task accuracy, memory and measured vs predicted latency of a few plans.

Runs on the default model (SmolLM2-135M) with the evaluation protocol of a study (pydoc text, 16 x 256
token windows), hyperbaton from the BIG-bench file, an exported checkpoint per plan, and the latency
of the plan on the device's real kernels next to the cost model's prediction. Prints a table and
writes benchmarks/results/evaluators.csv.

    python benchmarks/evaluators.py [--hyperbaton-limit 500] [--out benchmarks/results/evaluators.csv]
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from compsearch.compress import plan_nbytes, save_compressed  # noqa: E402
from compsearch.evaluators.latency import LatencySettings  # noqa: E402
from compsearch.evaluators.data import load_text, make_windows  # noqa: E402
from compsearch.search.models import load_tokenizer, resolve_model  # noqa: E402
from compsearch.search.trial import TrialEvaluator, WorkerSettings  # noqa: E402
from compsearch.spaces.layers import count_params, linear_layers  # noqa: E402
from compsearch.spaces.plan import LayerPlan, Plan  # noqa: E402

HYPERBATON = Path(os.environ.get("COMPSEARCH_SHARED", ROOT.parent / "shared")) / "data" / "bigbench" / "hyperbaton_2k.json"
MLP_KINDS = ("gate_proj", "up_proj", "down_proj")
LATENCY = {"prompt_tokens": 64, "decode_tokens": 8, "decode_batch": 4, "repeats": 5}
COLUMNS = ["plan", "ppl", "kl", "hyperbaton_acc", "plan_bytes", "export_bytes", "export_vs_plan",
           "peak_rss_bytes", "prefill_tok_s", "decode_ms", "decode_p90_ms", "decode_batch_ms", "latency_ms",
           "latency_kernel", "predicted_decode_ms", "predicted_latency_ms", "decode_error", "prefill_error",
           "evaluate_s"]


def benchmark_plans(names: list[str]) -> dict[str, Plan]:
    """The plans of the table, uniform over the model's Linear layers (MLP ones where the name says so)."""
    mlp = [name for name in names if name.rsplit(".", 1)[-1] in MLP_KINDS]
    plans = {
        "base": Plan(),
        "8-bit": Plan.uniform(names, LayerPlan(bits=8, group_size=128)),
        "4-bit g128": Plan.uniform(names, LayerPlan(bits=4, group_size=128)),
        "50% 2:4 (wanda)": Plan.uniform(names, LayerPlan(sparsity=0.5, pattern="2:4", prune_method="wanda")),
        "rank 50% MLP": Plan.uniform(mlp, LayerPlan(rank_fraction=0.5)),
        "structured 25% MLP": Plan.uniform(mlp, LayerPlan(channel_fraction=0.75)),
    }
    return plans


def export_bytes(evaluator: TrialEvaluator, plan: Plan, tokenizer) -> int:
    """Bytes of the packed safetensors file `save_compressed` writes for the plan."""
    model, stored = evaluator.compressed_model(plan, keep_stored=True)
    with tempfile.TemporaryDirectory() as folder:
        return save_compressed(model, plan, stored, Path(folder), tokenizer).stat().st_size


def run(limit: int, out: Path, threads: int) -> pd.DataFrame:
    torch.set_num_threads(threads)
    model_ref = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(model_ref)
    text, source = load_text(None)
    windows = make_windows(tokenizer, text, source, seq_len=256, eval_windows=16, calib_windows=16)
    started = time.perf_counter()
    evaluator = TrialEvaluator(model_ref, windows.eval_ids, windows.calib_ids, WorkerSettings(
        batch_size=0, with_kl=True, threads=threads, latency=LatencySettings(**LATENCY),
        tasks={"tasks": (f"bigbench:{HYPERBATON}",), "task_paths": (), "limit": limit}))
    print(f"worker ready in {time.perf_counter() - started:.0f}s (batch size {evaluator.batch_size}; cost model "
          f"{evaluator.measurements.cost_model.path})", flush=True)
    layers = linear_layers(evaluator.model)
    total_params = count_params(evaluator.model)
    rows = []
    for label, plan in benchmark_plans([layer.name for layer in layers]).items():
        metrics = evaluator.evaluate(plan.to_json())
        row = {"plan": label, **metrics, "hyperbaton_acc": metrics.get("task_bigbench_hyperbaton_acc"),
               "plan_bytes": plan_nbytes(layers, plan, total_params), "export_bytes": export_bytes(evaluator, plan, tokenizer)}
        row["export_vs_plan"] = row["export_bytes"] / row["plan_bytes"] - 1
        row["decode_error"] = row["predicted_decode_ms"] / row["decode_ms"] - 1
        row["prefill_error"] = row["predicted_latency_ms"] / row["latency_ms"] - 1
        rows.append(row)
        print(f"{label}: ppl {row['ppl']:.3f}, hyperbaton {row['hyperbaton_acc']:.3f}, decode {row['decode_ms']:.1f} ms "
              f"(predicted {row['predicted_decode_ms']:.1f}), {row['latency_kernel']}", flush=True)
    frame = pd.DataFrame(rows)
    context = {key: frame[key].iloc[0] for key in ("latency_device_name", "latency_dtype", "latency_threads")}
    frame = frame[COLUMNS + [c for c in ("batch_size",) if c in frame]]
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    print(f"\nSmolLM2-135M, fp32 on {context['latency_device_name']} ({context['latency_threads']} threads); "
          f"ppl/kl on 16 x 256 pydoc tokens; hyperbaton: first {limit} examples")
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    errors = frame[["decode_error", "prefill_error"]].abs()
    print(f"\ncost model |error|: decode mean {errors['decode_error'].mean():.1%} max {errors['decode_error'].max():.1%};"
          f" prefill (64 tokens) mean {errors['prefill_error'].mean():.1%} max {errors['prefill_error'].max():.1%}")
    print(f"export vs plan bytes: max |difference| {frame['export_vs_plan'].abs().max():.3%}; wrote {out}")
    return frame


LATENCY_COLUMNS = ["prefill_tok_s", "decode_ms", "decode_p90_ms", "decode_batch_ms", "latency_ms", "latency_kernel",
                   "predicted_decode_ms", "predicted_latency_ms"]


def latency_only(out: Path, threads: int, cache_dir: Path) -> None:
    """Re-measure only the latency columns of `out` (and recalibrate the cost model in `cache_dir`): for a
    quieter moment than the full run, since timings on a shared machine follow its load."""
    torch.set_num_threads(threads)
    model_ref = resolve_model("smollm2-135m")
    text, source = load_text(None)
    windows = make_windows(load_tokenizer(model_ref), text, source, seq_len=256, eval_windows=1, calib_windows=16)
    evaluator = TrialEvaluator(model_ref, windows.eval_ids, windows.calib_ids, WorkerSettings(
        batch_size=4, with_kl=False, threads=threads, latency=LatencySettings(**LATENCY), cache_dir=str(cache_dir)))
    frame = pd.read_csv(out)
    layers = linear_layers(evaluator.model)
    for label, plan in benchmark_plans([layer.name for layer in layers]).items():
        model, _ = evaluator.compressed_model(plan)
        metrics = {**evaluator.measurements.measured_latency(model, plan), **evaluator.measurements.predicted_latency(plan)}
        index = frame.index[frame["plan"] == label]
        for column in LATENCY_COLUMNS:
            frame.loc[index, column] = metrics[column]
        frame.loc[index, "decode_error"] = metrics["predicted_decode_ms"] / metrics["decode_ms"] - 1
        frame.loc[index, "prefill_error"] = metrics["predicted_latency_ms"] / metrics["latency_ms"] - 1
        print(f"{label}: decode {metrics['decode_ms']:.1f} ms (predicted {metrics['predicted_decode_ms']:.1f}), "
              f"prefill {metrics['latency_ms']:.1f} ms (predicted {metrics['predicted_latency_ms']:.1f}), "
              f"{metrics['latency_kernel']}", flush=True)
    frame.to_csv(out, index=False)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    errors = frame[["decode_error", "prefill_error"]].abs()
    print(f"cost model |error|: decode mean {errors['decode_error'].mean():.1%}, prefill mean {errors['prefill_error'].mean():.1%}"
          f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


def kl_gap(threads: int, windows_count: int = 8) -> None:
    """Compact (top-k + rest) KL against the exact KL on the default model, for two plans."""
    import copy

    from compsearch.compress import apply_plan_
    from compsearch.evaluators.quality import base_log_probs, perplexity_and_kl
    from compsearch.search.models import load_model

    torch.set_num_threads(threads)
    model_ref = resolve_model("smollm2-135m")
    text, source = load_text(None)
    ids = make_windows(load_tokenizer(model_ref), text, source, 256, windows_count, 1).eval_ids
    model = load_model(model_ref)
    exact_base = base_log_probs(model, ids, 4, top_k=None)
    names = [layer.name for layer in linear_layers(model)]
    for label, layer_plan in (("4-bit g128", LayerPlan(bits=4, group_size=128)), ("3-bit g128", LayerPlan(bits=3))):
        compressed = copy.deepcopy(model)
        apply_plan_(compressed, Plan.uniform(names, layer_plan))
        exact = perplexity_and_kl(compressed, ids, 4, exact_base)["kl"]
        for top_k in (32, 128):
            compact = perplexity_and_kl(compressed, ids, 4, base_log_probs(model, ids, 4, top_k=top_k))["kl"]
            print(f"{label}: exact KL {exact:.5f}, top-{top_k} KL {compact:.5f} ({compact / exact - 1:+.2%})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hyperbaton-limit", type=int, default=500, help="first N examples of hyperbaton_2k")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "evaluators.csv")
    parser.add_argument("--kl-gap", action="store_true", help="only compare the compact KL with the exact one")
    parser.add_argument("--latency-only", type=Path, metavar="CACHE_DIR",
                        help="only re-measure the latency columns of --out, with a fresh cost model in CACHE_DIR")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in ("torchao", "lm_eval", "lm-eval", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.kl_gap:
        kl_gap(args.threads)
        return
    if args.latency_only:
        latency_only(args.out, args.threads, args.latency_only)
        return
    run(args.hyperbaton_limit, args.out, args.threads)


if __name__ == "__main__":
    main()
