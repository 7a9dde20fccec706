"""GPTQ: group-wise quantization that compensates each column's rounding error with the inputs' Hessian.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(2022). Columns are quantized left to right; the error of a column is spread over the columns not yet
quantized through the upper Cholesky factor of H^-1 (H = X^T X of the layer's calibration inputs),
which minimizes ||X W^T - X Q^T|| column by column. Lazy batch updates in blocks of 128 columns.
Columns are taken in their natural order (no act-order) so group g always covers inputs
[g * group_size, (g + 1) * group_size) and the stored format is the one RTN uses.
"""
from __future__ import annotations

import torch

from compsearch.compress.quantize import QuantizedMatrix, group_scale_zero, round_to_grid

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


def quantize_gptq(weight: torch.Tensor, bits: int, group_size: int, hinv_factor: torch.Tensor,
                  mask: torch.Tensor | None = None) -> QuantizedMatrix:
    """GPTQ-quantize a (rows, cols) matrix; `hinv_factor` from `inverse_hessian_factor` (cols x cols).

    With a keep `mask` (a pruned matrix), pruned weights take the zero point (exactly 0) and their
    removal error is compensated like rounding error, so sparsity survives quantization.
    Group scales and zero points are set when the group's first column is reached, from the
    weights as already updated by the errors of earlier columns (as in the reference code).
    """
    rows, cols = weight.shape
    if hinv_factor.shape != (cols, cols):
        raise ValueError(f"GPTQ needs a {cols}x{cols} inverse Hessian factor, got {tuple(hinv_factor.shape)}")
    groups = -(-cols // group_size)
    work = weight.float().clone()
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    scales = torch.ones(rows, groups, dtype=torch.float16)
    zeros = torch.zeros(rows, groups)
    scale = zero = None
    for start in range(0, cols, BLOCK_COLUMNS):
        end = min(start + BLOCK_COLUMNS, cols)
        block, factor = work[:, start:end].clone(), hinv_factor[start:end, start:end]
        errors = torch.zeros_like(block)
        for i in range(end - start):
            col = start + i
            if col % group_size == 0:  # group_size divides BLOCK_COLUMNS: the group lies in this block
                g = col // group_size
                scales[:, g], zeros[:, g] = group_scale_zero(block[:, i:i + group_size], bits)
                scale, zero = scales[:, g].float(), zeros[:, g]
            column = block[:, i]
            code = round_to_grid(column, scale, zero, bits)
            if mask is not None:
                code = torch.where(mask[:, col], code, zero)
            codes[:, col] = code.to(torch.uint8)
            error = (column - (code - zero) * scale) / factor[i, i]
            block[:, i:] -= error.unsqueeze(1) * factor[i, i:].unsqueeze(0)
            errors[:, i] = error
        work[:, end:] -= errors @ hinv_factor[start:end, end:]
    return QuantizedMatrix(codes, scales, zeros.to(torch.uint8), bits, group_size)
