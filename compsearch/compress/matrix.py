"""Compressing one weight matrix: prune (magnitude, Wanda, SparseGPT), then quantize (RTN, GPTQ, HQQ, k-means)."""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

from compsearch.compress.formats import Quantized
from compsearch.compress.gptq import inverse_hessian_factor
from compsearch.compress.storage import FLOAT_BITS, matrix_nbytes
from compsearch.compress.techniques import HESSIAN, NORMS, QUANTIZERS, pruner_for, quantizer_format
from compsearch.spaces.plan import LayerPlan, PlanError


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
    quantized: Quantized | None  # codes and the storage format's parameters when bits < 16


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

    def has(self, needs: frozenset[str]) -> bool:
        """Whether the statistics named in `needs` (`norms`, `hessian`) are here."""
        present = {NORMS: self.norms is not None, HESSIAN: self.hessian is not None}
        return all(present[need] for need in needs)

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

    `stats` may be bare input norms (the older call). A pruner falls back when its statistics are
    missing (Wanda to magnitude: the `up` factor of a low-rank layer has no norms); GPTQ and
    SparseGPT need a Hessian.
    """
    if stats is None or isinstance(stats, torch.Tensor):
        stats = MatrixStats(norms=stats)
    mask, values = None, weight.float()
    if plan.sparsity > 0:
        mask, values = pruner_for(plan.prune_method, stats).prune(values, plan.sparsity, plan.pattern, stats, layout.key)
    quantized = None
    if plan.bits < FLOAT_BITS:
        quantize = QUANTIZERS.get(plan.quant_method).quantize
        quantized = quantize(values, plan.bits, plan.group_size, stats, mask, layout.key)
        values = quantized_values(quantized, mask, plan.quant_method)
    else:
        values = values.half().float()
    return StoredMatrix(layout, values, mask, quantized)


def quantized_values(quantized: Quantized, mask: torch.Tensor | None, quant_method: str) -> torch.Tensor:
    """The values a quantized matrix computes with: its dequantized grid, and 0 at pruned positions on
    grids without an exact 0 (the mask format stores no value for pruned weights: they load as 0)."""
    values = quantized.dequantize()
    return values * mask if mask is not None and not quantizer_format(quant_method).exact_zero else values
