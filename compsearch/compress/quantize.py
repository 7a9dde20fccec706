"""Group-wise round-to-nearest quantization: asymmetric with an integer zero point per group, or symmetric
about 0 (the zero point is the middle code, not stored)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class QuantizedMatrix:
    """Integer codes of a rows x cols matrix with one fp16 scale and integer zero per group of inputs."""

    codes: torch.Tensor  # uint8, (rows, cols)
    scales: torch.Tensor  # float16, (rows, groups)
    zeros: torch.Tensor  # uint8, (rows, groups)
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.group_size)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> QuantizedMatrix:
    """Round each weight to the nearest of 2**bits levels spanning its group's [min, max] and 0
    (`symmetric`: levels -2**(bits-1) .. 2**(bits-1) - 1 times a scale, `group_scale_symmetric`).

    The range always contains 0 and the zero point is an integer, so 0 (a pruned weight) is exact and
    near-zero weights are not shifted by an outlier on the other side of 0.
    """
    rows, cols = weight.shape
    grouped = grouped_columns(weight.float(), group_size)  # (rows, groups, group_size), zero-padded
    scales, zeros = group_scale(grouped, bits, symmetric)
    codes = round_to_grid(grouped, scales.float().unsqueeze(2), zeros.unsqueeze(2), bits)
    codes = codes.reshape(rows, -1)[:, :cols]
    return QuantizedMatrix(codes.to(torch.uint8), scales, zeros.to(torch.uint8), bits, group_size)


def group_scale_zero(grouped: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and integer zero point (as float) of each group along the last dimension.

    The range is [min, max] widened to contain 0, so 0 is exactly representable.
    """
    qmax = (1 << bits) - 1
    low = grouped.amin(dim=-1).clamp(max=0.0)
    high = grouped.amax(dim=-1).clamp(min=0.0)
    scales = ((high - low) / qmax).to(torch.float16)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group
    zeros = torch.round(-low / scales.float()).clamp(0, qmax)
    return scales, zeros


def group_scale_symmetric(grouped: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale of each group for a grid symmetric about 0 (the largest magnitude on the top level,
    2**(bits-1) - 1), and the zero point every group shares: the middle code 2**(bits-1)."""
    top = (1 << (bits - 1)) - 1
    scales = (grouped.abs().amax(dim=-1) / top).to(torch.float16)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group
    return scales, torch.full(scales.shape, float(1 << (bits - 1)))


def group_scale(grouped: torch.Tensor, bits: int, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's scale and zero point from its full range: `group_scale_zero`, or `group_scale_symmetric`."""
    return (group_scale_symmetric if symmetric else group_scale_zero)(grouped, bits)


CLIP_FRACTIONS = torch.linspace(1.0, 0.5, 41)  # of a group's range, tried by `fitted_group_scale`


def fitted_group_scale(grouped: torch.Tensor, bits: int, importance: torch.Tensor,
                       symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's scale and zero point (`group_scale`) from its range shrunk by the fraction in
    `CLIP_FRACTIONS` whose rounding error sum_j importance_j (w_j - q_j)^2 is least: clipping a few large
    weights buys a finer grid for the rest, where the inputs are active.

    `importance` (cols,): each input's mean square activation (the calibration Hessian's diagonal), the
    weighting of llama.cpp's importance-matrix scale search. Ties keep the full range.
    """
    weights = grouped_columns(importance.float().reshape(1, -1), grouped.shape[-1])  # padding weighs 0

    def clipped(fraction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scales, zeros = group_scale(grouped * fraction, bits, symmetric)
        scale, zero = scales.float().unsqueeze(2), zeros.unsqueeze(2)
        error = ((round_to_grid(grouped, scale, zero, bits) - zero) * scale - grouped).square().mul(weights).sum(-1)
        return error, scales, zeros

    best_error, best_scales, best_zeros = clipped(CLIP_FRACTIONS[0])
    for fraction in CLIP_FRACTIONS[1:]:
        error, scales, zeros = clipped(fraction)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scales, best_zeros = torch.where(better, scales, best_scales), torch.where(better, zeros, best_zeros)
    return best_scales, best_zeros


def round_to_grid(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) of `values` on the grid (code - zero) * scale, clamped to [0, 2**bits - 1]."""
    return torch.round(values / scale + zero).clamp(0, (1 << bits) - 1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = codes.shape
    grouped = grouped_columns(codes.float(), group_size)
    values = (grouped - zeros.float().unsqueeze(2)) * scales.float().unsqueeze(2)
    return values.reshape(rows, -1)[:, :cols].contiguous()


def grouped_columns(matrix: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, groups, group_size): consecutive columns in groups, the last one zero-padded."""
    rows, cols = matrix.shape
    padding = (-cols) % group_size
    return F.pad(matrix, (0, padding)).reshape(rows, -1, group_size)
