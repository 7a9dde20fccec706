"""Wall-clock latency: a forward pass, prefill throughput and per-token decode time, with their context.

Every figure is the median (and 90th percentile) of several timed repeats after warm-up runs; the
device, dtype and thread count are recorded with it, since a figure means nothing without them.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured: prompt length, decode steps and batch, warm-up and repeats."""

    prompt_tokens: int = 64
    decode_tokens: int = 16
    decode_batch: int = 4
    warmup: int = 1
    repeats: int = 5

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < (0 if name == "warmup" else 1):
                raise ValueError(f"latency setting {name}={value!r} must be a positive integer"
                                 f"{' (0 allowed)' if name == 'warmup' else ''}")

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_p90(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def _prompt(model: nn.Module, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, tokens), generator=generator).to(device)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    dtype = model.get_input_embeddings().weight.dtype
    return param.device, dtype


def device_name(device: torch.device) -> str:
    """A readable name of the device: the GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def latency_context(model: nn.Module) -> dict:
    """What a latency figure depends on: device, its name, dtype and torch's intra-op thread count."""
    device, dtype = _model_device_dtype(model)
    return {"latency_device": device.type, "latency_device_name": device_name(device),
            "latency_dtype": str(dtype).replace("torch.", ""), "latency_threads": torch.get_num_threads(),
            "latency_runtime": f"torch {torch.__version__}"}


@torch.inference_mode()
def measure_latency(model: nn.Module, prompt_tokens: int = 64, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median and 90th-percentile milliseconds of one batch-1 forward over a prompt of `prompt_tokens`."""
    device, _ = _model_device_dtype(model)
    prompt = _prompt(model, 1, prompt_tokens, device)
    timings = []
    for step in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        model(prompt, use_cache=False)
        _sync(device)
        if step >= warmup:
            timings.append((time.perf_counter() - start) * 1000.0)
    median, p90 = _median_p90(timings)
    return {"latency_ms": median, "latency_p90_ms": p90}


@torch.inference_mode()
def measure_decode(model: nn.Module, batch: int, prompt_tokens: int, decode_tokens: int, repeats: int,
                   warmup: int) -> tuple[float, float]:
    """(median, p90) milliseconds per decode step at `batch` sequences, after a `prompt_tokens` prefill.

    Each repeat prefills afresh (untimed), then times `decode_tokens` greedy steps with the KV cache.
    """
    device, _ = _model_device_dtype(model)
    prompt = _prompt(model, batch, prompt_tokens, device)
    per_token = []
    for step in range(warmup + repeats):
        out = model(prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        if step >= warmup:
            per_token.append((time.perf_counter() - start) * 1000.0 / decode_tokens)
    return _median_p90(per_token)


def measure_generation(model: nn.Module, settings: LatencySettings = LatencySettings()) -> dict:
    """Prefill throughput and decode time per token (batch 1 and `decode_batch`), with their context.

    `prefill_tok_s` is prompt tokens per second of a batch-1 prefill (median; `prefill_p90_tok_s` is the
    slow end, from the p90 time); `decode_ms` / `decode_p90_ms` are per decode step at batch 1, and
    `decode_batch_ms` / `decode_batch_p90_ms` per step at batch `decode_batch` (a step makes that many tokens).
    """
    forward = measure_latency(model, settings.prompt_tokens, settings.repeats, settings.warmup)
    metrics = dict(forward)
    metrics["prefill_tok_s"] = settings.prompt_tokens * 1000.0 / forward["latency_ms"]
    metrics["prefill_p90_tok_s"] = settings.prompt_tokens * 1000.0 / forward["latency_p90_ms"]
    args = (settings.prompt_tokens, settings.decode_tokens, settings.repeats, settings.warmup)
    metrics["decode_ms"], metrics["decode_p90_ms"] = measure_decode(model, 1, *args)
    if settings.decode_batch > 1:
        batched, batched_p90 = measure_decode(model, settings.decode_batch, *args)
        metrics.update(decode_batch_ms=batched, decode_batch_p90_ms=batched_p90, decode_batch=settings.decode_batch)
    metrics.update(latency_context(model))
    metrics["latency_repeats"] = settings.repeats
    return metrics
