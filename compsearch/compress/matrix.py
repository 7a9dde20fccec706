"""Compressing one weight matrix: prune (magnitude, Wanda, SparseGPT), then quantize (RTN, GPTQ, HQQ, k-means)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch

from compsearch.compress.gptq import inverse_hessian_factor, quantize_gptq
from compsearch.compress.hqq import quantize_hqq
from compsearch.compress.kmeans import PalettizedMatrix, palettize
from compsearch.compress.prune import keep_mask
from compsearch.compress.quantize import QuantizedMatrix, quantize_rtn
from compsearch.compress.sparsegpt import prune_sparsegpt
from compsearch.compress.storage import FLOAT_BITS, NO_EXACT_ZERO, matrix_nbytes
from compsearch.spaces.plan import LayerPlan, PlanError

AnyQuantized = Union[QuantizedMatrix, PalettizedMatrix]


@dataclass(frozen=True)
class MatrixLayout:
    """One weight matrix as stored: its state-dict key, shape, surviving entries and format."""

    key: str
    rows: int
    cols: int
    kept: int
    bits: int
    group_size: int
    quant_method: str = "rtn"

    @property
    def nbytes(self) -> int:
        return matrix_nbytes(self.rows, self.cols, self.kept, self.bits, self.group_size, self.quant_method)


@dataclass
class StoredMatrix:
    """A compressed matrix: the values the model now computes with, and what a checkpoint stores."""

    layout: MatrixLayout
    weight: torch.Tensor  # float32, exactly the dequantized stored values
    mask: torch.Tensor | None  # bool keep mask when pruned
    quantized: AnyQuantized | None  # codes and scales/zeros or codebooks when bits < 16


@dataclass
class MatrixStats:
    """Calibration statistics of one matrix's inputs; the inverse-Hessian factor is made on demand.

    `cache` and `cache_key` let a worker keep the factor across trials (it depends only on H).
    """

    norms: torch.Tensor | None = None  # ||X_j||_2 per input feature
    hessian: torch.Tensor | None = None  # X^T X / tokens
    cache: dict | None = None
    cache_key: str | None = None
    _factor: torch.Tensor | None = field(default=None, repr=False)

    def hinv_factor(self, name: str) -> torch.Tensor:
        if self.hessian is None:
            raise PlanError(f"{name}: GPTQ/SparseGPT need calibration Hessians; compute them first")
        if self._factor is None:
            if self.cache is not None and self.cache_key in self.cache:
                self._factor = self.cache[self.cache_key]
            else:
                self._factor = inverse_hessian_factor(self.hessian)
                if self.cache is not None and self.cache_key is not None:
                    self.cache[self.cache_key] = self._factor
        return self._factor


def compress_matrix(weight: torch.Tensor, layout: MatrixLayout, plan: LayerPlan,
                    stats: MatrixStats | torch.Tensor | None = None) -> StoredMatrix:
    """Prune, then quantize one matrix; returns the stored form and the values the model will use.

    `stats` may be bare input norms (the older call). Wanda falls back to magnitude without norms
    (the `up` factor of a low-rank layer has none); SparseGPT and GPTQ need a Hessian.
    """
    if stats is None or isinstance(stats, torch.Tensor):
        stats = MatrixStats(norms=stats)
    mask, values = None, weight.float()
    if plan.sparsity > 0:
        mask, values = _prune(values, plan, stats, layout.key)
    quantized = _quantize(values, plan, stats, mask, layout.key) if plan.bits < FLOAT_BITS else None
    if quantized is not None:
        values = quantized_values(quantized, mask, plan.quant_method)
    else:
        values = values.half().float()
    return StoredMatrix(layout, values, mask, quantized)


def quantized_values(quantized: AnyQuantized, mask: torch.Tensor | None, quant_method: str) -> torch.Tensor:
    """The values a quantized matrix computes with: its dequantized grid, and 0 at pruned positions on
    grids without an exact 0 (the mask format stores no value for pruned weights: they load as 0)."""
    values = quantized.dequantize()
    return values * mask if mask is not None and quant_method in NO_EXACT_ZERO else values


def _prune(values: torch.Tensor, plan: LayerPlan, stats: MatrixStats, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    if plan.prune_method == "sparsegpt" and stats.hessian is not None:
        updated, mask = prune_sparsegpt(values, plan.sparsity, plan.pattern, stats.hinv_factor(key))
        return mask, updated
    method = plan.prune_method if stats.norms is not None else "magnitude"
    if method == "sparsegpt":  # norms but no Hessian: Wanda is SparseGPT's diagonal approximation
        method = "wanda"
    mask = keep_mask(values, plan.sparsity, plan.pattern, method, stats.norms)
    return mask, values * mask


def _quantize(values: torch.Tensor, plan: LayerPlan, stats: MatrixStats, mask: torch.Tensor | None,
              key: str) -> AnyQuantized:
    if plan.quant_method == "rtn":
        return quantize_rtn(values, plan.bits, plan.group_size)
    if plan.quant_method == "gptq":
        return quantize_gptq(values, plan.bits, plan.group_size, stats.hinv_factor(key), mask)
    if plan.quant_method == "hqq":
        return quantize_hqq(values, plan.bits, plan.group_size)
    if plan.quant_method == "kmeans":
        importance = stats.norms.square().unsqueeze(0) if stats.norms is not None else torch.ones(1, values.shape[1])
        if mask is not None:
            importance = importance * mask  # pruned weights are not stored: they must not pull centroids
        return palettize(values, plan.bits, importance)
    raise PlanError(f"quant_method={plan.quant_method!r} is unknown")
