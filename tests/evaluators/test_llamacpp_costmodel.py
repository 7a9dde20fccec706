"""The llama.cpp cost model: per-type costs fitted to timing files llama.cpp itself runs."""
import pytest

from compsearch.evaluators.latency import LatencySettings
from compsearch.evaluators.llamacpp import llamacpp_available
from compsearch.compress.gguf_formats import gguf_type
from compsearch.evaluators.llamacpp_costmodel import LlamaCppCostModel
from compsearch.evaluators.measure import GGUFTarget
from compsearch.search.models import load_model
from compsearch.spaces.layers import LayerInfo, embedding_layers, linear_layers
from compsearch.spaces.plan import LayerPlan, Plan

pytestmark = pytest.mark.skipif(not llamacpp_available(),
                                reason="llama-cpp-python is not installed (pip install 'compsearch[llamacpp]')")
SETTINGS = LatencySettings(prompt_tokens=16, decode_tokens=4, repeats=3)


@pytest.fixture(scope="module")
def wide_model(tiny_wide_dir):
    return load_model(str(tiny_wide_dir))


def test_types_follow_llama_cpps_fallbacks():
    narrow, wide = LayerInfo("narrow", 64, 576), LayerInfo("wide", 64, 512)
    assert gguf_type(narrow, LayerPlan(bits=4, quant_method="q4_k")) == "q5_0"
    assert gguf_type(wide, LayerPlan(bits=4, quant_method="q4_k")) == "q4_k"
    assert gguf_type(narrow, LayerPlan()) == "f16"


def test_predictions_come_from_timed_files_and_are_kept(wide_model, tiny_wide_dir, tmp_path):
    model, layers = wide_model, linear_layers(wide_model) + embedding_layers(wide_model)
    target = GGUFTarget(None, tiny_wide_dir)
    cost = LlamaCppCostModel(model, str(tiny_wide_dir), SETTINGS, target, threads=1, cache_dir=tmp_path)
    everything = Plan({layer.name: LayerPlan(bits=8, quant_method="q8_0") for layer in layers})
    half = Plan({layer.name: LayerPlan(bits=8, quant_method="q8_0") for layer in layers[::2]})
    full, mixed, base = cost.predict(everything), cost.predict(half), cost.predict(Plan())
    assert set(cost.files) == {"f16", "q8_0"}  # one timing file per type met
    for plan_prediction, kind in ((full, "q8_0"), (base, "f16")):
        measured = cost.files[kind]
        for scenario in ("decode_ms", "latency_ms"):
            assert plan_prediction[f"predicted_{scenario}"] == pytest.approx(measured[scenario], rel=1e-6)
    low, high = sorted((full["predicted_decode_ms"], base["predicted_decode_ms"]))
    assert low <= mixed["predicted_decode_ms"] <= high
    again = LlamaCppCostModel(model, str(tiny_wide_dir), SETTINGS, target, threads=1, cache_dir=tmp_path)
    assert again.files == cost.files and again.predict(half) == mixed  # timed once, read back from disk
