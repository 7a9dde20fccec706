"""llama.cpp's presets as per-tensor types: the types llama-quantize itself writes, tensor by tensor."""
import ctypes

import pytest
from gguf import GGUFReader

from compsearch.compress.gguf_export import export_gguf
from compsearch.compress.gguf_presets import PRESETS, PresetError, preset_types
from compsearch.evaluators.llamacpp import llamacpp_available
from compsearch.search.models import load_model
from compsearch.spaces.layers import embedding_layers, linear_layers
from compsearch.spaces.plan import Plan
from tests.conftest import build_tiny_model

needs_llamacpp = pytest.mark.skipif(not llamacpp_available(),
                                    reason="llama-cpp-python is not installed (pip install 'compsearch[llamacpp]')")


@pytest.fixture(scope="module", params=[2, 1], ids=["2-queries-per-kv", "4-queries-per-kv"])
def f16_file(request, tmp_path_factory):
    """16 blocks (llama.cpp's eighths and sixteenths), 128-wide rows (K-types fall back) and 256-wide
    down_proj rows (they do not); an F16 GGUF of it."""
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-16-blocks"), hidden=128, layers=16, kv_heads=request.param)
    model = load_model(str(folder))
    path = export_gguf(model, Plan(), {}, folder / "F16.gguf", tokenizer_dir=folder)
    return model, path


@needs_llamacpp
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_tensor_gets_the_type_llama_quantize_gives_it(f16_file, preset, tmp_path):
    import llama_cpp

    model, f16 = f16_file
    out = tmp_path / f"{preset}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}"), 2
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params)) == 0
    written = {tensor.name: tensor.tensor_type.name.lower() for tensor in GGUFReader(str(out)).tensors}
    layers = linear_layers(model) + embedding_layers(model)
    predicted = preset_types(preset, layers, tied_embeddings=True, importance_matrix=False)
    names = {"model.embed_tokens": "token_embd"} | {
        layer.name: f"blk.{layer.name.split('.')[2]}.{kind}" for layer in layers for role, kind in (
            ("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output"),
            ("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")) if layer.kind == role}
    assert {names[name]: kind for name, kind in predicted.items()} == {names[name]: written[f"{names[name]}.weight"]
                                                                        for name in predicted}


def test_an_unknown_preset_is_refused_by_name():
    with pytest.raises(PresetError, match="'Q4_K_L' is not one of Q8_0, Q6_K"):
        preset_types("Q4_K_L", [], tied_embeddings=True)
