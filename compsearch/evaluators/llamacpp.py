"""Measuring a GGUF file in llama.cpp itself (through the `llama-cpp-python` bindings, the optional
`compsearch[llamacpp]` extra): perplexity on the study's windows and generation speed.

Perplexity follows the project's protocol, not `llama-perplexity`'s: every window (BOS first) is
evaluated from an empty cache and every position is scored, so the figure is comparable with the
trial's. llama.cpp multiplies 8-bit quantized activations in its dot products and keeps an F16
cache, so it reads slightly higher than the dequantized model in PyTorch.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import statistics
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from compsearch.evaluators.latency import LatencySettings, device_name
from compsearch.evaluators.quality import ReferenceRows, base_kl_sum

INSTALL_HINT = "install it with `pip install 'compsearch[llamacpp]'` (builds llama.cpp, about 8 minutes on 2 cores)"


class LlamaCppMissing(RuntimeError):
    """llama.cpp's Python bindings are not installed."""


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _llama_class():
    try:
        from llama_cpp import Llama
    except ImportError as err:
        raise LlamaCppMissing(f"llama.cpp (llama-cpp-python) is not installed ({err}); {INSTALL_HINT}") from None
    return Llama


@contextlib.contextmanager
def loaded(gguf_path: Path, context_tokens: int, threads: int | None = None, all_logits: bool = False):
    """The GGUF file loaded in llama.cpp on the CPU, freed on exit."""
    llama = _llama_class()
    threads = threads or max(1, len(os.sched_getaffinity(0)))
    model = llama(model_path=str(gguf_path), n_ctx=context_tokens, n_batch=context_tokens, n_ubatch=context_tokens,
                  n_threads=threads, n_threads_batch=threads, logits_all=all_logits, verbose=False, n_gpu_layers=0)
    try:
        yield model
    finally:
        model.close()


def llamacpp_log_probs(gguf_path: Path, windows: torch.Tensor, threads: int | None = None) -> Iterator[torch.Tensor]:
    """For each window (token ids, BOS first), evaluated from an empty cache: llama.cpp's log-probabilities
    of every predicted position (window length - 1 rows)."""
    with loaded(gguf_path, windows.shape[1], threads, all_logits=True) as model:
        for window in windows.tolist():
            model.reset()
            model.eval(window)
            logits = torch.from_numpy(np.array(model.scores[:len(window) - 1], dtype=np.float32))
            yield torch.log_softmax(logits, dim=-1)


def llamacpp_perplexity_and_kl(gguf_path: Path, windows: torch.Tensor, threads: int | None = None,
                               base: list | None = None) -> dict[str, float]:
    """`ppl` and `nll` of the file over `windows` (token ids, BOS first), every position scored; with the
    base model's log-probs on them (`base_log_probs`), also `kl` to it."""
    nll_sum, kl_sum, tokens = 0.0, 0.0, 0
    reference = ReferenceRows(base) if base is not None else None
    for window, log_probs in zip(windows, llamacpp_log_probs(gguf_path, windows, threads)):
        targets = window[1:]
        nll_sum -= log_probs.gather(1, targets.unsqueeze(1)).sum().item()
        tokens += len(targets)
        if reference is not None:
            kl_sum += base_kl_sum(reference.next(len(log_probs)), log_probs)
    metrics = {"ppl": math.exp(nll_sum / tokens), "nll": nll_sum / tokens}
    if base is not None:
        metrics["kl"] = kl_sum / tokens
    return metrics


def llamacpp_latency(gguf_path: Path, settings: LatencySettings = LatencySettings(),
                     threads: int | None = None) -> dict:
    """The file's speed in llama.cpp under the same names as `latency.measure_generation`: a prompt of
    `prompt_tokens` processed at once (`latency_ms`, `prefill_tok_s`), then `decode_tokens` generated one
    at a time (`decode_ms` per token); medians and p90 over `repeats` rounds after `warmup` rounds."""
    import llama_cpp

    context = settings.prompt_tokens + settings.decode_tokens + 1
    prompt_ms, decode_ms = [], []
    with loaded(gguf_path, context, threads) as model:
        prompt = [1 + (i * 7919) % (model.n_vocab() - 1) for i in range(settings.prompt_tokens)]  # fixed ids
        for round_index in range(settings.warmup + settings.repeats):
            model.reset()
            started = time.perf_counter()
            model.eval(prompt)
            prompt_s = time.perf_counter() - started
            started = time.perf_counter()
            for step in range(settings.decode_tokens):
                model.eval([prompt[step % len(prompt)]])
            if round_index >= settings.warmup:
                prompt_ms.append(1000.0 * prompt_s)
                decode_ms.append(1000.0 * (time.perf_counter() - started) / settings.decode_tokens)
        used_threads = model.n_threads
    median, p90 = statistics.median(prompt_ms), _percentile(prompt_ms, 90)
    return {"latency_ms": median, "latency_p90_ms": p90, "prefill_tok_s": settings.prompt_tokens * 1000.0 / median,
            "prefill_p90_tok_s": settings.prompt_tokens * 1000.0 / p90, "decode_ms": statistics.median(decode_ms),
            "decode_p90_ms": _percentile(decode_ms, 90), "latency_device": "cpu",
            "latency_device_name": device_name(torch.device("cpu")), "latency_dtype": "gguf",
            "latency_threads": used_threads, "latency_repeats": settings.repeats,
            "latency_runtime": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "latency_kernel": "real",
            "latency_simulated_layers": 0}


def _percentile(values: list[float], q: int) -> float:
    return float(np.percentile(values, q))
