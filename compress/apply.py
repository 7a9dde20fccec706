"""Applying a `Plan` to a model: low-rank, then sparsity, then quantization, layer by layer."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from compress.lowrank import LowRankLinear, factorize
from compress.prune import keep_mask, kept_count
from compress.quantize import QuantizedMatrix, quantize_rtn
from compress.storage import FLOAT_BITS, matrix_nbytes
from spaces.layers import LayerInfo
from spaces.plan import LayerPlan, Plan, PlanError, rank_for, saves_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MatrixLayout:
    """One weight matrix as stored: its state-dict key, shape, surviving entries and format."""

    key: str
    rows: int
    cols: int
    kept: int
    bits: int
    group_size: int

    @property
    def nbytes(self) -> int:
        return matrix_nbytes(self.rows, self.cols, self.kept, self.bits, self.group_size)


@dataclass
class StoredMatrix:
    """A compressed matrix: the values the model now computes with, and what a checkpoint stores."""

    layout: MatrixLayout
    weight: torch.Tensor  # float32, exactly the dequantized stored values
    mask: torch.Tensor | None  # bool keep mask when pruned
    quantized: QuantizedMatrix | None  # codes, scales and zeros when bits < 16


def layer_layout(layer: LayerInfo, plan: LayerPlan) -> list[MatrixLayout]:
    """The matrices a layer is stored as under its plan: its weight, or two low-rank factors."""
    if plan.rank_fraction < 1.0:
        if not saves_params(layer.out_features, layer.in_features, plan.rank_fraction):
            raise PlanError(
                f"rank_fraction={plan.rank_fraction} on {layer.name} ({layer.out_features}x{layer.in_features}) "
                "stores more weights than the dense matrix; use a smaller rank_fraction or 1.0"
            )
        rank = rank_for(layer.out_features, layer.in_features, plan.rank_fraction)
        shapes = [(f"{layer.name}.down.weight", rank, layer.in_features),
                  (f"{layer.name}.up.weight", layer.out_features, rank)]
    else:
        shapes = [(f"{layer.name}.weight", layer.out_features, layer.in_features)]
    return [
        MatrixLayout(key, rows, cols, kept_count(rows, cols, plan.sparsity, plan.pattern), plan.bits, plan.group_size)
        for key, rows, cols in shapes
    ]


def layer_nbytes(layer: LayerInfo, plan: LayerPlan) -> int:
    """Bytes of one layer under its plan, bias (kept at 16 bits) included."""
    bias_bytes = layer.out_features * FLOAT_BITS // 8 if layer.has_bias else 0
    return sum(m.nbytes for m in layer_layout(layer, plan)) + bias_bytes


def plan_nbytes(layers: list[LayerInfo], plan: Plan, total_params: int) -> int:
    """Bytes of the whole model under a plan; everything outside `layers` is kept at 16 bits."""
    layer_params = sum(layer.num_params for layer in layers)
    other_bytes = (total_params - layer_params) * FLOAT_BITS // 8
    return other_bytes + sum(layer_nbytes(layer, plan[layer.name]) for layer in layers)


def plan_bits_per_weight(layers: list[LayerInfo], plan: Plan) -> float:
    """Average stored bits per original weight of the planned layers, metadata included."""
    total_bits = 8 * sum(layer_nbytes(layer, plan[layer.name]) for layer in layers)
    return total_bits / sum(layer.num_params for layer in layers)


def compress_matrix(
    weight: torch.Tensor, layout: MatrixLayout, plan: LayerPlan, input_norms: torch.Tensor | None
) -> StoredMatrix:
    """Prune, then quantize one matrix; returns the stored form and the values the model will use."""
    mask = None
    values = weight.float()
    if plan.sparsity > 0:
        method = plan.prune_method if input_norms is not None else "magnitude"
        mask = keep_mask(values, plan.sparsity, plan.pattern, method, input_norms)
        values = values * mask
    quantized = None
    if plan.bits < FLOAT_BITS:
        quantized = quantize_rtn(values, plan.bits, plan.group_size)
        values = quantized.dequantize()
    else:
        values = values.half().float()
    return StoredMatrix(layout, values, mask, quantized)


def apply_plan_(
    model: nn.Module,
    plan: Plan,
    input_norms: dict[str, torch.Tensor] | None = None,
    keep_stored: bool = False,
    svd_cache: dict[str, tuple[torch.Tensor, ...]] | None = None,
) -> dict[str, StoredMatrix]:
    """Compress the planned layers of `model` in place.

    Wanda pruning uses `input_norms[layer name]` (calibration input L2 norms per input feature); the
    `up` factor of a low-rank layer has no such statistics and is pruned by magnitude.
    `svd_cache` (layer name -> thin SVD of the original weight) is read and filled, so a process that
    compresses the same base model many times factorizes each layer once.
    Returns the stored matrices by state-dict key when `keep_stored` (needed to write a checkpoint).
    """
    stored: dict[str, StoredMatrix] = {}
    input_norms = input_norms or {}
    for name, layer_plan in plan.layers.items():
        if layer_plan.is_identity:
            continue
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise PlanError(f"plan names {name!r}, which is a {type(module).__name__}, not a Linear layer")
        if layer_plan.prune_method == "wanda" and layer_plan.sparsity > 0 and name not in input_norms:
            raise PlanError(f"Wanda pruning of {name} needs calibration input norms; compute them first")
        layer = LayerInfo(name, module.out_features, module.in_features, module.bias is not None)
        layouts = layer_layout(layer, layer_plan)
        targets = _factorize_(model, module, layer, layouts, svd_cache) if len(layouts) == 2 else [module]
        norms = [input_norms.get(name), None]
        for layout, linear, norm in zip(layouts, targets, norms):
            matrix = compress_matrix(linear.weight.data, layout, layer_plan, norm)
            linear.weight.data.copy_(matrix.weight)
            if keep_stored:
                stored[layout.key] = matrix
        bias = targets[-1].bias
        if bias is not None:
            bias.data.copy_(bias.data.half().float())
    return stored


def _factorize_(model: nn.Module, module: nn.Linear, layer: LayerInfo, layouts: list[MatrixLayout],
                svd_cache: dict[str, tuple[torch.Tensor, ...]] | None) -> list[nn.Linear]:
    rank = layouts[0].rows
    svd = None
    if svd_cache is not None:
        if layer.name not in svd_cache:
            svd_cache[layer.name] = torch.linalg.svd(module.weight.data.float(), full_matrices=False)
        svd = svd_cache[layer.name]
    down, up = factorize(module.weight.data, rank, svd)
    low_rank = LowRankLinear(layer.in_features, layer.out_features, rank, module.bias is not None,
                             dtype=module.weight.dtype, device=module.weight.device)
    low_rank.down.weight.data.copy_(down)
    low_rank.up.weight.data.copy_(up)
    if module.bias is not None:
        low_rank.up.bias.data.copy_(module.bias.data)
    model.set_submodule(layer.name, low_rank)
    return [low_rank.down, low_rank.up]


def replace_with_low_rank_(model: nn.Module, layers: list[LayerInfo], plan: Plan) -> None:
    """Give `model` the module structure of a compressed one (low-rank layers), weights left as they are."""
    for layer in layers:
        layouts = layer_layout(layer, plan[layer.name])
        if len(layouts) == 2:
            module = model.get_submodule(layer.name)
            model.set_submodule(layer.name, LowRankLinear(
                layer.in_features, layer.out_features, layouts[0].rows, layer.has_bias,
                dtype=module.weight.dtype, device=module.weight.device))
