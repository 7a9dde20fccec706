"""Compressing one weight matrix: prune (magnitude, Wanda, SparseGPT), then quantize (RTN, GPTQ, HQQ, k-means)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from compsearch.compress.formats import Quantized
from compsearch.compress.gptq import inverse_hessian_factor
from compsearch.compress.storage import FLOAT_BITS, matrix_nbytes, pack_bits, unpack_bits, uses_mask_format
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

    @property
    def masked(self) -> bool:
        """Whether the matrix is stored as a keep mask plus the kept values (else densely)."""
        return uses_mask_format(self.rows, self.cols, self.kept, self.bits, self.group_size, self.quant_method)


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
    _factors: dict[bool, torch.Tensor] = field(default_factory=dict, repr=False)

    def has(self, needs: frozenset[str]) -> bool:
        """Whether the statistics named in `needs` (`norms`, `hessian`) are here."""
        present = {NORMS: self.norms is not None, HESSIAN: self.hessian is not None}
        return all(present[need] for need in needs)

    def hinv_factor(self, name: str, activation_order: bool = False) -> torch.Tensor:
        """The upper Cholesky factor of H^-1 (`gptq.inverse_hessian_factor`); with `activation_order`,
        of H with its rows and columns in `activation_order()`."""
        if self.hessian is None:
            raise PlanError(f"{name}: GPTQ/SparseGPT need calibration Hessians; compute them first")
        if activation_order not in self._factors:
            cache = self.cache if self.cache_key is not None else None
            key = f"{self.cache_key}{'#act' if activation_order else ''}"
            if cache is not None and key in cache:
                factor = cache[key]
            else:
                hessian = self.hessian
                if activation_order:
                    order = self.activation_order()
                    hessian = hessian[order][:, order]
                factor = inverse_hessian_factor(hessian)
                if cache is not None:
                    cache[key] = factor
            self._factors[activation_order] = factor
        return self._factors[activation_order]

    def activation_order(self) -> torch.Tensor:
        """Input features by decreasing mean square activation (the Hessian's diagonal), as GPTQ's
        `act_order` takes them."""
        return torch.argsort(torch.diagonal(self.hessian), descending=True, stable=True)


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


def pack_matrix(matrix: StoredMatrix) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores for `matrix`, by part name: `mask` (packed keep bits) in the mask
    form, then `values` (16 bits) or the parts of its quantizer's storage format."""
    layout = matrix.layout
    keep = matrix.mask if layout.masked else None
    parts = {"mask": pack_bits(keep, 1)} if keep is not None else {}
    if layout.bits >= FLOAT_BITS:
        values = matrix.weight[keep] if keep is not None else matrix.weight
        parts["values"] = values.to(torch.float16).reshape(-1).contiguous()
    else:
        parts.update(quantizer_format(layout.quant_method).pack(matrix.quantized, keep))
    return parts


def unpack_matrix(parts: Mapping[str, torch.Tensor], layout: MatrixLayout) -> StoredMatrix:
    """Inverse of `pack_matrix`: the matrix with the values it computes with (its keep mask only in
    the mask form: a densely stored pruned matrix holds its zeros as values)."""
    keep = unpack_mask(parts["mask"], layout) if layout.masked else None
    if layout.bits >= FLOAT_BITS:
        values = parts["values"].float()
        if keep is None:
            return StoredMatrix(layout, values.reshape(layout.rows, layout.cols), None, None)
        weight = torch.zeros(layout.rows, layout.cols)
        weight[keep] = values
        return StoredMatrix(layout, weight, keep, None)
    storage = quantizer_format(layout.quant_method)
    quantized = storage.unpack({part: tensor for part, tensor in parts.items() if part != "mask"},
                               (layout.rows, layout.cols), layout.bits, layout.group_size, keep)
    return StoredMatrix(layout, quantized_values(quantized, keep, layout.quant_method), keep, quantized)


def unpack_mask(packed: torch.Tensor, layout: MatrixLayout) -> torch.Tensor:
    """The boolean keep mask of a matrix shaped like `layout`, from its packed bits (`pack_bits(mask, 1)`)."""
    return unpack_bits(packed, 1, layout.rows * layout.cols).bool().reshape(layout.rows, layout.cols)


def quantized_values(quantized: Quantized, mask: torch.Tensor | None, quant_method: str) -> torch.Tensor:
    """The values a quantized matrix computes with: its dequantized grid, and 0 at pruned positions on
    grids without an exact 0 (the mask format stores no value for pruned weights: they load as 0)."""
    values = quantized.dequantize()
    return values * mask if mask is not None and not quantizer_format(quant_method).exact_zero else values
