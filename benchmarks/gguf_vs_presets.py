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

Writes benchmarks/results/gguf.csv (model,source,name,imatrix,file_bytes,bpw_linear,ppl,kl,pp_tok_s,tg_ms)
and prints, for every preset made with the importance matrix, the best compsearch file no larger.

    python benchmarks/gguf_vs_presets.py --llama-tools DIR [--trials 32] [--workdir DIR]

DIR holds llama-quantize and llama-imatrix, built from the llama-cpp-python source package:
`benchmarks/build_llama_tools.sh DIR`. (A script named gguf.py would shadow the gguf package.)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when Ray is imported: loopback only

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from gguf import GGUFReader  # noqa: E402

from common import write_table  # noqa: E402
from compsearch.compress import apply_plan_, input_hessians, input_norms  # noqa: E402
from compsearch.compress.gguf_export import export_gguf  # noqa: E402
from compsearch.evaluators import LatencySettings, load_text, make_windows  # noqa: E402
from compsearch.evaluators.llamacpp import llamacpp_latency, llamacpp_log_probs  # noqa: E402
from compsearch.evaluators.quality import TopKLogProbs  # noqa: E402
from compsearch.search.commands import RunOptions, export, submit  # noqa: E402
from compsearch.search.models import default_gguf_path, load_model, load_tokenizer, resolve_model  # noqa: E402
from compsearch.search.spec import JobSpec  # noqa: E402
from compsearch.spaces import get_space  # noqa: E402
from compsearch.spaces.layers import embedding_layers, linear_layers  # noqa: E402
from compsearch.spaces.plan import Plan  # noqa: E402

PRESETS = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q3_K_S", "Q2_K")
TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "Q5_0", "Q4_0")  # one type everywhere
# SmolLM2-135M's weights come from a Q4_1 GGUF: Q4_1 and Q5_1 (and Q5_K, which falls back to Q5_1 on its
# 576-wide rows) hold that grid exactly and would look lossless; the study is not allowed to exploit it.
STUDY_TYPES = ("f16", "q8_0", "q6_k", "q4_k", "q3_k", "q2_k", "iq4_nl", "q5_0", "q4_0")
TOP_K = 1024
THREADS = 2


def measure(path: Path, windows: torch.Tensor, base: list[TopKLogProbs]) -> dict:
    """ppl, KL to the F16 file, speed, bytes and bits per weight of the decoder Linears, in llama.cpp;
    kept beside the file (FILE.json) so a rerun measures only new files."""
    saved = path.with_suffix(".json")
    if saved.exists() and saved.stat().st_mtime >= path.stat().st_mtime:
        return json.loads(saved.read_text())
    nll, kl, tokens = 0.0, 0.0, 0
    for window, log_probs, reference in zip(windows, llamacpp_log_probs(path, windows, THREADS), base):
        targets = window[1:]
        nll -= log_probs.gather(1, targets.unsqueeze(1)).sum().item()
        kl += reference.kl_sum(log_probs)
        tokens += len(targets)
    speed = llamacpp_latency(path, LatencySettings(prompt_tokens=64, decode_tokens=16, repeats=5), THREADS)
    tensors = GGUFReader(str(path)).tensors
    linear = [t for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    bpw = 8 * sum(int(t.n_bytes) for t in linear) / sum(int(t.n_elements) for t in linear)
    result = {"file_bytes": path.stat().st_size, "bpw_linear": bpw, "ppl": float(np.exp(nll / tokens)),
              "kl": kl / tokens, "pp_tok_s": speed["prefill_tok_s"], "tg_ms": speed["decode_ms"], "load": os.getloadavg()[0]}
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


def one_type_everywhere(tools: Path, f16: Path, imatrix: Path, model, ref: str, statistics: tuple[dict, dict],
                        workdir: Path) -> list[tuple[str, str, Path]]:
    """Type by type: llama-quantize --pure with the importance matrix, and compsearch's rounding, both
    putting one type on every Linear and the token embedding (with llama.cpp's fallbacks on rows a
    K-type cannot hold), so the files hold the same tensor types and differ only in rounding.
    `statistics`: the calibration input norms and Hessians of the Linears."""
    space = get_space("gguf")
    layers = linear_layers(model) + embedding_layers(model)
    files = []
    for kind in TYPES:
        ours, theirs = workdir / f"uniform-{kind}.gguf", workdir / f"pure-{kind}-imatrix.gguf"
        if not theirs.exists():
            _run([tools / "llama-quantize", "--pure", "--imatrix", imatrix, f16, theirs, kind, str(THREADS)])
        if not ours.exists():
            plan = Plan({layer.name: space.layer_plan(layer, {"quant_method": kind.lower()}) for layer in layers})
            compressed = copy.deepcopy(model)
            norms, hessians = statistics
            stored = apply_plan_(compressed, plan, norms, keep_stored=True, hessians=hessians).stored
            export_gguf(compressed, plan, stored, ours, default_gguf_path(), Path(ref))
        files += [(f"pure {kind}", "llama.cpp", theirs), (f"pure {kind}", "compsearch", ours)]
    return files


def compsearch_front(trials: int, workdir: Path) -> list[tuple[str, Path]]:
    options = RunOptions(results_dir=workdir / "results", workers=2, cache_dir=None,
                         on_status=lambda line: print(line, flush=True),
                         on_trial=lambda event: print(f"trial {event.trial}: {event.state} {event.metrics}", flush=True))
    spec = JobSpec(study="gguf-bench", space="gguf", objectives=("ppl", "memory"), quant_methods=STUDY_TYPES)
    study_table = workdir / "results" / "gguf-bench" / "trials.parquet"
    table = pd.read_parquet(study_table) if study_table.exists() else submit(spec, trials, options)
    front = table[table["on_front"] & (table["feasible"] == True)].sort_values("rank")  # noqa: E712
    files = []
    for rank, trial in zip(front["rank"], front["trial"]):
        out = workdir / f"compsearch-trial{int(trial):03d}.gguf"
        if not out.exists():
            export("gguf-bench", int(rank), out, options, export_format="gguf")
        files.append((f"trial {int(trial)}", out))
    return files


def _merged(path: Path, new: pd.DataFrame) -> pd.DataFrame:
    """The table at `path` with the rows of `new` replacing those of the same source and name."""
    if not path.exists():
        return new
    old = pd.read_csv(path)
    keep = ~old.set_index(["source", "name", "imatrix"]).index.isin(new.set_index(["source", "name", "imatrix"]).index)
    return pd.concat([old[keep], new], ignore_index=True)


def _run(command: list) -> None:
    started = time.perf_counter()
    subprocess.run([str(part) for part in command], check=True, capture_output=True)
    print(f"{Path(str(command[0])).name}: {time.perf_counter() - started:.0f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-tools", type=Path, required=True, help="folder with llama-quantize, llama-imatrix")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "results" / "gguf-work")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gguf.csv")
    parser.add_argument("--parts", default="presets,types,study",
                        help="presets (llama.cpp's), types (one type everywhere, both quantizers), study (compsearch's front)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"load: {os.getloadavg()}", flush=True)
    ref = resolve_model("smollm2-135m")
    model, tokenizer = load_model(ref), load_tokenizer(ref)
    text, source = load_text(None)
    windows = make_windows(tokenizer, text, source, 256, 16, 16)
    f16 = args.workdir / "F16.gguf"
    if not f16.exists():
        export_gguf(model, Plan(), {}, f16, default_gguf_path(), Path(ref))
    calibration_text = args.workdir / "calibration.txt"
    calibration_text.write_text(tokenizer.decode(windows.calib_ids.reshape(-1).tolist()))
    base = [TopKLogProbs.from_log_probs(log_probs, TOP_K)
            for log_probs in llamacpp_log_probs(f16, windows.eval_ids, THREADS)]
    imatrix = importance_matrix(args.llama_tools, f16, calibration_text, args.workdir)
    files = [("llama.cpp", "F16", False, f16)]
    if "presets" in parts:
        files += [("llama.cpp", preset, matrix, path)
                  for preset, matrix, path in llama_cpp_presets(args.llama_tools, f16, imatrix, args.workdir)]
    if "types" in parts:
        names = [layer.name for layer in linear_layers(model)]
        statistics = input_norms(model, windows.calib_ids, names), input_hessians(model, windows.calib_ids, names)
        files += [(source, name, True, path) for name, source, path in
                  one_type_everywhere(args.llama_tools, f16, imatrix, model, ref, statistics, args.workdir)]
    if "study" in parts:
        files += [("compsearch", name, True, path) for name, path in compsearch_front(args.trials, args.workdir)]
    rows = []
    for source, name, with_matrix, path in files:
        rows.append({"model": "SmolLM2-135M", "source": source, "name": name, "imatrix": with_matrix,
                     **measure(path, windows.eval_ids, base)})
        print(rows[-1], flush=True)
    table = _merged(args.out, pd.DataFrame(rows))
    write_table(table.round(4), args.out)
    print("\nat each preset's size (with importance matrix), the best file of compsearch's study no larger:")
    ours = table[(table["source"] == "compsearch") & table["name"].str.startswith("trial")]
    for row in table[(table["source"] == "llama.cpp") & table["imatrix"]].itertuples():
        fits = ours[ours["file_bytes"] <= row.file_bytes].sort_values("ppl")
        best = fits.iloc[0] if len(fits) else None
        verdict = (f"{best['name']}: ppl {best['ppl']:.3f} kl {best['kl']:.4f} at {best['file_bytes'] / 1e6:.1f} MB"
                   if best is not None else "none that small")
        print(f"  {row.name:7s} {row.file_bytes / 1e6:6.1f} MB ppl {row.ppl:.3f} kl {row.kl:.4f} | {verdict}")


if __name__ == "__main__":
    main()
