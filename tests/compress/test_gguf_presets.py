"""llama.cpp's presets as per-tensor types: the types llama-quantize itself writes, tensor by tensor."""
import ctypes

import gguf
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
    predicted = preset_types(preset, linear_layers(model) + embedding_layers(model), tied_embeddings=True,
                             importance_matrix=False)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    gguf_names = {name: names.get_name(f"{name}.weight", try_suffixes=(".weight",)) for name in predicted}
    assert {gguf_names[name]: kind for name, kind in predicted.items()} == {
        gguf_names[name]: written[gguf_names[name]] for name in predicted}


def test_an_unknown_preset_is_refused_by_name():
    with pytest.raises(PresetError, match="'Q4_K_L' is not one of Q8_0, Q6_K"):
        preset_types("Q4_K_L", [], tied_embeddings=True)
