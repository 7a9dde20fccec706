"""Latency figures: sane, positive, repeat-stable; the int8 path runs for real; the cost model predicts."""
import copy
import math
import os

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from compsearch.compress import apply_plan_
from compsearch.evaluators.latency import LatencySettings, measure_generation
from compsearch.evaluators.costmodel import CostTable, LatencyCostModel
from compsearch.evaluators.kernels import kernel_summary, timing_model
from compsearch.search.models import load_model
from compsearch.spaces.plan import LayerPlan, Plan

SETTINGS = LatencySettings(prompt_tokens=16, decode_tokens=4, decode_batch=2, warmup=1, repeats=3)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def uniform(model, layer_plan):
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    return Plan.uniform(names, layer_plan)


def compressed(model, plan):
    copy_ = copy.deepcopy(model)
    apply_plan_(copy_, plan)
    return copy_


def skip_if_overloaded() -> None:
    """Timing comparisons mean nothing while other processes want more cores than the machine has."""
    load = os.getloadavg()[0]
    if load > 1.5 * (os.cpu_count() or 1):
        pytest.skip(f"machine overloaded (load {load:.1f} on {os.cpu_count()} cores): timings are not comparable")


def test_generation_figures_are_sane(model):
    first = measure_generation(model, SETTINGS)
    for key in ("latency_ms", "prefill_tok_s", "decode_ms", "decode_batch_ms"):
        assert math.isfinite(first[key]) and first[key] > 0
    assert first["latency_p90_ms"] >= first["latency_ms"] and first["decode_p90_ms"] >= first["decode_ms"]
    assert first["prefill_tok_s"] == pytest.approx(16 * 1000 / first["latency_ms"])
    assert first["decode_batch"] == 2 and first["latency_repeats"] == 3
    assert first["latency_device"] == "cpu" and first["latency_dtype"] == "float32"
    assert first["latency_threads"] == torch.get_num_threads()
    with pytest.raises(ValueError, match="repeats=0"):
        LatencySettings(repeats=0)


def test_generation_figures_are_repeat_stable(model):
    skip_if_overloaded()
    measure_generation(model, SETTINGS)  # the process's first forwards pay one-off set-up costs
    first, second = measure_generation(model, SETTINGS), measure_generation(model, SETTINGS)
    for key in ("latency_ms", "decode_ms", "decode_batch_ms"):
        assert 0.2 < first[key] / second[key] < 5, key  # same order of magnitude: a shared machine is noisy


def test_int8_layers_run_on_dynamic_int8_kernels(model):
    plan = uniform(model, LayerPlan(bits=8))
    dense = compressed(model, plan)
    timed, summary = timing_model(dense, plan)
    assert summary == {"latency_kernel": "real", "latency_simulated_layers": 0}
    assert isinstance(timed.model.layers[0].mlp.down_proj, DynamicInt8Linear)
    assert isinstance(dense.model.layers[0].mlp.down_proj, torch.nn.Linear)  # the evaluated model is untouched
    ids = torch.randint(0, 384, (1, 16))
    with torch.no_grad():
        reference, fast = dense(ids).logits, timed(ids).logits
    assert ((fast - reference).norm() / reference.norm()).item() < 0.05
    assert measure_generation(timed, SETTINGS)["decode_ms"] > 0


def test_choices_without_a_fast_kernel_are_marked_simulated(model):
    assert kernel_summary(uniform(model, LayerPlan(bits=3)), "cpu")["latency_kernel"] == "simulated"
    assert kernel_summary(uniform(model, LayerPlan(sparsity=0.5, pattern="2:4")), "cpu")["latency_kernel"] == "simulated"
    assert kernel_summary(uniform(model, LayerPlan(rank_fraction=0.25)), "cpu")["latency_kernel"] == "real"
    assert kernel_summary(uniform(model, LayerPlan(bits=4)), "cuda")["latency_kernel"] == "real"  # torchao int4
    assert kernel_summary(Plan(), "cpu") == {"latency_kernel": "real", "latency_simulated_layers": 0}


def test_cost_model_predicts_within_a_loose_factor_and_is_cached(model, tiny_model_dir, tmp_path):
    cost = LatencyCostModel(model, str(tiny_model_dir), SETTINGS, cache_dir=tmp_path)
    assert not cost.calibrated
    cost.calibrate(measure_generation(model, SETTINGS))
    again = LatencyCostModel(model, str(tiny_model_dir), SETTINGS, cache_dir=tmp_path)
    assert again.calibrated and again.table == cost.table  # measured once per device, read back from disk
    assert cost.predict(Plan())["predicted_decode_ms"] > 0
    skip_if_overloaded()
    for layer_plan in (LayerPlan(), LayerPlan(bits=8), LayerPlan(rank_fraction=0.25)):
        plan = uniform(model, layer_plan)
        timed = timing_model(compressed(model, plan), plan)[0]
        # other work on the machine only ever adds time: the fastest of three runs is the kernels' own
        runs = [measure_generation(timed, SETTINGS) for _ in range(3)]
        predicted = cost.predict(plan)
        for scenario in ("decode_ms", "latency_ms"):
            measured = min(run[scenario] for run in runs)
            assert 0.25 < predicted[f"predicted_{scenario}"] / measured < 4, (layer_plan, scenario)


@pytest.mark.parametrize("damage", ['{"key": {"device": "x"}, "tab', "[1, 2]", '{"key": 1}', "\xff\xfe"])
def test_a_damaged_cost_table_is_reported_and_measured_again(tmp_path, caplog, damage):
    table = CostTable({"device": "x"}, tmp_path)
    table.entries["64x64|dense|1"] = 0.01
    table.save()
    assert CostTable({"device": "x"}, tmp_path).entries == {"64x64|dense|1": 0.01}
    table.path.write_text(damage)
    assert CostTable({"device": "x"}, tmp_path).entries == {}
    assert "latency cost table" in caplog.text and "is damaged" in caplog.text
