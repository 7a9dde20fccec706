"""How llama.cpp's CPU matrix products round their inputs, so a trial computes what llama.cpp computes.

llama.cpp multiplies a quantized weight by activations quantized to 8 bits first (the weight type's
`vec_dot_type`): blocks of 32 inputs with an fp16 scale (`q8_0`; `q8_1` for Q4_1 and Q5_1 rounds the
same way) for the 32-block types, blocks of 256 with a float32 scale (`q8_K`) for K-types. The product
of the stored integers equals the product of the dequantized values up to float accumulation order, so
rounding a Linear's input to those values before the matmul reproduces the runtime's numerics. On
SmolLM2-135M this is most of the gap between a trial's perplexity in PyTorch and the same file's in
llama.cpp (0.1-1.3% before). Rounding as ggml-cpu's x86 code does: `quantize_row_q8_0` (scale
amax / 127, stored fp16; codes round(x * 127 / amax), ties to even) and `quantize_row_q8_K_ref`
(scale -max / 127 of the signed largest magnitude, codes at most 127).
"""
from __future__ import annotations

import torch

INPUT_BLOCK = {"q8_0": 32, "q8_1": 32, "q8_K": 256}


def round_inputs(x: torch.Tensor, input_type: str) -> torch.Tensor:
    """`x` (..., features; features a multiple of the block) as llama.cpp's `input_type` holds it,
    dequantized; the gradient passes straight through (distillation trains through the rounding)."""
    block = INPUT_BLOCK[input_type]
    blocks = x.detach().float().reshape(*x.shape[:-1], -1, block)
    if input_type == "q8_K":
        rounded = _q8_k(blocks)
    else:
        rounded = _q8_0(blocks)
    rounded = rounded.reshape(x.shape).to(x.dtype)
    return x + (rounded - x).detach()


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
    scale = (amax / 127.0).half().float()
    return torch.round(blocks * inverse) * scale


def _q8_k(blocks: torch.Tensor) -> torch.Tensor:
    signed_max = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))
    # an all-zero block rounds to 0 under any scale: give it one that is finite
    inverse = -127.0 / torch.where(signed_max != 0, signed_max, torch.ones_like(signed_max))
    return torch.round(blocks * inverse).clamp(max=127) * (1.0 / inverse)
