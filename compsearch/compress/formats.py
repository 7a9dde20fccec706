"""Storage formats of quantized matrices: how a quantizer's output is stored, and what that costs.

A format is one object registered in `FORMATS`; everything else (byte accounting, checkpoints,
distillation, latency kernels) asks it. Adding a format is one class and one `FORMATS.register` call;
`tests/compress/format_contract.py` is the suite every registered format passes.

A stored matrix is either dense (every position has a code; a pruned weight holds the grid's exact 0)
or, when pruned, a 1-bit keep mask plus the codes of the kept weights only, whichever is smaller; a
format whose grid may lack an exact 0 always uses the mask form when pruned.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Mapping, Protocol

import torch

from compsearch.compress.bits import SCALE_BITS, pack_bits, packed_nbytes, unpack_bits
from compsearch.compress.kmeans import PalettizedMatrix
from compsearch.compress.quantize import QuantizedMatrix
from compsearch.registry import Registry


class Quantized(Protocol):
    """What a quantizer returns: integer codes with the format's parameters."""

    codes: torch.Tensor  # uint8, (rows, cols)
    bits: int

    def dequantize(self) -> torch.Tensor: ...


class StorageFormat(ABC):
    """How codes and their parameters are stored.

    `exact_zero`: the grid always holds an exact 0, so a pruned weight can be stored as a code;
    `trainable`: the field of the quantized matrix (a float tensor) that distillation may scale,
    leaving codes and format intact; `row_multiple`: rows must hold a multiple of this many values;
    `whole_groups`: rows must hold whole groups of the plan's group size;
    `rounds_inputs`: the runtime that reads the format rounds a matrix's inputs before multiplying
    (`round_inputs`), so a compressed model does too.
    """

    name: str
    exact_zero: bool = True
    trainable: str
    row_multiple: int = 1
    whole_groups: bool = False
    rounds_inputs: bool = False

    @abstractmethod
    def values_nbytes(self, rows: int, cols: int, count: int, bits: int, group_size: int) -> int:
        """Bytes of `count` stored codes of a rows x cols matrix with the format's parameters."""

    @abstractmethod
    def pack(self, quantized: Quantized, keep: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Tensors to store, by part name; with a keep mask, codes of the kept positions only."""

    @abstractmethod
    def unpack(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, int], bits: int, group_size: int,
               keep: torch.Tensor | None) -> Quantized:
        """Inverse of `pack`: the quantized matrix (codes at every position)."""

    def kernel(self, bits: int, group_size: int, device_type: str) -> str:
        """The fast kernel a matrix of this format runs on (`int8`, `int4`), or `simulated` for none."""
        return "simulated"

    def round_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs (..., cols) as the runtime multiplies them with a matrix of this format."""
        return x


class AffineGrid(StorageFormat):
    """Integer codes on (code - zero) * scale: per group of `group_size` inputs of a row, an fp16 scale
    and an integer zero point packed at `bits` (0 is always on the grid)."""

    name = "affine"
    trainable = "scales"

    def values_nbytes(self, rows: int, cols: int, count: int, bits: int, group_size: int) -> int:
        groups = rows * math.ceil(cols / group_size)
        return packed_nbytes(count, bits) + groups * SCALE_BITS // 8 + packed_nbytes(groups, bits)

    def pack(self, quantized: QuantizedMatrix, keep: torch.Tensor | None) -> dict[str, torch.Tensor]:
        codes = quantized.codes[keep] if keep is not None else quantized.codes
        return {"codes": pack_bits(codes, quantized.bits), "scales": quantized.scales.contiguous(),
                "zeros": pack_bits(quantized.zeros, quantized.bits)}

    def unpack(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, int], bits: int, group_size: int,
               keep: torch.Tensor | None) -> QuantizedMatrix:
        rows, cols = shape
        scales = parts["scales"]
        zeros = unpack_bits(parts["zeros"], bits, scales.numel()).reshape(scales.shape)
        if keep is None:
            codes = unpack_bits(parts["codes"], bits, rows * cols).reshape(rows, cols)
        else:  # pruned positions hold the zero point, which dequantizes to exactly 0
            codes = zeros.repeat_interleave(group_size, dim=1)[:, :cols].clone()
            codes[keep] = unpack_bits(parts["codes"], bits, int(keep.sum()))
        return QuantizedMatrix(codes, scales, zeros, bits, group_size)

    def kernel(self, bits: int, group_size: int, device_type: str) -> str:
        if bits == 8:
            return "int8"  # torch's dynamic int8 Linear on CPU, torchao int8 weight-only on CUDA
        if device_type == "cuda" and bits == 4 and group_size in (32, 64, 128):
            return "int4"  # torchao int4 weight-only (tinygemm)
        return "simulated"


class SymmetricGrid(AffineGrid):
    """Integer codes on (code - 2**(bits-1)) * scale, an fp16 scale per group of `group_size` inputs of a
    row: the grid is symmetric about 0, so no zero point is stored. This is compressed-tensors' symmetric
    integer format (`pack-quantized`), which vLLM runs at 4 and 8 bits: it needs whole groups and stores
    every code (no masks: a pruned weight is a code of 0)."""

    name = "symmetric"
    whole_groups = True

    def values_nbytes(self, rows: int, cols: int, count: int, bits: int, group_size: int) -> int:
        if cols % group_size:
            raise ValueError(f"symmetric groups of {group_size} do not divide rows of {cols} values; "
                             "compressed-tensors and vLLM need whole groups")
        return packed_nbytes(rows * cols, bits) + rows * (cols // group_size) * SCALE_BITS // 8

    def pack(self, quantized: QuantizedMatrix, keep: torch.Tensor | None) -> dict[str, torch.Tensor]:
        codes = quantized.codes[keep] if keep is not None else quantized.codes
        return {"codes": pack_bits(codes, quantized.bits), "scales": quantized.scales.contiguous()}

    def unpack(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, int], bits: int, group_size: int,
               keep: torch.Tensor | None) -> QuantizedMatrix:
        scales = parts["scales"]
        zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8)
        return super().unpack({**parts, "zeros": pack_bits(zeros, bits)}, shape, bits, group_size, keep)


class Palette(StorageFormat):
    """Codes packed at `bits` indexing one codebook of 2**bits fp16 values per row (`group_size` unused).
    A codebook need not hold an exact 0."""

    name = "palette"
    exact_zero = False
    trainable = "codebook"

    def values_nbytes(self, rows: int, cols: int, count: int, bits: int, group_size: int) -> int:
        return packed_nbytes(count, bits) + rows * (1 << bits) * SCALE_BITS // 8

    def pack(self, quantized: PalettizedMatrix, keep: torch.Tensor | None) -> dict[str, torch.Tensor]:
        codes = quantized.codes[keep] if keep is not None else quantized.codes
        return {"codes": pack_bits(codes, quantized.bits), "codebook": quantized.codebook.contiguous()}

    def unpack(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, int], bits: int, group_size: int,
               keep: torch.Tensor | None) -> PalettizedMatrix:
        rows, cols = shape
        if keep is None:
            codes = unpack_bits(parts["codes"], bits, rows * cols).reshape(rows, cols)
        else:  # only kept weights have codes; pruned positions get code 0 (the mask zeroes them)
            codes = torch.zeros(rows, cols, dtype=torch.uint8)
            codes[keep] = unpack_bits(parts["codes"], bits, int(keep.sum()))
        return PalettizedMatrix(codes, parts["codebook"], bits)


FORMATS: Registry[StorageFormat] = Registry("storage format")
FORMATS.register(AffineGrid())
FORMATS.register(SymmetricGrid())
FORMATS.register(Palette())
