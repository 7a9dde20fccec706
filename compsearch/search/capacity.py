"""How much host memory a worker needs, and whether the local machine holds the workers asked for.

A worker holds the base model in float32, a compressed copy of it while a trial runs, the compressed
layer variants it keeps (`compress.variants`), and, when the space uses calibration Hessians (GPTQ,
SparseGPT, whitened low-rank, structured pruning, GGUF types), X^T X of every distinct layer input plus
about twice as much again in cached inverse factors (natural and activation order) and SVDs. Checked
against the memory available before the workers start (local Ray only: a cluster's nodes differ),
so a job that would be killed by the out-of-memory monitor is told how many workers fit instead.
Measured on SmolLM2-135M (gguf space, 32 trials, 2 workers): peaks of 3.8-4.9 GiB per worker; estimated 5.1 GiB.
"""
from __future__ import annotations

import psutil

from compsearch.compress.calibration import shared_input_key
from compsearch.compress.variants import variant_cache_bytes
from compsearch.search.job import JobContext

FLOAT32_BYTES = 4
RUNTIME_BYTES = 2 * 2**30  # torch, transformers, Ray's worker, evaluation activations
GIB = 2**30


def needs_hessians(ctx: JobContext) -> bool:
    """Whether any plan of the space uses calibration Hessians (one layer of each kind stands for all)."""
    return any(layer_plan.needs_hessian for layer_plan in _layer_plans(ctx))


def needs_statistics(ctx: JobContext) -> bool:
    """Whether any plan of the space uses calibration statistics (norms or Hessians)."""
    return any(layer_plan.needs_norms or layer_plan.needs_hessian for layer_plan in _layer_plans(ctx))


def hessian_bytes(ctx: JobContext) -> int:
    """Bytes of the calibration Hessians: X^T X in float32 for every distinct layer input."""
    inputs = {shared_input_key(layer.name): layer.in_features for layer in ctx.layers}
    return sum(size * size for size in inputs.values()) * FLOAT32_BYTES


def _layer_plans(ctx: JobContext):
    kinds = {layer.kind: layer for layer in ctx.layers}
    return (ctx.space.layer_plan(layer, choice) for choice in ctx.space.uniform_choices() for layer in kinds.values())


def worker_memory_bytes(ctx: JobContext) -> int:
    """Estimated peak resident memory of one worker."""
    models = 2 * ctx.total_params * FLOAT32_BYTES  # the base model and a trial's compressed copy
    statistics = 3 * hessian_bytes(ctx) if needs_hessians(ctx) else 0  # X^T X and cached factors
    return models + variant_cache_bytes(ctx.total_params) + statistics + RUNTIME_BYTES


def memory_warning(ctx: JobContext, workers: int, available_bytes: int | None = None) -> str | None:
    """A line saying how many workers fit when `workers` would not; None when they do."""
    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    each = worker_memory_bytes(ctx)
    if workers * each <= available:
        return None
    fit = available // each
    advice = (f"use --workers {fit}" if fit >= 1 else
              "even one may not fit: use a machine with more memory, or a space without Hessian methods")
    return (f"{workers} workers need about {workers * each / GIB:.1f} GiB ({each / GIB:.1f} GiB each: the model twice in "
            f"float32{', calibration statistics' if needs_hessians(ctx) else ''}), but {available / GIB:.1f} GiB "
            f"is available: {advice}")
