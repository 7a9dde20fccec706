"""ggml's block layouts (the tensor types of GGUF files, as llama.cpp reads them), byte for byte.

A quantized row is a run of blocks; each block stores integer codes for `block_size` weights and the
scales that turn them into values. Every type here is described the same way (`BlockType`): the
codes are unsigned integers, a value is `scale * grid(code) + bias` with

    scale = d * sub_scale            (d an fp16 per block; sub_scale an integer per sub-block, or 1)
    bias  = -dmin * sub_min          (K-types with mins), + m (Q4_1, Q5_1), or 0

computed in float32 in the order ggml's reference dequantizers use, so `dequantize` gives exactly the
values llama.cpp loads (checked against gguf-py's dequantizers in tests/compress/test_ggml_blocks.py).
`pack` writes the block bytes; `unpack` reads them back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

QK_K = 256
IQ4_NL_GRID = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


@dataclass(frozen=True)
class CodePlane:
    """Bits [value_shift, value_shift + width) of the codes, packed into `size` bytes at `offset` of a
    block: sub-field k (bits [k*width, (k+1)*width) of byte b) holds element `index[b][k]`."""

    offset: int
    width: int
    value_shift: int
    index: tuple[tuple[int, ...], ...]


def _plane(offset: int, width: int, value_shift: int, element) -> CodePlane:
    """A plane whose `n_bytes` bytes hold 8 // width elements each; `element(byte, k)` names them."""
    per_byte = 8 // width
    n_bytes = len(element)
    return CodePlane(offset, width, value_shift, tuple(tuple(element[b][k] for k in range(per_byte))
                                                        for b in range(n_bytes)))


def _elements(n_bytes: int, per_byte: int, rule) -> list[list[int]]:
    return [[rule(b, k) for k in range(per_byte)] for b in range(n_bytes)]


@dataclass(frozen=True)
class BlockType:
    """One ggml type. `sub_block` weights share a sub-scale (== block_size when there is none);
    `offset` is subtracted from a code before scaling (unless `grid` maps codes to levels);
    `d_offset`/`dmin_offset`: where the fp16 scales sit in the block (-1: absent)."""

    name: str  # lower case of gguf's GGMLQuantizationType name
    bits: int
    block_size: int
    type_size: int
    sub_block: int
    code_offset: int
    planes: tuple[CodePlane, ...]
    d_offset: int
    dmin_offset: int = -1  # fp16 dmin (K-types) or m (Q4_1/Q5_1)
    sub_scale_bits: int = 0  # width of the integer sub-scales (0: none)
    sub_scale_signed: bool = False
    sub_min_bits: int = 0
    grid: tuple[int, ...] | None = None
    min_subtracted: bool = True  # K-types: value - dmin*m; Q4_1/Q5_1: value + m
    input_type: str = "q8_0"  # how llama.cpp rounds the inputs multiplied with it (its vec_dot_type)

    @property
    def code_levels(self) -> int:
        return 1 << self.bits

    @property
    def subs_per_block(self) -> int:
        return self.block_size // self.sub_block

    @property
    def has_min(self) -> bool:
        return self.dmin_offset >= 0

    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


@dataclass
class BlockQuantized:
    """A matrix in a ggml type: codes (rows, cols) and per-block fp16 `d` (and `dmin`), per sub-block
    integer `sub_scales` (and `sub_mins`)."""

    type: BlockType
    codes: torch.Tensor  # uint8 (rows, cols)
    d: torch.Tensor  # float16 (rows, blocks)
    dmin: torch.Tensor | None = None  # float16 (rows, blocks)
    sub_scales: torch.Tensor | None = None  # int16 (rows, sub-blocks)
    sub_mins: torch.Tensor | None = None  # int16 (rows, sub-blocks)
    bits: int = field(init=False)

    def __post_init__(self) -> None:
        self.bits = self.type.bits

    def levels(self) -> torch.Tensor:
        """Every code's level before scaling (rows, cols): the type's grid entry, or code - offset."""
        t = self.type
        if t.grid is not None:
            return torch.tensor(t.grid, dtype=torch.float32)[self.codes.long()]
        return self.codes.float() - t.code_offset

    def dequantize(self) -> torch.Tensor:
        t = self.type
        rows, cols = self.codes.shape
        d = self.d.float()
        if self.sub_scales is not None:
            scale = d.repeat_interleave(t.subs_per_block, dim=1) * self.sub_scales.float()
        else:
            scale = d
        values = scale.repeat_interleave(t.sub_block, dim=1) * self.levels()
        if self.dmin is not None:
            bias = self.dmin.float()
            if self.sub_mins is not None:
                bias = bias.repeat_interleave(t.subs_per_block, dim=1) * self.sub_mins.float()
            bias = bias.repeat_interleave(t.sub_block, dim=1)
            values = values - bias if t.min_subtracted else values + bias
        return values.reshape(rows, cols)


def pack(q: BlockQuantized) -> np.ndarray:
    """The ggml bytes of `q`: uint8 (rows, blocks * type_size), rows as llama.cpp stores them."""
    t = q.type
    rows, cols = q.codes.shape
    n_blocks = rows * cols // t.block_size
    out = np.zeros((n_blocks, t.type_size), dtype=np.uint8)
    codes = q.codes.numpy().reshape(n_blocks, t.block_size)
    if t.name == "q8_0":
        out[:, 2:] = codes ^ 0x80  # int8 two's complement of code - 128
    for plane in t.planes:
        index = np.array(plane.index)
        mask = (1 << plane.width) - 1
        packed = np.zeros((n_blocks, len(index)), dtype=np.uint8)
        for k in range(index.shape[1]):
            packed |= ((codes[:, index[:, k]] >> plane.value_shift) & mask).astype(np.uint8) << (k * plane.width)
        out[:, plane.offset:plane.offset + len(index)] = packed
    _put_f16(out, t.d_offset, q.d)
    if t.has_min:
        _put_f16(out, t.dmin_offset, q.dmin)
    if t.sub_scale_bits:
        _pack_sub_scales(t, out, q.sub_scales.numpy().reshape(n_blocks, -1),
                         q.sub_mins.numpy().reshape(n_blocks, -1) if q.sub_mins is not None else None)
    return out.reshape(rows, -1)


def unpack(t: BlockType, data: np.ndarray, shape: tuple[int, int]) -> BlockQuantized:
    """Inverse of `pack`."""
    rows, cols = shape
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, t.type_size)
    n_blocks = len(blocks)
    codes = np.zeros((n_blocks, t.block_size), dtype=np.uint8)
    if t.name == "q8_0":
        codes[:] = blocks[:, 2:] ^ 0x80
    for plane in t.planes:
        index = np.array(plane.index)
        mask = (1 << plane.width) - 1
        part = blocks[:, plane.offset:plane.offset + len(index)]
        for k in range(index.shape[1]):
            codes[:, index[:, k]] |= ((part >> (k * plane.width)) & mask) << plane.value_shift
    per_row = cols // t.block_size
    d = torch.from_numpy(_get_f16(blocks, t.d_offset).reshape(rows, per_row))
    dmin = torch.from_numpy(_get_f16(blocks, t.dmin_offset).reshape(rows, per_row)) if t.has_min else None
    sub_scales = sub_mins = None
    if t.sub_scale_bits:
        scales, mins = _unpack_sub_scales(t, blocks)
        sub_scales = torch.from_numpy(scales.reshape(rows, -1))
        sub_mins = torch.from_numpy(mins.reshape(rows, -1)) if mins is not None else None
    return BlockQuantized(t, torch.from_numpy(codes.reshape(rows, cols)), d, dmin, sub_scales, sub_mins)


def _put_f16(out: np.ndarray, offset: int, values: torch.Tensor) -> None:
    out[:, offset:offset + 2] = values.to(torch.float16).numpy().reshape(-1, 1).view(np.uint8)


def _get_f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16).reshape(-1).copy()


def _pack_sub_scales(t: BlockType, out: np.ndarray, scales: np.ndarray, mins: np.ndarray | None) -> None:
    stored = (scales + 32 if t.name == "q3_k" else scales).astype(np.int16)
    if t.name == "q2_k":
        out[:, 0:16] = (stored & 0xF) | ((mins & 0xF) << 4)
    elif t.name == "q3_k":  # 16 six-bit values: low nibbles in bytes 0-7, high 2 bits in bytes 8-11
        low, high = (stored & 0xF).astype(np.uint8), ((stored >> 4) & 0x3).astype(np.uint8)
        out[:, 96:104] = low[:, :8] | (low[:, 8:] << 4)
        out[:, 104:108] = high[:, 0:4] | (high[:, 4:8] << 2) | (high[:, 8:12] << 4) | (high[:, 12:16] << 6)
    elif t.name in ("q4_k", "q5_k"):  # 8 six-bit scales and 8 six-bit mins in 12 bytes
        sc, m = stored.astype(np.uint8), mins.astype(np.uint8)
        out[:, 4:8] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
        out[:, 8:12] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
        out[:, 12:16] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    elif t.name == "q6_k":
        out[:, 192:208] = stored.astype(np.int8).view(np.uint8)


def _unpack_sub_scales(t: BlockType, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    if t.name == "q2_k":
        raw = blocks[:, 0:16].astype(np.int16)
        return raw & 0xF, raw >> 4
    if t.name == "q3_k":
        low = np.concatenate([blocks[:, 96:104] & 0xF, blocks[:, 96:104] >> 4], axis=1).astype(np.int16)
        high = np.concatenate([(blocks[:, 104:108] >> s) & 0x3 for s in (0, 2, 4, 6)], axis=1).astype(np.int16)
        return (low | (high << 4)) - 32, None
    if t.name in ("q4_k", "q5_k"):
        b = blocks.astype(np.int16)
        sc = np.concatenate([b[:, 4:8] & 0x3F, (b[:, 12:16] & 0xF) | ((b[:, 4:8] >> 6) << 4)], axis=1)
        m = np.concatenate([b[:, 8:12] & 0x3F, (b[:, 12:16] >> 4) | ((b[:, 8:12] >> 6) << 4)], axis=1)
        return sc, m
    return blocks[:, 192:208].copy().view(np.int8).astype(np.int16), None  # q6_k


def _nibbles_32() -> list[list[int]]:
    """32-element blocks: byte b holds element b (low nibble) and b + 16 (high nibble)."""
    return _elements(16, 2, lambda b, k: b + 16 * k)


def _bits_32() -> list[list[int]]:
    """The high bits of 32 elements as a little-endian uint32: bit k of byte b is element 8b + k."""
    return _elements(4, 8, lambda b, k: 8 * b + k)


def _two_bit_256() -> list[list[int]]:
    """Q2_K/Q3_K low bits: byte 32h + j holds elements 128h + 32s + j at bits 2s."""
    return _elements(64, 4, lambda b, k: 128 * (b // 32) + 32 * k + b % 32)


def _bit_planes_256() -> list[list[int]]:
    """One bit of 256 elements in 32 bytes: bit k of byte j is element 32k + j."""
    return _elements(32, 8, lambda b, k: 32 * k + b)


def _nibbles_256() -> list[list[int]]:
    """Q4_K/Q5_K low nibbles: byte 32c + j holds elements 64c + j (low) and 64c + 32 + j (high)."""
    return _elements(128, 2, lambda b, k: 64 * (b // 32) + 32 * k + b % 32)


def _q6_low() -> list[list[int]]:
    """Q6_K low nibbles: byte 64h + j holds elements 128h + j (low) and 128h + 64 + j (high)."""
    return _elements(128, 2, lambda b, k: 128 * (b // 64) + 64 * k + b % 64)


BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("q8_0", 8, 32, 34, 32, 128, (), d_offset=0),
    BlockType("q4_0", 4, 32, 18, 32, 8, (_plane(2, 4, 0, _nibbles_32()),), d_offset=0),
    BlockType("q4_1", 4, 32, 20, 32, 0, (_plane(4, 4, 0, _nibbles_32()),), d_offset=0, dmin_offset=2,
              min_subtracted=False, input_type="q8_1"),
    BlockType("q5_0", 5, 32, 22, 32, 16, (_plane(2, 1, 4, _bits_32()), _plane(6, 4, 0, _nibbles_32())),
              d_offset=0),
    BlockType("q5_1", 5, 32, 24, 32, 0, (_plane(4, 1, 4, _bits_32()), _plane(8, 4, 0, _nibbles_32())),
              d_offset=0, dmin_offset=2, min_subtracted=False, input_type="q8_1"),
    BlockType("iq4_nl", 4, 32, 18, 32, 0, (_plane(2, 4, 0, _nibbles_32()),), d_offset=0, grid=IQ4_NL_GRID),
    BlockType("q2_k", 2, QK_K, 84, 16, 0, (_plane(16, 2, 0, _two_bit_256()),), d_offset=80, dmin_offset=82,
              sub_scale_bits=4, sub_min_bits=4, input_type="q8_K"),
    BlockType("q3_k", 3, QK_K, 110, 16, 4, (_plane(0, 1, 2, _bit_planes_256()), _plane(32, 2, 0, _two_bit_256())),
              d_offset=108, sub_scale_bits=6, sub_scale_signed=True, input_type="q8_K"),
    BlockType("q4_k", 4, QK_K, 144, 32, 0, (_plane(16, 4, 0, _nibbles_256()),), d_offset=0, dmin_offset=2,
              sub_scale_bits=6, sub_min_bits=6, input_type="q8_K"),
    BlockType("q5_k", 5, QK_K, 176, 32, 0, (_plane(16, 1, 4, _bit_planes_256()), _plane(48, 4, 0, _nibbles_256())),
              d_offset=0, dmin_offset=2, sub_scale_bits=6, sub_min_bits=6, input_type="q8_K"),
    BlockType("q6_k", 6, QK_K, 210, 16, 32, (_plane(0, 4, 0, _q6_low()), _plane(128, 2, 4, _two_bit_256())),
              d_offset=208, sub_scale_bits=8, sub_scale_signed=True, input_type="q8_K"),
)}
