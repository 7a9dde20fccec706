"""Distillation trains only what the storage keeps in float, lowers the KL to the base model, and a
checkpoint written afterwards reproduces the distilled model exactly."""
import copy

import pytest
import torch

from compsearch.compress import apply_plan_, layer_nbytes, load_compressed, save_compressed
from compsearch.compress.distill import DistillSettings, distill_
from compsearch.compress.quantize import QuantizedMatrix
from compsearch.evaluators.quality import base_log_probs, perplexity_and_kl
from compsearch.spaces.plan import LayerPlan, Plan


@pytest.fixture(scope="module")
def tiny(calibrated_tiny):
    return calibrated_tiny


def _mixed_plan(layers) -> Plan:
    """Every kind of stored matrix: grids (RTN, GPTQ), codebooks, pruned 16-bit, low-rank, thinned structure."""
    def layer_plan(layer):
        structure = {"head_fraction": 0.5} if "self_attn" in layer.name else {"channel_fraction": 0.75}
        if layer.kind in ("q_proj", "gate_proj"):
            return LayerPlan(bits=3, group_size=32, quant_method="gptq", **structure)
        if layer.kind in ("k_proj", "up_proj"):
            return LayerPlan(bits=3, quant_method="kmeans", sparsity=0.25, prune_method="wanda", **structure)
        if layer.kind == "v_proj":
            return LayerPlan(sparsity=0.5, pattern="2:4", **structure)
        if layer.kind == "o_proj":
            return LayerPlan(rank_fraction=0.5, **structure)
        return LayerPlan(bits=4, group_size=32, **structure)
    return Plan({layer.name: layer_plan(layer) for layer in layers if ".layers.0." in layer.name})


def test_distillation_lowers_kl_and_keeps_the_format(tiny, tmp_path):
    model, tokenizer, windows, layers, (norms, hessians) = tiny
    plan = _mixed_plan(layers)
    student = copy.deepcopy(model)
    stored = apply_plan_(student, plan, norms, keep_stored=True, hessians=hessians).stored
    before_stored = {key: copy.deepcopy(matrix) for key, matrix in stored.items()}
    untouched = {name: param.clone() for name, param in student.named_parameters() if ".layers.1." in name
                 and "norm" not in name}
    calib = windows.calib_ids
    base = base_log_probs(model, calib, len(calib), None)
    kl_before = perplexity_and_kl(student, calib, len(calib), base)["kl"]

    losses = distill_(student, model, stored, calib, DistillSettings(steps=12, lr=1e-3, scale_lr=1e-2, batch_size=4))

    assert len(losses) == 12 and losses[-1] < losses[0]
    assert perplexity_and_kl(student, calib, len(calib), base)["kl"] < 0.8 * kl_before
    assert not any(param.requires_grad for param in student.parameters())
    for key, matrix in stored.items():
        old = before_stored[key]
        assert matrix.layout == old.layout
        assert torch.equal(student.get_parameter(key), matrix.weight)  # the model computes what is stored
        if old.mask is not None:
            assert torch.equal(matrix.mask, old.mask) and not matrix.weight[~matrix.mask].any()
        if old.quantized is not None:  # codes fixed; only scales or codebooks moved
            assert torch.equal(matrix.quantized.codes, old.quantized.codes)
            values = "scales" if isinstance(old.quantized, QuantizedMatrix) else "codebook"
            assert not torch.equal(getattr(matrix.quantized, values), getattr(old.quantized, values))
    assert all(torch.equal(param, student.get_parameter(name)) for name, param in untouched.items())
    assert torch.equal(student.get_input_embeddings().weight, model.get_input_embeddings().weight)

    path = save_compressed(student, plan, stored, tmp_path, tokenizer)
    reloaded, _ = load_compressed(tmp_path)
    for name, param in student.named_parameters():
        assert torch.equal(param, reloaded.get_parameter(name)), name
    planned = sum(layer_nbytes(layer, plan[layer.name]) for layer in layers if layer.name in plan.layers)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as archive:
        stored_bytes = sum(archive.get_tensor(name).numel() * archive.get_tensor(name).element_size()
                           for name in archive.keys() if name.startswith("model.layers.0.")
                           and "norm" not in name)
    assert stored_bytes == planned  # distillation did not change what the plan stores


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="steps >= 1"):
        DistillSettings(steps=0)
    with pytest.raises(ValueError, match="learning rates"):
        DistillSettings(lr=0.0)
