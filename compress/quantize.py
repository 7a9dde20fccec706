"""Group-wise asymmetric round-to-nearest quantization with an integer zero point."""
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


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedMatrix:
    """Round each weight to the nearest of 2**bits levels spanning its group's [min, max] and 0.

    The range always contains 0 and the zero point is an integer, so 0 (a pruned weight) is exact and
    near-zero weights are not shifted by an outlier on the other side of 0.
    """
    rows, cols = weight.shape
    qmax = (1 << bits) - 1
    grouped = _grouped(weight.float(), group_size)  # (rows, groups, group_size), zero-padded
    low = grouped.amin(dim=2).clamp(max=0.0)
    high = grouped.amax(dim=2).clamp(min=0.0)
    scales = ((high - low) / qmax).to(torch.float16)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group
    scale32 = scales.float()
    zeros = torch.round(-low / scale32).clamp(0, qmax)
    codes = torch.round(grouped / scale32.unsqueeze(2)) + zeros.unsqueeze(2)
    codes = codes.clamp(0, qmax).reshape(rows, -1)[:, :cols]
    return QuantizedMatrix(codes.to(torch.uint8), scales, zeros.to(torch.uint8), bits, group_size)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = codes.shape
    grouped = _grouped(codes.float(), group_size)
    values = (grouped - zeros.float().unsqueeze(2)) * scales.float().unsqueeze(2)
    return values.reshape(rows, -1)[:, :cols].contiguous()


def _grouped(matrix: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = matrix.shape
    padding = (-cols) % group_size
    return F.pad(matrix, (0, padding)).reshape(rows, -1, group_size)
