"""A plan applied to a shared model says what it changed, and can be undone exactly, also when it fails
part-way, whatever its techniques touched (structure, factors, attention head grouping)."""
import copy

import pytest
import torch

from compsearch.compress import apply_plan_
from compsearch.compress.techniques import QUANTIZERS, Quantizer
from compsearch.spaces.plan import LayerPlan, Plan


def _snapshot(model):
    return ({name: param.clone() for name, param in model.state_dict().items()},
            {name: type(module) for name, module in model.named_modules()},
            {name: getattr(module, "num_key_value_groups", None) for name, module in model.named_modules()},
            {name: len(module._forward_pre_hooks) for name, module in model.named_modules()})


def _plan(layers, last: LayerPlan) -> Plan:
    """Heads and channels of block 0 removed, a low-rank and a quantized layer, then `last` on block 1's down."""
    plans = {}
    for layer in layers:
        if ".layers.0." in layer.name:
            structure = {"head_fraction": 0.5} if "self_attn" in layer.name else {"channel_fraction": 0.5}
            plans[layer.name] = LayerPlan(bits=4, quant_method="gptq", **structure)
        elif layer.kind == "o_proj":
            plans[layer.name] = LayerPlan(rank_fraction=0.25)
    plans["model.embed_tokens"] = LayerPlan(bits=8, quant_method="q8_0")  # tied to the output head, which
    # now rounds its inputs as llama.cpp does
    plans["model.layers.1.mlp.down_proj"] = last
    return Plan(plans)


def test_undo_restores_the_model_exactly(calibrated_tiny):
    model, _, _, layers, (norms, hessians) = calibrated_tiny
    model = copy.deepcopy(model)
    before = _snapshot(model)
    applied = apply_plan_(model, _plan(layers, LayerPlan(bits=3)), norms, hessians=hessians, undoable=True)
    assert applied.edits.changed[:2] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert "model.layers.0.self_attn" in applied.edits.changed  # saved whole: its head grouping changed too
    assert _snapshot(model)[1] != before[1]
    applied.edits.undo_(model)
    after = _snapshot(model)
    assert after[1:] == before[1:]
    assert all(torch.equal(after[0][name], value) for name, value in before[0].items())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor for both


def test_a_plan_that_fails_part_way_leaves_the_model_as_it_was(calibrated_tiny):
    model, _, _, layers, (norms, hessians) = calibrated_tiny
    model = copy.deepcopy(model)
    before = _snapshot(model)

    def fails(values, bits, group_size, stats, keep, key):
        raise RuntimeError("quantizer failed")

    with QUANTIZERS.registered(Quantizer("test-fails", "affine", fails)), pytest.raises(RuntimeError, match="failed"):
        apply_plan_(model, _plan(layers, LayerPlan(bits=4, quant_method="test-fails")), norms, hessians=hessians,
                    undoable=True)
    after = _snapshot(model)
    assert after[1:] == before[1:]
    assert all(torch.equal(after[0][name], value) for name, value in before[0].items())


def test_edits_without_copies_cannot_be_undone(calibrated_tiny):
    model, _, _, layers, _ = calibrated_tiny
    applied = apply_plan_(copy.deepcopy(model), Plan({layers[0].name: LayerPlan(bits=8)}))
    assert applied.edits.changed == [layers[0].name]
    with pytest.raises(ValueError, match="undoable=False"):
        applied.edits.undo_(model)
