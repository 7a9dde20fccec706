"""How compressed weights are stored, and how many bytes that takes.

One format, used both for accounting and by `save_compressed`, so the bytes a plan is charged are
the bytes a checkpoint holds (safetensors header aside):
- bits 16: half-precision values;
- bits < 16, `rtn`, `gptq` and `hqq`: integer codes packed at `bits` each, plus per group of
  `group_size` inputs in a row an fp16 scale and an integer zero point packed at `bits`;
- `kmeans`: codes packed at `bits` (indices into the row's codebook) plus one codebook of 2**bits
  fp16 values per row;
- a pruned matrix is stored either densely (pruned weights are code "zero point", i.e. exactly 0) or
  as a 1-bit keep mask plus only the kept values, whichever is smaller. A k-means codebook need not
  hold an exact 0, so a pruned `kmeans` matrix always uses the mask format.
"""
from __future__ import annotations

import math

import torch

SCALE_BITS = 16
FLOAT_BITS = 16


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


NO_EXACT_ZERO = ("kmeans",)  # quantizers whose grid may lack an exact 0


def values_nbytes(rows: int, cols: int, count: int, bits: int, group_size: int, quant_method: str = "rtn") -> int:
    """Bytes of `count` stored values of a rows x cols matrix, with their scales and zeros or codebooks."""
    if bits >= FLOAT_BITS:
        return count * FLOAT_BITS // 8
    if quant_method == "kmeans":
        return packed_nbytes(count, bits) + rows * (1 << bits) * FLOAT_BITS // 8
    groups = rows * math.ceil(cols / group_size)
    return packed_nbytes(count, bits) + groups * SCALE_BITS // 8 + packed_nbytes(groups, bits)


def uses_mask_format(rows: int, cols: int, kept: int, bits: int, group_size: int, quant_method: str = "rtn") -> bool:
    """Whether the matrix is stored as a keep mask plus the kept values (else densely)."""
    if kept == rows * cols:
        return False
    if bits < FLOAT_BITS and quant_method in NO_EXACT_ZERO:
        return True
    masked = packed_nbytes(rows * cols, 1) + values_nbytes(rows, cols, kept, bits, group_size, quant_method)
    return masked < values_nbytes(rows, cols, rows * cols, bits, group_size, quant_method)


def matrix_nbytes(rows: int, cols: int, kept: int, bits: int, group_size: int, quant_method: str = "rtn") -> int:
    """Bytes of one stored weight matrix with `kept` non-pruned entries."""
    if uses_mask_format(rows, cols, kept, bits, group_size, quant_method):
        return packed_nbytes(rows * cols, 1) + values_nbytes(rows, cols, kept, bits, group_size, quant_method)
    return values_nbytes(rows, cols, rows * cols, bits, group_size, quant_method)


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
