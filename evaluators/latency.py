"""Wall-clock latency of a forward pass, as the model is held in memory."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.inference_mode()
def measure_latency(model: nn.Module, prompt_tokens: int = 64, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median and 90th-percentile milliseconds of one batch-1 forward over a prompt of `prompt_tokens`.

    Quantized weights are held dequantized here, so this measures dense kernels: it reflects low-rank
    factorization and changes of shape, not the speed of low-bit kernels.
    """
    vocab = model.get_input_embeddings().num_embeddings
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    timings = []
    for step in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(prompt)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            timings.append((time.perf_counter() - start) * 1000.0)
    timings.sort()
    return {"latency_ms": statistics.median(timings), "latency_p90_ms": timings[min(len(timings) - 1, int(0.9 * len(timings)))]}
