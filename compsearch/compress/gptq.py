"""GPTQ: group-wise quantization that compensates each column's rounding error with the inputs' Hessian.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(2022). Columns are quantized one at a time; the error of a column is spread over the columns not yet
quantized through the upper Cholesky factor of H^-1 (H = X^T X of the layer's calibration inputs),
which minimizes ||X W^T - X Q^T|| column by column. Lazy batch updates in blocks of 128 columns.
Group g always covers inputs [g * group_size, (g + 1) * group_size), so the stored format is the one RTN
uses. Columns are taken in activation order (most active input first, GPTQ's `act_order`), with every
group's scale and zero point set beforehand from the original weights ("static" groups, which keep
the groups contiguous): on SmolLM2-135M at 3 bits g128 this took perplexity from 46.4 (natural order,
scales set as each group is reached, the reference code's default) to 25.4. The groups' ranges are
clipped where that lowers their rounding error weighted by the inputs' activity
(`quantize.fitted_group_scale`): 3 bits 25.6 -> 17.8, 4 bits 14.82 -> 14.09 (16 calibration windows).
"""
from __future__ import annotations

from typing import Callable

import torch

from compsearch.compress.quantize import (
    QuantizedMatrix, fitted_group_scale, group_scale, grouped_columns, round_to_grid,
)

BLOCK_COLUMNS = 128
DAMPING = 0.01  # fraction of the mean Hessian diagonal added to the diagonal, as in the reference code


def inverse_hessian_factor(hessian: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping * mean(diag H) * I)^-1, so that H^-1 = U^T U.

    Inputs that were never active (zero diagonal) get a unit diagonal: their weights do not affect
    the calibration outputs, and the factor stays finite.
    """
    h = hessian.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * torch.diagonal(h).mean())
    for attempt in range(5):  # more damping if round-off leaves H indefinite
        lower, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            break
        h.diagonal().add_(damping * torch.diagonal(h).mean() * 10 ** attempt)
    else:
        raise ValueError("the calibration Hessian is not positive definite even after damping")
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True).float()


ColumnRounder = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def compensated_rounding(weight: torch.Tensor, hinv_factor: torch.Tensor, order: torch.Tensor,
                         round_column: ColumnRounder, keep: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ's column loop on any grid: the uint8 codes (rows, cols) of `weight`.

    Columns are taken in `order` (a permutation of the inputs); `round_column(values, column)` gives
    the codes and values of input `column` on the grid, whose scales are fixed beforehand;
    `hinv_factor` is the upper Cholesky factor of the inverse Hessian with its rows and columns in
    `order`. With a `keep` mask, pruned weights are rounded as 0 (their removal error is compensated too).
    """
    rows, cols = weight.shape
    if hinv_factor.shape != (cols, cols) or order.shape != (cols,):
        raise ValueError(f"GPTQ needs a {cols}x{cols} inverse Hessian factor and an order of {cols} columns, "
                         f"got {tuple(hinv_factor.shape)} and {tuple(order.shape)}")
    work = weight.float()[:, order].t().contiguous()  # one row per column, in rounding order
    kept = keep[:, order].t() if keep is not None else None
    codes = torch.zeros(cols, rows, dtype=torch.uint8)
    for start in range(0, cols, BLOCK_COLUMNS):
        end = min(start + BLOCK_COLUMNS, cols)
        batch, factor = work[start:end].clone(), hinv_factor[start:end, start:end]
        errors = torch.zeros_like(batch)
        for i in range(end - start):
            column = int(order[start + i])
            codes[column], value = round_column(batch[i] if kept is None else batch[i] * kept[start + i], column)
            errors[i] = (batch[i] - value) / factor[i, i]
            batch[i:] -= factor[i, i:].unsqueeze(1) * errors[i].unsqueeze(0)
        work[end:] -= hinv_factor[start:end, end:].t() @ errors
    return codes.t().contiguous()


def quantize_gptq(weight: torch.Tensor, bits: int, group_size: int, hinv_factor: torch.Tensor,
                  order: torch.Tensor, importance: torch.Tensor | None, mask: torch.Tensor | None = None,
                  symmetric: bool = False) -> QuantizedMatrix:
    """GPTQ-quantize a (rows, cols) matrix in RTN's format: every group's scale and integer zero point
    (`symmetric`: the middle code) fitted to the weights first (`fitted_group_scale` with `importance`, the
    Hessian's diagonal; None: the groups' full ranges, as GPTQ's reference code sets them), then the columns
    rounded in `order` (activation order, `MatrixStats.activation_order()`) by `compensated_rounding`;
    `hinv_factor` is that of H in `order` (`MatrixStats.hinv_factor(..., activation_order=True)`).

    With a keep `mask` (a pruned matrix), pruned weights take the zero point (exactly 0) and their
    removal error is compensated like rounding error, so sparsity survives quantization.
    """
    x = weight.float() if mask is None else weight.float() * mask
    grouped = grouped_columns(x, group_size)
    scales, zeros = (group_scale(grouped, bits, symmetric) if importance is None
                     else fitted_group_scale(grouped, bits, importance, symmetric))
    group = torch.arange(x.shape[1]) // group_size
    scale, zero = scales.float()[:, group].t().contiguous(), zeros[:, group].t().contiguous()  # per column

    def round_column(values: torch.Tensor, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        code = round_to_grid(values, scale[column], zero[column], bits)
        return code.to(torch.uint8), (code - zero[column]) * scale[column]
    codes = compensated_rounding(x, hinv_factor, order, round_column, mask)
    return QuantizedMatrix(codes, scales, zeros.to(torch.uint8), bits, group_size)
