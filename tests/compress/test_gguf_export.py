"""Plans of GGUF types written as .gguf files: llama.cpp loads them and computes what the trial
computed; the tensor data are the plan's bytes; llama-quantize gets the same mix as text."""
import copy

import pytest
import torch
from gguf import GGUFReader

from compsearch.compress import apply_plan_, layer_nbytes
from compsearch.compress.gguf_export import GGUFExportError, export_gguf, gguf_file_layout, llama_quantize_types
from compsearch.evaluators.quality import perplexity_and_kl
from compsearch.evaluators.llamacpp import llamacpp_available, llamacpp_latency, llamacpp_perplexity_and_kl
from compsearch.evaluators.latency import LatencySettings
from compsearch.spaces.layers import meta_model
from compsearch.spaces.plan import LayerPlan, Plan

needs_llamacpp = pytest.mark.skipif(not llamacpp_available(),
                                    reason="llama-cpp-python is not installed (pip install 'compsearch[llamacpp]')")
TYPES_BY_KIND = {"q_proj": "q8_0", "k_proj": "q6_k", "v_proj": "q5_k", "o_proj": "q4_0", "gate_proj": "q4_k",
                 "up_proj": "iq4_nl", "down_proj": "q3_k"}


def _mixed_plan(layers) -> Plan:
    """A different GGUF type on every projection; block 1's down projection stays at 16 bits."""
    plans = {}
    for layer in layers:
        kind = TYPES_BY_KIND[layer.kind]
        bits = int(kind[1]) if kind[1].isdigit() else 4
        plans[layer.name] = LayerPlan() if layer.name.endswith("1.mlp.down_proj") else LayerPlan(bits=bits, quant_method=kind)
    return Plan(plans)


@pytest.fixture(scope="module")
def exported(calibrated_wide, tmp_path_factory, tiny_wide_dir):
    model, _, windows, layers, (norms, hessians) = calibrated_wide
    plan = _mixed_plan(layers)
    compressed = copy.deepcopy(model)
    stored = apply_plan_(compressed, plan, norms, keep_stored=True, hessians=hessians).stored
    path = export_gguf(compressed, plan, stored, tmp_path_factory.mktemp("gguf") / "mixed.gguf",
                       tokenizer_dir=tiny_wide_dir)
    return compressed, plan, layers, windows, path


def test_the_file_holds_the_plan_types_and_its_bytes(exported):
    _, plan, layers, _, path = exported
    tensors = {tensor.name: tensor for tensor in GGUFReader(str(path)).tensors}
    q_proj = tensors["blk.0.attn_q.weight"]
    assert q_proj.tensor_type.name == "Q8_0" and tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q3_K"
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    planned = sum(layer_nbytes(layer, plan[layer.name]) for layer in layers)
    written = sum(int(tensors[name].n_bytes) for name in tensors if name.startswith("blk.") and "norm" not in name)
    assert written == planned


def test_a_plans_file_bytes_are_known_before_it_is_written(exported, tiny_wide_dir):
    compressed, plan, layers, _, path = exported
    layout = gguf_file_layout(meta_model(compressed.config), tokenizer_dir=tiny_wide_dir)
    assert layout.file_nbytes(layers, plan) == path.stat().st_size
    assert layout.file_nbytes(layers, Plan()) > path.stat().st_size  # all-F16


@needs_llamacpp
def test_llama_cpp_computes_what_the_trial_computed(exported):
    compressed, _, _, windows, path = exported
    trial = perplexity_and_kl(compressed, windows.eval_ids, 2)["ppl"]
    in_llamacpp = llamacpp_perplexity_and_kl(path, windows.eval_ids, threads=2)["ppl"]
    assert abs(in_llamacpp - trial) / trial < 0.01, (in_llamacpp, trial)


@needs_llamacpp
def test_llama_cpp_times_the_file(exported):
    metrics = llamacpp_latency(exported[-1], LatencySettings(prompt_tokens=16, decode_tokens=4, repeats=2), threads=1)
    assert metrics["latency_ms"] > 0 and metrics["decode_ms"] > 0 and metrics["latency_kernel"] == "real"
    assert metrics["latency_runtime"].startswith("llama.cpp") and metrics["latency_threads"] == 1


def test_llama_quantize_gets_the_same_mix(exported):
    compressed, plan, _, _, _ = exported
    lines = llama_quantize_types(compressed, plan).splitlines()
    assert "^blk\\.0\\.attn_q\\.weight$=q8_0" in lines and "^blk\\.1\\.ffn_down\\.weight$=f16" in lines
    assert len(lines) == len(plan.layers)


@pytest.mark.parametrize("layer_plan, fragment", [
    (LayerPlan(bits=4, quant_method="rtn"), "no GGUF type stores"),
    (LayerPlan(bits=8, quant_method="q8_0", sparsity=0.5), "GGUF stores no masks"),
    (LayerPlan(rank_fraction=0.5), "low-rank"),
])
def test_plans_gguf_cannot_hold_are_refused(calibrated_wide, tmp_path, layer_plan, fragment):
    model, _, _, layers, _ = calibrated_wide
    plan = Plan({layers[0].name: layer_plan})
    with pytest.raises(GGUFExportError, match=fragment):
        export_gguf(model, plan, {}, tmp_path / "x.gguf", tokenizer_dir=tmp_path)
