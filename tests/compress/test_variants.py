"""A worker's cache of compressed layer variants: what it returns is what compressing again gives."""
import copy
import os
import time

import torch

from compsearch.compress import apply_plan_
from compsearch.compress.matrix import pack_matrix
from compsearch.compress.variants import VariantCache, VariantStore
from compsearch.spaces.layers import linear_layers
from compsearch.spaces.plan import LayerPlan, Plan


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_a_cached_variant_equals_a_fresh_compression(calibrated_wide):
    model, _, _, layers, (norms, hessians) = calibrated_wide
    plans = {"gptq": LayerPlan(bits=3, group_size=32, quant_method="gptq"),
             "q4_0": LayerPlan(bits=4, quant_method="q4_0"), "sparse": LayerPlan(sparsity=0.5, prune_method="wanda")}
    variants = VariantCache(max_bytes=2**30)
    for layer_plan in plans.values():
        plan = Plan({layer.name: layer_plan for layer in layers})
        fresh, first, again = (copy.deepcopy(model) for _ in range(3))
        expected = apply_plan_(fresh, plan, norms, keep_stored=True, hessians=hessians).stored
        apply_plan_(first, plan, norms, hessians=hessians, variants=variants)
        misses = variants.misses
        stored = apply_plan_(again, plan, norms, keep_stored=True, hessians=hessians, variants=variants).stored
        assert variants.misses == misses and variants.hits >= len(layers)
        assert all(torch.equal(a, b) for a, b in zip(_weights(fresh).values(), _weights(again).values()))
        assert stored.keys() == expected.keys()
        assert all(torch.equal(stored[key].weight, expected[key].weight) for key in expected)


def test_the_least_recently_used_variants_go_beyond_the_budget(calibrated_wide):
    model, _, _, layers, (norms, hessians) = calibrated_wide
    one_layer = linear_layers(model)[0].name
    variants = VariantCache(max_bytes=2**30)
    for bits in (2, 3, 4):
        apply_plan_(copy.deepcopy(model), Plan({one_layer: LayerPlan(bits=bits, group_size=32)}), variants=variants)
    each = variants.nbytes // 3
    small = VariantCache(max_bytes=2 * each)
    for bits in (2, 3, 4):
        apply_plan_(copy.deepcopy(model), Plan({one_layer: LayerPlan(bits=bits, group_size=32)}), variants=small)
    assert small.nbytes <= 2 * each
    assert small.get(f"{one_layer}.weight", LayerPlan(bits=2, group_size=32)) is None
    assert small.get(f"{one_layer}.weight", LayerPlan(bits=4, group_size=32)) is not None


STORED_PLANS = {"gptq": LayerPlan(bits=3, group_size=32, quant_method="gptq"),
                "sparsegpt+gptq": LayerPlan(bits=4, group_size=32, quant_method="gptq", sparsity=0.5,
                                            prune_method="sparsegpt"),
                "wanda 2:4": LayerPlan(sparsity=0.5, pattern="2:4", prune_method="wanda"),
                "kmeans": LayerPlan(bits=3, quant_method="kmeans"), "q4_k": LayerPlan(bits=4, quant_method="q4_k"),
                "hqq 25%": LayerPlan(bits=4, group_size=32, quant_method="hqq", sparsity=0.25, prune_method="wanda")}


def test_a_variant_read_from_disk_is_the_one_computed(calibrated_wide, tmp_path):
    model, _, _, layers, (norms, hessians) = calibrated_wide
    for name, layer_plan in STORED_PLANS.items():
        plan = Plan({layer.name: layer_plan for layer in layers})
        written = VariantCache(max_bytes=2**30, store=VariantStore(tmp_path / "store", 2**30))
        expected = apply_plan_(copy.deepcopy(model), plan, norms, keep_stored=True, hessians=hessians,
                               variants=written).stored
        assert written.store.writes == len(expected), name
        fresh_worker = VariantCache(max_bytes=2**30, store=VariantStore(tmp_path / "store", 2**30))
        again = copy.deepcopy(model)
        stored = apply_plan_(again, plan, norms, keep_stored=True, hessians=hessians, variants=fresh_worker).stored
        assert fresh_worker.misses == 0 and fresh_worker.store.reads == len(expected), name
        for key, matrix in expected.items():
            assert torch.equal(stored[key].weight, matrix.weight), (name, key)
            assert torch.equal(again.get_parameter(key), matrix.weight), (name, key)
            assert (stored[key].mask is None) == (matrix.mask is None), (name, key)
            assert matrix.mask is None or torch.equal(stored[key].mask, matrix.mask), (name, key)
            packed, repacked = pack_matrix(matrix), pack_matrix(stored[key])  # what an export writes
            assert packed.keys() == repacked.keys() and all(torch.equal(packed[p], repacked[p]) for p in packed)


def test_a_damaged_variant_file_is_computed_again(calibrated_wide, tmp_path, caplog):
    model, _, _, layers, (norms, hessians) = calibrated_wide
    layer, layer_plan = layers[0], STORED_PLANS["gptq"]
    plan = Plan({layer.name: layer_plan})
    store = VariantStore(tmp_path, 2**30)
    expected = apply_plan_(copy.deepcopy(model), plan, norms, hessians=hessians, keep_stored=True,
                           variants=VariantCache(2**30, store)).stored
    path = store.path(f"{layer.name}.weight", layer_plan)
    path.write_bytes(path.read_bytes()[:100])
    again = VariantCache(2**30, VariantStore(tmp_path, 2**30))
    stored = apply_plan_(copy.deepcopy(model), plan, norms, hessians=hessians, keep_stored=True, variants=again).stored
    assert "is damaged" in caplog.text and again.misses == 1
    assert torch.equal(stored[f"{layer.name}.weight"].weight, expected[f"{layer.name}.weight"].weight)
    assert again.store.writes == 1 and path.stat().st_size > 100


def test_the_store_keeps_the_most_recently_read_files_within_its_bound(calibrated_wide, tmp_path):
    model, _, _, layers, (norms, hessians) = calibrated_wide
    store = VariantStore(tmp_path, 2**30)
    cache = VariantCache(2**30, store)
    plans = [LayerPlan(bits=bits, group_size=32, quant_method="gptq") for bits in (2, 3, 4)]
    for age, layer_plan in enumerate(plans):
        apply_plan_(copy.deepcopy(model), Plan({layers[0].name: layer_plan}), norms, hessians=hessians, variants=cache)
        os.utime(store.path(f"{layers[0].name}.weight", layer_plan), (1000 + age, 1000 + age))
    VariantStore(tmp_path, 2**30).get(f"{layers[0].name}.weight", plans[0])  # read: now the most recent
    sizes = {plan: store.path(f"{layers[0].name}.weight", plan).stat().st_size for plan in plans}
    store.max_bytes = sizes[plans[0]] + sizes[plans[2]]
    assert store.trim() == store.max_bytes
    assert [store.path(f"{layers[0].name}.weight", plan).exists() for plan in plans] == [True, False, True]


def test_trim_removes_what_killed_writers_left_half_written(tmp_path):
    store = VariantStore(tmp_path, 2**30)
    old, fresh = tmp_path / ".variant-old.tmp", tmp_path / ".variant-new.tmp"
    old.write_bytes(b"x" * 10)
    fresh.write_bytes(b"x" * 10)
    os.utime(old, (time.time() - 2 * 3600, time.time() - 2 * 3600))
    store.trim()
    assert not old.exists() and fresh.exists()  # one being written now is left alone


def test_a_cache_folder_that_cannot_be_written_costs_the_reuse_not_the_trial(calibrated_wide, tmp_path, caplog):
    model, _, _, layers, (norms, hessians) = calibrated_wide
    blocked = tmp_path / "file"
    blocked.write_text("a file where the store's folder would be")
    plan = Plan({layers[0].name: STORED_PLANS["gptq"]})
    cache = VariantCache(2**30, VariantStore(blocked / "variants", 2**30))
    expected = apply_plan_(copy.deepcopy(model), plan, norms, hessians=hessians, keep_stored=True).stored
    stored = apply_plan_(copy.deepcopy(model), plan, norms, hessians=hessians, keep_stored=True, variants=cache).stored
    assert "variant not kept" in caplog.text and cache.store.writes == 0
    assert all(torch.equal(stored[key].weight, expected[key].weight) for key in expected)
