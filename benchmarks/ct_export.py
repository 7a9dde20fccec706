"""compressed-tensors checkpoints of `vllm`-space plans on the default model: written with the library,
loaded back by transformers, scored with the study protocol.

SmolLM2-135M, the default data (calibration: the first half of the tokens; 16 evaluation windows of 256
tokens from the second half). Four plans, every Linear symmetric integer with GPTQ (activation order):
- uniform W4 g128 (the 576-wide q/k/v/o/gate/up rows hold no whole 128-groups: 64 there, as the
  `vllm` space gives them),
- uniform W8 g128,
- the feasible plan of least perplexity that mixes 4, 8 and 16 bits from an 8-trial `vllm` study under
  a memory budget of 0.6 of the 16-bit model (bits and groups of 64 or 128 chosen per decoder block),
- 2:4 SparseGPT with W8 g128 on every Linear (compressed-tensors 0.20 stores it densely).
Each is compressed as a trial is, its perplexity measured (`trial_ppl`), written as a checkpoint
(`export --format compressed-tensors`), loaded with `AutoModelForCausalLM.from_pretrained` and scored
again (`checkpoint_ppl`); `plan_bytes` is the plan's memory, `checkpoint_bytes` the safetensors file.

Writes benchmarks/results/compressed_tensors.csv.

    python benchmarks/ct_export.py [--study-trials 8] [--workdir DIR]

(Not named compressed_tensors.py: it would shadow the compressed_tensors package.)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when Ray is imported: loopback only

import pandas as pd  # noqa: E402

from common import write_table  # noqa: E402
from compsearch.compress.ct_export import checkpoint_nbytes, export_compressed_tensors, load_checkpoint  # noqa: E402
from compsearch.evaluators.quality import perplexity_and_kl  # noqa: E402
from compsearch.search.commands import RunOptions, submit  # noqa: E402
from compsearch.search.job import prepare_job  # noqa: E402
from compsearch.search.models import load_tokenizer  # noqa: E402
from compsearch.search.spec import JobSpec  # noqa: E402
from compsearch.search.trial import TrialEvaluator, WorkerSettings  # noqa: E402
from compsearch.spaces.plan import Plan  # noqa: E402

BUDGET = "0.6"  # of the 16-bit model: uniform W4 is 0.42, W8 0.62: the front mixes 4, 8 and 16 bits


def study_plan(workdir: Path, trials: int) -> tuple[str, Plan]:
    """The feasible plan of least perplexity that mixes 4, 8 and 16 bits from a `vllm` study under
    `BUDGET` (4, 8 or 16 bits per decoder block, GPTQ, groups of 64 or 128: a small sensitivity
    profile), with its name."""
    spec = JobSpec(study=f"ct-bench-{BUDGET}", space="vllm", granularity="block", quant_methods=("gptq-sym",),
                   group_sizes=(64, 128), memory_budget=BUDGET)
    table_path = workdir / "results" / spec.study / "trials.parquet"
    table = pd.read_parquet(table_path) if table_path.exists() else submit(
        spec, trials, RunOptions(results_dir=workdir / "results", workers=2, on_status=print))
    feasible = table[table["feasible"] == True].sort_values("ppl")  # noqa: E712
    widths = feasible["plan_json"].map(lambda text: {lp.bits for lp in Plan.from_json(text).layers.values()})
    row = feasible[widths.map(lambda bits: bits >= {4, 8, 16})].iloc[0]
    return f"vllm study trial {int(row['trial'])} (budget {BUDGET})", Plan.from_json(row["plan_json"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study-trials", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "compsearch-ct-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compressed_tensors.csv")
    args = parser.parse_args()
    print(f"load: {os.getloadavg()}", flush=True)
    spec = JobSpec(study="ct-bench", space="vllm")
    ctx = prepare_job(spec)
    space = ctx.space
    w8 = {"bits": 8, "group_size": 128, "quant_method": "gptq-sym"}
    uniform = {
        "uniform W4 g128": {"bits": 4, "group_size": 128, "quant_method": "gptq-sym"},
        "uniform W8 g128": w8,
    }
    plans = {name: space.plan(ctx.layers, choice) for name, choice in uniform.items()}
    name, plan = study_plan(args.workdir, args.study_trials)
    plans[name] = plan
    plans["2:4 SparseGPT + W8 g128"] = Plan({layer.name: dataclasses.replace(
        space.layer_plan(layer, w8), sparsity=0.5, pattern="2:4", prune_method="sparsegpt") for layer in ctx.layers})
    evaluator = TrialEvaluator(ctx.model_ref, ctx.windows.eval_ids, ctx.windows.calib_ids,
                               WorkerSettings(with_kl=False, threads=os.cpu_count()))
    tokenizer = load_tokenizer(ctx.model_ref)
    rows = []
    for name, plan in plans.items():
        started = time.perf_counter()
        model, stored = evaluator.compressed_model(plan, keep_stored=True)
        trial_ppl = perplexity_and_kl(model, ctx.windows.eval_ids, evaluator.batch_size)["ppl"]
        out = args.workdir / "checkpoints" / name.split(" (")[0].replace(" ", "-").replace(":", "")
        export_compressed_tensors(model, plan, stored, out, tokenizer)
        checkpoint_ppl = perplexity_and_kl(load_checkpoint(out), ctx.windows.eval_ids, evaluator.batch_size)["ppl"]
        bits = sorted({lp.bits for lp in plan.layers.values()})
        rows.append({"plan": name, "bits": "/".join(map(str, bits)), "trial_ppl": trial_ppl,
                     "checkpoint_ppl": checkpoint_ppl, "ppl_diff_pct": 100 * (checkpoint_ppl / trial_ppl - 1),
                     "plan_bytes": ctx.plan_bytes(plan), "checkpoint_bytes": checkpoint_nbytes(out),
                     "seconds": time.perf_counter() - started})
        print(rows[-1], flush=True)
    write_table(pd.DataFrame(rows).round(4), args.out)


if __name__ == "__main__":
    main()
