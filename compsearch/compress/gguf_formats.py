"""GGUF tensor types as registered storage formats and quantizers (`quant_method` = the type's name,
lower case: `q4_k`, `q8_0`, ...).

The bytes a plan is charged are the type's blocks, the values a trial computes with are exactly those
llama.cpp loads (multiplied with inputs rounded as llama.cpp rounds them: `ggml_inputs`), and a plan
whose layers all use these types exports to a .gguf file (`compsearch.compress.gguf_export`). K-types
need rows (input features) of a multiple of 256 values; a layer whose rows are not gets the type
llama-quantize falls back to (Q4_K -> Q5_0, ...), so a per-group choice means what it means in
llama.cpp's own mixes.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from compsearch.compress.formats import FORMATS, StorageFormat
from compsearch.compress.ggml_blocks import BLOCK_TYPES, BlockQuantized, BlockType, pack, unpack
from compsearch.compress.ggml_inputs import round_inputs
from compsearch.compress.ggml_quantize import quantize_blocks, quantize_blocks_gptq
from compsearch.compress.techniques import HESSIAN, NORMS, QUANTIZERS, Quantizer, quantizer_for
from compsearch.spaces.knobs import FLOAT_METHOD
from compsearch.spaces.layers import LayerInfo
from compsearch.spaces.plan import LayerPlan

# What llama-quantize uses where a row length does not suit a K-type (llama-quant.cpp's
# `tensor_type_fallback`, in the llama.cpp llama-cpp-python 0.3.36 vendors).
FALLBACKS = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


class GGMLFormat(StorageFormat):
    """A ggml block type: the stored bytes are the blocks as a GGUF file holds them. A pruned matrix
    keeps its full blocks (pruned weights hold the grid's 0 where the type has one, else the mask
    zeroes them); distillation may scale the per-block fp16 scales."""

    trainable = "d"
    rounds_inputs = True

    def __init__(self, block_type: BlockType):
        self.type = block_type
        self.name = block_type.name
        self.row_multiple = block_type.block_size
        # symmetric grids (code - offset) hold an exact 0; grids with a minimum or a level table do not
        self.exact_zero = not block_type.has_min and block_type.grid is None

    def values_nbytes(self, rows: int, cols: int, count: int, bits: int, group_size: int) -> int:
        if cols % self.type.block_size:
            raise ValueError(f"{self.name} stores rows of a multiple of {self.type.block_size} values, not {cols}")
        return rows * cols // self.type.block_size * self.type.type_size

    def pack(self, quantized: BlockQuantized, keep: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"blocks": torch.from_numpy(pack(quantized))}

    def unpack(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, int], bits: int, group_size: int,
               keep: torch.Tensor | None) -> BlockQuantized:
        return unpack(self.type, np.asarray(parts["blocks"].numpy()), shape)

    def round_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return round_inputs(x, self.type.input_type)


def _quantizer(block_type: BlockType):
    def quantize(values, bits, group_size, stats, keep, key):
        if stats.hessian is not None:  # error-compensating fill; its diagonal is the importance
            return quantize_blocks_gptq(values, block_type, stats.hinv_factor(key, activation_order=True),
                                        stats.activation_order(), torch.diagonal(stats.hessian), keep)
        importance = stats.norms.square() if stats.norms is not None else None  # proportional to mean x^2
        if keep is not None:  # pruned weights are stored as codes too, but must not steer the scales
            values = values * keep
        return quantize_blocks(values, block_type, importance)
    return quantize


for _type in BLOCK_TYPES.values():
    FORMATS.register(GGMLFormat(_type))
    QUANTIZERS.register(Quantizer(_type.name, _type.name, _quantizer(_type), needs=frozenset({NORMS, HESSIAN}),
                                  bits=(_type.bits,), fallback=FALLBACKS.get(_type.name)))
GGUF_TYPES = tuple(BLOCK_TYPES)


def gguf_type(layer: LayerInfo, plan: LayerPlan) -> str:
    """The GGUF type a layer is stored in under its plan (`f16`, or the type with llama.cpp's fallbacks)."""
    quantizer = quantizer_for(plan.quant_method, layer.in_features) if plan.bits < 16 else None
    return quantizer.name if quantizer else FLOAT_METHOD
