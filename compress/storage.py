"""How compressed weights are stored, and how many bytes that takes.

One format, used both for accounting and by `save_compressed`, so the bytes a plan is charged are
the bytes a checkpoint holds (safetensors header aside):
- bits 16: half-precision values;
- bits < 16: integer codes packed at `bits` each, plus per group of `group_size` inputs in a row an
  fp16 scale and an integer zero point packed at `bits`;
- a pruned matrix is stored either densely (pruned weights are code "zero point", i.e. exactly 0) or
  as a 1-bit keep mask plus only the kept values, whichever is smaller.
"""
from __future__ import annotations

import math

import torch

SCALE_BITS = 16
FLOAT_BITS = 16


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def values_nbytes(rows: int, cols: int, count: int, bits: int, group_size: int) -> int:
    """Bytes of `count` stored values of a rows x cols matrix, with their group scales and zeros."""
    if bits >= FLOAT_BITS:
        return count * FLOAT_BITS // 8
    groups = rows * math.ceil(cols / group_size)
    return packed_nbytes(count, bits) + groups * SCALE_BITS // 8 + packed_nbytes(groups, bits)


def uses_mask_format(rows: int, cols: int, kept: int, bits: int, group_size: int) -> bool:
    """Whether mask + kept values is smaller than the dense layout for this matrix."""
    if kept == rows * cols:
        return False
    masked = packed_nbytes(rows * cols, 1) + values_nbytes(rows, cols, kept, bits, group_size)
    return masked < values_nbytes(rows, cols, rows * cols, bits, group_size)


def matrix_nbytes(rows: int, cols: int, kept: int, bits: int, group_size: int) -> int:
    """Bytes of one stored weight matrix with `kept` non-pruned entries."""
    if uses_mask_format(rows, cols, kept, bits, group_size):
        return packed_nbytes(rows * cols, 1) + values_nbytes(rows, cols, kept, bits, group_size)
    return values_nbytes(rows, cols, rows * cols, bits, group_size)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers below 2**bits into a flat uint8 tensor, `bits` bits each, LSB first."""
    flat = values.reshape(-1).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8)
    bit_planes = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    padding = (-bit_planes.numel()) % 8
    if padding:
        bit_planes = torch.cat([bit_planes, bit_planes.new_zeros(padding)])
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (bit_planes.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` values as uint8."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bit_planes = ((packed.reshape(-1).unsqueeze(1) >> shifts) & 1).reshape(-1)[: count * bits]
    weights = (1 << torch.arange(bits, dtype=torch.int32))
    return (bit_planes.reshape(count, bits).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)
