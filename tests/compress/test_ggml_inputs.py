"""Inputs of GGUF-typed matrices are rounded as llama.cpp rounds them before multiplying: the 32-block
types' q8_0 exactly as gguf-py writes it, the K-types' q8_K to integers of one scale per 256 inputs."""
import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from compsearch.compress import apply_plan_
from compsearch.compress.ggml_inputs import round_inputs
from compsearch.spaces.plan import LayerPlan, Plan


def _activations() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(8, 4, 512) * torch.rand(8, 4, 1) * 3
    x[0, 0, :32] = 0  # an all-zero block stays zero
    return x


def test_q8_0_inputs_are_what_gguf_py_writes():
    x = _activations()
    expected = quants.dequantize(quants.quantize(x.reshape(-1, 512).numpy(), GGMLQuantizationType.Q8_0),
                                 GGMLQuantizationType.Q8_0)
    assert np.array_equal(round_inputs(x, "q8_0").reshape(-1, 512).numpy(), expected)
    assert torch.equal(round_inputs(x, "q8_1"), round_inputs(x, "q8_0"))


def test_q8_k_inputs_are_integers_of_one_scale_per_256():
    x = _activations()
    rounded = round_inputs(x, "q8_K").reshape(-1, 2, 256)
    blocks = x.reshape(-1, 2, 256)
    signed_max = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    scale = (signed_max / -127).where(signed_max != 0, torch.ones_like(signed_max))
    codes = rounded / scale
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.round().abs().max() <= 127
    assert ((rounded - blocks).abs() <= scale.abs() / 2 * (1 + 1e-5)).all()
    assert torch.equal(rounded.reshape(x.shape)[0, 0, :32], torch.zeros(32))
    assert not torch.equal(rounded, blocks)


def test_the_gradient_passes_straight_through():
    x = _activations().requires_grad_()
    round_inputs(x, "q8_K").sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("quant_method, input_type", [("q4_k", "q8_K"), ("q4_0", "q8_0"), ("q4_1", "q8_1")])
def test_a_gguf_layer_multiplies_rounded_inputs(calibrated_wide, quant_method, input_type):
    model, _, _, layers, (norms, hessians) = calibrated_wide
    model = copy.deepcopy(model)
    name = "model.layers.0.mlp.down_proj"
    apply_plan_(model, Plan({name: LayerPlan(bits=4, quant_method=quant_method)}), norms, hessians=hessians)
    linear = model.get_submodule(name)
    x = torch.randn(3, linear.in_features)
    assert torch.equal(linear(x), torch.nn.functional.linear(round_inputs(x, input_type), linear.weight))


def test_the_tied_output_head_rounds_as_its_embedding_type(calibrated_wide):
    model = calibrated_wide[0]
    model = copy.deepcopy(model)
    apply_plan_(model, Plan({"model.embed_tokens": LayerPlan(bits=6, quant_method="q6_k")}))
    x = torch.randn(3, model.lm_head.in_features)
    assert torch.equal(model.lm_head(x), torch.nn.functional.linear(round_inputs(x, "q8_K"), model.lm_head.weight))
    assert len(model.model.embed_tokens._forward_pre_hooks) == 0  # its rows are looked up, not multiplied
