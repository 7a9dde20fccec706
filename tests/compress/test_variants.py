"""A worker's cache of compressed layer variants: what it returns is what compressing again gives."""
import copy

import torch

from compsearch.compress import apply_plan_
from compsearch.compress.variants import VariantCache
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
