"""Plans of symmetric integer weights written as compressed-tensors checkpoints: transformers loads them
and computes exactly what the trial computed; the tensors are the plan's bytes; what the format cannot
hold is refused with the layer and the fix."""
import copy

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from compsearch.compress import apply_plan_, plan_nbytes
from compsearch.compress.ct_export import (
    CompressedTensorsExportError, checkpoint_nbytes, export_compressed_tensors, load_checkpoint,
)
from compsearch.evaluators.quality import perplexity_and_kl
from compsearch.spaces import get_space
from compsearch.spaces.plan import LayerPlan, Plan


def _vllm_plan(layers) -> Plan:
    """4 bits on the MLP (gate/up g64, down g128), 8 bits on attention, block 1's v_proj at 16 bits, and
    block 1's MLP 2:4-pruned at 8 bits."""
    space = get_space("vllm")
    plans = {}
    for layer in layers:
        choice = {"bits": 4 if "mlp" in layer.name else 8, "group_size": 128 if "down" in layer.name else 64,
                  "quant_method": "gptq-sym"}
        if layer.name.endswith("1.self_attn.v_proj"):
            choice["bits"] = 16
        plans[layer.name] = space.layer_plan(layer, choice)
        if ".1.mlp." in layer.name:
            plans[layer.name] = LayerPlan(bits=8, group_size=64, quant_method="gptq-sym", sparsity=0.5, pattern="2:4",
                                          prune_method="sparsegpt")
    return Plan(plans)


@pytest.fixture(scope="module")
def exported(calibrated_wide, tmp_path_factory):
    model, tokenizer, windows, layers, (norms, hessians) = calibrated_wide
    plan = _vllm_plan(layers)
    compressed = copy.deepcopy(model)
    stored = apply_plan_(compressed, plan, norms, keep_stored=True, hessians=hessians).stored
    with torch.no_grad():
        logits = compressed(windows.eval_ids).logits
    trial_ppl = perplexity_and_kl(compressed, windows.eval_ids, 2)["ppl"]
    out = export_compressed_tensors(compressed, plan, stored, tmp_path_factory.mktemp("ct") / "model", tokenizer)
    return model, plan, layers, windows, out, logits, trial_ppl


def test_transformers_loads_what_the_trial_computed(exported):
    _, _, _, windows, out, logits, trial_ppl = exported
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # as a user loads it
    with torch.no_grad():
        assert torch.allclose(loaded(windows.eval_ids).logits, logits, atol=1e-4, rtol=0)
    assert perplexity_and_kl(load_checkpoint(out), windows.eval_ids, 2)["ppl"] == pytest.approx(trial_ppl, rel=1e-5)


def test_the_checkpoint_holds_the_plans_schemes_and_bytes(exported):
    model, plan, layers, _, out, _, _ = exported
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.get_slice("model.layers.0.mlp.gate_proj.weight_packed").get_dtype() == "I32"
    assert {"model.layers.0.mlp.down_proj.weight_packed", "model.layers.0.mlp.down_proj.weight_scale",
            "model.layers.1.self_attn.v_proj.weight"} <= keys
    assert not any(key.endswith("weight_zero_point") for key in keys)  # symmetric: no zero points
    config = AutoModelForCausalLM.from_pretrained(out).config.quantization_config
    assert config.quantization_config.format == "pack-quantized"
    planned = plan_nbytes(layers, plan, sum(p.numel() for p in model.parameters()))
    written = checkpoint_nbytes(out)
    assert planned <= written < planned * 1.01 + 64 * 1024  # + each matrix's weight_shape and the header


@pytest.mark.parametrize("layer_plan, fragment", [
    (LayerPlan(bits=4, group_size=64, quant_method="rtn"), "holds symmetric integer weights"),
    (LayerPlan(bits=4, quant_method="q4_0"), "holds symmetric integer weights"),
    (LayerPlan(rank_fraction=0.5), "no low-rank"),
])
def test_plans_compressed_tensors_cannot_hold_are_refused(calibrated_wide, tmp_path, layer_plan, fragment):
    model, _, _, layers, _ = calibrated_wide
    with pytest.raises(CompressedTensorsExportError, match=fragment):
        export_compressed_tensors(model, Plan({layers[0].name: layer_plan}), {}, tmp_path)
    with pytest.raises(CompressedTensorsExportError, match="token embedding is kept at 16 bits"):
        export_compressed_tensors(model, Plan({"model.embed_tokens": LayerPlan(bits=8, group_size=64,
                                                                               quant_method="gptq-sym")}), {}, tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_groups_that_do_not_divide_a_layers_inputs_are_refused(calibrated_tiny, tmp_path):
    model, _, _, layers, _ = calibrated_tiny  # 64 inputs: no whole group of 128
    plan = Plan({layers[0].name: LayerPlan(bits=4, group_size=128, quant_method="gptq-sym")})
    with pytest.raises(CompressedTensorsExportError, match="groups of 128 do not divide its 64 inputs"):
        export_compressed_tensors(model, plan, {}, tmp_path)
