"""Packing, memory accounting against the bytes a checkpoint really stores, and checkpoint round trips."""
import copy

import pytest
from transformers import AutoModelForCausalLM
import torch
from safetensors import safe_open

from compsearch.compress import apply_plan_, layer_nbytes, load_compressed, plan_nbytes, save_compressed
from compsearch.compress.storage import matrix_nbytes, pack_bits, unpack_bits
from compsearch.evaluators.quality import perplexity_and_kl
from compsearch.spaces.layers import count_params
from compsearch.spaces.plan import LayerPlan, Plan

from .conftest import calibrated


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_round_trip_every_width(bits):
    values = torch.randint(0, 2 ** bits, (1001,), dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, 1001), values)


def test_mask_format_only_where_smaller():
    dense_4bit = matrix_nbytes(64, 128, 64 * 128, 4, 128)
    assert matrix_nbytes(64, 128, int(0.9 * 64 * 128), 4, 128) == dense_4bit  # mask would cost more
    assert matrix_nbytes(64, 128, 64 * 64, 4, 128) < dense_4bit


PLANS = {
    "uniform 3-bit g64": lambda names: Plan.uniform(names, LayerPlan(bits=3, group_size=64)),
    "wanda 50% + 4-bit": lambda names: Plan.uniform(names, LayerPlan(bits=4, sparsity=0.5, prune_method="wanda")),
    "2:4 at 16 bits": lambda names: Plan.uniform(names, LayerPlan(sparsity=0.5, pattern="2:4")),
    "gptq 3-bit g64": lambda names: Plan.uniform(names, LayerPlan(bits=3, group_size=64, quant_method="gptq")),
    "hqq 2-bit g32": lambda names: Plan.uniform(names, LayerPlan(bits=2, group_size=32, quant_method="hqq")),
    "kmeans 3-bit": lambda names: Plan.uniform(names, LayerPlan(bits=3, quant_method="kmeans")),
    "sparsegpt 2:4 + gptq 4-bit": lambda names: Plan.uniform(names, LayerPlan(
        bits=4, sparsity=0.5, pattern="2:4", prune_method="sparsegpt", quant_method="gptq")),
    "pruned hqq and kmeans": lambda names: Plan({name: [
        LayerPlan(bits=3, sparsity=0.25, prune_method="wanda", quant_method="hqq"),
        LayerPlan(bits=4, sparsity=0.5, prune_method="sparsegpt", quant_method="kmeans")][i % 2]
        for i, name in enumerate(names)}),
    "whitened low-rank + gptq": lambda names: Plan.uniform(names, LayerPlan(
        bits=4, quant_method="gptq", rank_fraction=0.25, lowrank_method="whiten")),
    "mlp channels 50% + mixed": lambda names: Plan({name: LayerPlan(
        channel_fraction=0.5 if "mlp" in name else 1.0, bits=[3, 16][i % 2], quant_method=["gptq", "rtn"][i % 3 % 2],
        rank_fraction=0.25 if name.endswith("down_proj") else 1.0, lowrank_method="whiten")
        for i, name in enumerate(names)}),
    "attention heads 50% + mlp channels + gptq": lambda names: Plan({name: LayerPlan(
        head_fraction=0.5 if "self_attn" in name else 1.0, channel_fraction=0.75 if "mlp" in name else 1.0,
        bits=[4, 16][i % 2], quant_method="gptq", rank_fraction=0.5 if name.endswith("o_proj") else 1.0)
        for i, name in enumerate(names)}),
    "mixed": lambda names: Plan({name: [LayerPlan(bits=2, group_size=32), LayerPlan(bits=16, rank_fraction=0.25),
                                        LayerPlan(bits=5, sparsity=0.75, rank_fraction=0.25), LayerPlan()][i % 4]
                                 for i, name in enumerate(names)}),
}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return calibrated(tiny_model_dir, seq_len=64, eval_windows=4, calib_windows=4)


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_accounting_matches_stored_bytes_and_checkpoint_reproduces_metrics(tiny, tmp_path, plan_name):
    model, tokenizer, windows, layers, norms = tiny
    plan = PLANS[plan_name]([layer.name for layer in layers])
    compressed = copy.deepcopy(model)
    stored = apply_plan_(compressed, plan, norms[0], keep_stored=True, hessians=norms[1]).stored
    path = save_compressed(compressed, plan, stored, tmp_path, tokenizer)

    with safe_open(str(path), framework="pt") as archive:
        nbytes = {name: archive.get_tensor(name).numel() * archive.get_tensor(name).element_size()
                  for name in archive.keys()}
    for layer in layers:
        layer_plan = plan[layer.name]
        stored_bytes = sum(size for name, size in nbytes.items() if name.startswith(layer.name + "."))
        assert stored_bytes == layer_nbytes(layer, layer_plan), layer.name
    assert sum(nbytes.values()) == plan_nbytes(layers, plan, count_params(model))
    # the file adds only its JSON header to the counted bytes
    assert path.stat().st_size - sum(nbytes.values()) < 0.02 * path.stat().st_size + 64 * 1024

    reloaded, reloaded_tokenizer = load_compressed(tmp_path)
    assert reloaded_tokenizer is not None
    with pytest.raises(OSError):  # not a plain checkpoint: transformers must not load it with random Linears
        AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, param in compressed.named_parameters():
        assert torch.equal(param, reloaded.get_parameter(name)), name
    before = perplexity_and_kl(compressed, windows.eval_ids, 2)["ppl"]
    after = perplexity_and_kl(reloaded, windows.eval_ids, 2)["ppl"]
    assert abs(after - before) / before < 1e-6


def test_apply_plan_changes_only_planned_layers(tiny):
    model, _, _, layers, _ = tiny
    compressed = copy.deepcopy(model)
    target = layers[0].name
    apply_plan_(compressed, Plan({target: LayerPlan(bits=2)}))
    for layer in layers:
        same = torch.equal(model.get_submodule(layer.name).weight, compressed.get_submodule(layer.name).weight)
        assert same == (layer.name != target)
