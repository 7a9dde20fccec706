"""HQQ-style calibration-free quantization: the zero point is fitted by half-quadratic optimization.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023). With the scale
fixed, HQQ minimizes the l_p (p < 1) norm of the weight error, which is robust to the outliers that
dominate a min/max grid. Splitting with an auxiliary error variable E gives two closed-form steps:
E = shrink_p(W - dequant(W)) (a generalized soft threshold) and zero = mean(Q - (W - E) / scale).
Differences from the reference: it starts from the integer-zero RTN grid (which holds 0 exactly),
the zero point is stored as fp16 (so the grid need not hold 0 any more), and the iterate with the
lowest squared weight error is kept -- never worse than RTN on ||W - Q||, which is what the model's
outputs feel at these group sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.quantize import _grouped, group_scale_zero, round_to_grid

ITERATIONS = 20
LP_NORM = 0.7
BETA_START, BETA_GROWTH = 10.0, 1.01


@dataclass
class HqqMatrix:
    """Integer codes of a rows x cols matrix with an fp16 scale and an fp16 zero point per group."""

    codes: torch.Tensor  # uint8, (rows, cols)
    scales: torch.Tensor  # float16, (rows, groups)
    zeros: torch.Tensor  # float16, (rows, groups)
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        return dequantize_hqq(self.codes, self.scales, self.zeros, self.group_size)


def quantize_hqq(weight: torch.Tensor, bits: int, group_size: int, iterations: int = ITERATIONS) -> HqqMatrix:
    """Quantize with HQQ's proximal zero-point updates; the best fp16 (scale, zero) pair is kept."""
    rows, cols = weight.shape
    grouped = _grouped(weight.float(), group_size)
    scales, zeros = group_scale_zero(grouped, bits)
    scale = scales.float().unsqueeze(2)
    best_zero = zeros.unsqueeze(2)
    best_error = _group_error(grouped, scale, best_zero, bits)
    zero, beta = best_zero.clone(), BETA_START
    for _ in range(iterations):
        codes = round_to_grid(grouped, scale, zero, bits)
        error = _shrink_lp(grouped - (codes - zero) * scale, beta)
        zero = (codes - (grouped - error) / scale).mean(dim=2, keepdim=True).half().float()
        beta *= BETA_GROWTH
        candidate = _group_error(grouped, scale, zero, bits)
        better = candidate < best_error
        best_zero = torch.where(better, zero, best_zero)
        best_error = torch.minimum(candidate, best_error)
    codes = round_to_grid(grouped, scale, best_zero, bits).reshape(rows, -1)[:, :cols]
    return HqqMatrix(codes.to(torch.uint8), scales, best_zero.squeeze(2).half(), bits, group_size)


def dequantize_hqq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = codes.shape
    grouped = _grouped(codes.float(), group_size)
    values = (grouped - zeros.float().unsqueeze(2)) * scales.float().unsqueeze(2)
    return values.reshape(rows, -1)[:, :cols].contiguous()


def _group_error(grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Squared weight error per group (rows, groups, 1) on the grid (code - zero) * scale."""
    approx = (round_to_grid(grouped, scale, zero, bits) - zero) * scale
    return (approx - grouped).square().sum(dim=2, keepdim=True)


def _shrink_lp(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Proximal operator of the l_p norm (p < 1) at penalty beta: a generalized soft threshold."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp(min=1e-12).pow(LP_NORM - 1) / beta)
