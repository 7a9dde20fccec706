"""Compressed matrices kept across the plans one worker applies: each layer's variant is computed once.

A matrix compressed under a layer plan depends only on the base model's weights, the calibration
statistics (both fixed for a worker) and that layer plan, not on what the other layers do, because
statistics are measured on the base model. So a worker that evaluates many plans (the sensitivity
profile's one-layer plans, then the trials) keeps each (matrix, layer plan) result it computes and
reuses it: GPTQ-style methods then cost once per variant instead of once per trial. The cache holds
what the checkpoint stores (codes and scales, or the 16-bit values of a pruned matrix), not float32
weights, and drops the least recently used variants beyond its byte budget.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from compsearch.compress.matrix import StoredMatrix, quantized_values
from compsearch.spaces.plan import LayerPlan

FLOAT32_BYTES = 4
MODEL_COPIES = 2  # the budget: as many bytes as two float32 copies of the model's weights


def variant_cache_bytes(total_params: int) -> int:
    """A worker's cache budget for a model of `total_params` parameters (holds many variants: codes
    take a byte or less per weight)."""
    return MODEL_COPIES * total_params * FLOAT32_BYTES


@dataclass(frozen=True)
class _Variant:
    matrix: StoredMatrix  # with `weight` empty when it is rebuilt from `quantized` or `half_weight`
    half_weight: torch.Tensor | None  # the values of a matrix kept at 16 bits
    nbytes: int


class VariantCache:
    """(state-dict key, layer plan) -> the compressed matrix, least recently used first out."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = self.misses = 0
        self._variants: OrderedDict[tuple[str, LayerPlan], _Variant] = OrderedDict()

    def get(self, key: str, plan: LayerPlan) -> StoredMatrix | None:
        variant = self._variants.get((key, plan))
        if variant is None:
            self.misses += 1
            return None
        self.hits += 1
        self._variants.move_to_end((key, plan))
        stored = variant.matrix
        if stored.quantized is not None:
            weight = quantized_values(stored.quantized, stored.mask, plan.quant_method)
        else:
            weight = variant.half_weight.float()
        return StoredMatrix(stored.layout, weight, stored.mask, stored.quantized)

    def put(self, key: str, plan: LayerPlan, matrix: StoredMatrix) -> None:
        """Keep `matrix` unless it is a plain 16-bit copy (cheaper to make again than to keep)."""
        if matrix.quantized is None and matrix.mask is None:
            return
        half = matrix.weight.half() if matrix.quantized is None else None
        kept = StoredMatrix(matrix.layout, torch.empty(0), matrix.mask, matrix.quantized)
        parts = [half, matrix.mask, *(vars(matrix.quantized).values() if matrix.quantized is not None else ())]
        nbytes = sum(part.numel() * part.element_size() for part in parts if isinstance(part, torch.Tensor))
        if nbytes > self.max_bytes:
            return
        previous = self._variants.pop((key, plan), None)
        self.nbytes += nbytes - (previous.nbytes if previous else 0)
        self._variants[(key, plan)] = _Variant(kept, half, nbytes)
        while self.nbytes > self.max_bytes:
            _, dropped = self._variants.popitem(last=False)
            self.nbytes -= dropped.nbytes
