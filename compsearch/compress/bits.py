"""Packing small unsigned integers into bytes, and the widths of the float values stored beside them."""
from __future__ import annotations

import torch

SCALE_BITS = 16  # fp16 scales and codebook entries
FLOAT_BITS = 16  # weights kept in floating point are stored as fp16


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


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
