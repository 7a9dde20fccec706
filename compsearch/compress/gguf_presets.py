"""llama.cpp's quantization presets (`llama-quantize MODEL OUT Q4_K_M`) as per-tensor GGUF types.

The tensor types llama-quantize chooses for a preset (llama-quant.cpp's `llama_tensor_get_type`, in the
llama.cpp that llama-cpp-python 0.3.36 vendors), for dense models with separate q/k/v projections: a
default type, attn_v and ffn_down given more bits in some blocks, the output (or, where it is tied, the
token embedding) in Q6_K, and a type a row length cannot hold falling back as llama-quantize falls
back (`gguf_formats.FALLBACKS`). A study of the `gguf` space starts from these mixes, so that each
preset's tensor types are measured with compsearch's rounding at the preset's own size.
"""
from __future__ import annotations

from compsearch.compress.ggml_blocks import BLOCK_TYPES
from compsearch.compress.gguf_formats import FALLBACKS
from compsearch.spaces.knobs import FLOAT_METHOD
from compsearch.spaces.layers import LayerInfo
from compsearch.spaces.plan import block_index

# The presets and their default type, most bytes first.
PRESETS = {"Q8_0": "q8_0", "Q6_K": "q6_k", "Q5_K_M": "q5_k", "Q5_K_S": "q5_k", "Q4_K_M": "q4_k",
           "Q4_K_S": "q4_k", "Q4_0": "q4_0", "Q3_K_M": "q3_k", "Q3_K_S": "q3_k", "Q2_K": "q2_k"}
EMBEDDING_KINDS = ("embed_tokens", "wte", "word_embeddings")
OUTPUT_KINDS = ("lm_head",)


class PresetError(ValueError):
    """A preset name llama-quantize's mixes here do not include."""


def preset_types(preset: str, layers: list[LayerInfo], tied_embeddings: bool,
                 importance_matrix: bool = True) -> dict[str, str]:
    """The GGUF type (`q4_k`, ..., or `f16`) llama-quantize gives each of `layers` under `preset`.

    `tied_embeddings`: the token embedding is also the output head (it then gets the output's type);
    `importance_matrix`: quantized with one (Q4_0 then stores the first eighth of ffn_down in Q4_1).
    """
    if preset not in PRESETS:
        raise PresetError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    blocks = 1 + max((block_index(layer.name) for layer in layers if block_index(layer.name) is not None), default=0)
    query_per_kv = next((layer.heads // layer.kv_heads for layer in layers if layer.kv_heads), 1)
    return {layer.name: _fallback(_wanted(preset, layer, blocks, query_per_kv, tied_embeddings, importance_matrix),
                                  layer.in_features)
            for layer in layers}


def _wanted(preset: str, layer: LayerInfo, blocks: int, query_per_kv: int, tied_embeddings: bool,
            importance_matrix: bool) -> str:
    """The type llama-quantize picks for one tensor before the row-length fallback."""
    default = PRESETS[preset]
    kind = layer.kind
    if kind in OUTPUT_KINDS or (tied_embeddings and kind in EMBEDDING_KINDS):
        if layer.in_features % BLOCK_TYPES[default].block_size:
            return "q8_0"
        return default if default == "q8_0" else "q6_k"
    index = block_index(layer.name)
    if index is None:
        return default
    if kind == "v_proj":  # attn_v, counted in file order: its block
        if preset == "Q2_K":
            return "q4_k" if query_per_kv >= 4 else "q3_k"
        if preset == "Q3_K_M":
            return "q5_k" if index < 2 else "q4_k"
        if preset in ("Q4_K_M", "Q5_K_M") and _more_bits(index, blocks):
            return "q6_k"
        if preset == "Q4_K_S" and index < 4:
            return "q5_k"
    elif kind == "down_proj":
        if preset == "Q2_K":
            return "q3_k"
        if preset == "Q3_K_M":
            return "q5_k" if index < blocks // 16 else "q4_k"
        if preset in ("Q4_K_M", "Q5_K_M") and _more_bits(index, blocks):
            return "q6_k"
        if preset == "Q4_K_S" and index < blocks // 8:
            return "q5_k"
        if preset == "Q4_0" and importance_matrix and index < blocks // 8:
            return "q4_1"
    elif kind == "o_proj":
        if preset == "Q2_K":
            return "q3_k"
        if preset == "Q3_K_M":
            return "q4_k"
    return default


def _more_bits(index: int, blocks: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the blocks and every third between."""
    return index < blocks // 8 or index >= 7 * blocks // 8 or (index - blocks // 8) % 3 == 2


def _fallback(kind: str, row_length: int) -> str:
    """The type a row of `row_length` values is stored in: `kind`, its fallback, or F16."""
    for candidate in (kind, FALLBACKS.get(kind, kind)):
        if row_length % BLOCK_TYPES[candidate].block_size == 0:
            return candidate
    return FLOAT_METHOD
