"""How many bytes a stored weight matrix takes, in the form `save_compressed` writes it.

One rule, used both for accounting and by checkpoints, so the bytes a plan is charged are the bytes
a checkpoint holds (safetensors header aside):
- bits 16: half-precision values;
- bits < 16: the codes and parameters of the quantizer's storage format (`compress.formats`);
- a pruned matrix is stored either densely (pruned weights hold the grid's exact 0) or as a 1-bit
  keep mask plus only the kept values, whichever is smaller; a format whose grid may lack an exact 0
  always uses the mask form.
"""
from __future__ import annotations

from compsearch.compress.bits import FLOAT_BITS, pack_bits, packed_nbytes, unpack_bits
from compsearch.compress.techniques import quantizer_format

__all__ = ["FLOAT_BITS", "matrix_nbytes", "pack_bits", "packed_nbytes", "unpack_bits", "uses_mask_format",
           "values_nbytes"]


def values_nbytes(rows: int, cols: int, count: int, bits: int, group_size: int, quant_method: str = "rtn") -> int:
    """Bytes of `count` stored values of a rows x cols matrix, with their format's parameters."""
    if bits >= FLOAT_BITS:
        return count * FLOAT_BITS // 8
    return quantizer_format(quant_method).values_nbytes(rows, cols, count, bits, group_size)


def uses_mask_format(rows: int, cols: int, kept: int, bits: int, group_size: int, quant_method: str = "rtn") -> bool:
    """Whether the matrix is stored as a keep mask plus the kept values (else densely)."""
    if kept == rows * cols:
        return False
    if bits < FLOAT_BITS and not quantizer_format(quant_method).exact_zero:
        return True
    masked = packed_nbytes(rows * cols, 1) + values_nbytes(rows, cols, kept, bits, group_size, quant_method)
    return masked < values_nbytes(rows, cols, rows * cols, bits, group_size, quant_method)


def matrix_nbytes(rows: int, cols: int, kept: int, bits: int, group_size: int, quant_method: str = "rtn") -> int:
    """Bytes of one stored weight matrix with `kept` non-pruned entries."""
    if uses_mask_format(rows, cols, kept, bits, group_size, quant_method):
        return packed_nbytes(rows * cols, 1) + values_nbytes(rows, cols, kept, bits, group_size, quant_method)
    return values_nbytes(rows, cols, rows * cols, bits, group_size, quant_method)
