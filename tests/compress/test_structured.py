"""MLP channel and attention head removal, OWL sparsity profiles, calibration statistics and the plan fields behind them."""
import copy
import json

import pytest
import torch

from compsearch.compress import apply_plan_, input_hessians, input_norms, layer_layout
from compsearch.compress.owl import owl_plan, owl_sparsities
from compsearch.evaluators.data import load_text, make_windows
from compsearch.search.models import load_model, load_tokenizer
from compsearch.spaces.layers import linear_layers
from compsearch.spaces.plan import PLAN_VERSION, LayerPlan, Plan, PlanError


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    text, source = load_text(None)
    windows = make_windows(load_tokenizer(str(tiny_model_dir)), text, source, seq_len=32, eval_windows=2,
                           calib_windows=4)
    layers = linear_layers(model)
    return model, windows, layers, input_norms(model, windows.calib_ids, [layer.name for layer in layers])


def _mlp_plan(layers, fraction, **fields):
    return Plan({layer.name: LayerPlan(channel_fraction=fraction, **fields) for layer in layers if ".mlp." in layer.name})


def test_removing_dead_channels_keeps_the_outputs(tiny):
    model, windows, layers, _ = tiny
    base = copy.deepcopy(model)
    for index, mlp in enumerate(m for name, m in base.named_modules() if name.endswith("mlp")):
        dead = torch.arange(index % 2, mlp.gate_proj.out_features, 2)  # every other channel, never active
        mlp.up_proj.weight.data[dead] = 0.0
    names = [layer.name for layer in layers]
    plan = _mlp_plan(layers, 0.5)
    thinned = copy.deepcopy(base)
    apply_plan_(thinned, plan, hessians=input_hessians(base, windows.calib_ids, names))
    for layer in layers:
        if ".mlp." in layer.name:
            (layout,) = layer_layout(layer, plan[layer.name])
            assert tuple(thinned.get_submodule(layer.name).weight.shape) == (layout.rows, layout.cols)
    assert thinned.model.layers[0].mlp.gate_proj.weight.shape == (64, 64)
    assert thinned.model.layers[0].mlp.down_proj.weight.shape == (64, 64)
    with torch.no_grad():
        expected, got = base(windows.eval_ids).logits, thinned(windows.eval_ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def test_channel_fraction_must_agree_within_an_mlp(tiny):
    _, _, layers, _ = tiny
    mlp = [layer.name for layer in layers if ".mlp." in layer.name][:3]
    with pytest.raises(PlanError, match="disagree on channel_fraction"):
        Plan({mlp[0]: LayerPlan(channel_fraction=0.5), mlp[1]: LayerPlan(channel_fraction=0.5),
              mlp[2]: LayerPlan(channel_fraction=0.75)})
    with pytest.raises(PlanError, match="only the projections"):
        Plan({"model.layers.0.self_attn.q_proj": LayerPlan(channel_fraction=0.5)})


def test_old_plan_json_still_loads_and_new_fields_round_trip():
    old = json.dumps({"version": PLAN_VERSION, "layers": {"a.q_proj": {
        "bits": 3, "group_size": 64, "sparsity": 0.0, "pattern": "unstructured", "prune_method": "magnitude",
        "quant_method": "rtn", "rank_fraction": 1.0}}})
    assert Plan.from_json(old)["a.q_proj"] == LayerPlan(bits=3, group_size=64)
    plan = Plan({"a.mlp.gate_proj": LayerPlan(bits=4, quant_method="gptq", channel_fraction=0.75),
                 "a.mlp.down_proj": LayerPlan(rank_fraction=0.5, lowrank_method="whiten", channel_fraction=0.75,
                                              sparsity=0.5, pattern="2:4", prune_method="sparsegpt")})
    assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(PlanError, match="lowrank_method"):
        LayerPlan(lowrank_method="tucker")


def test_hessians_match_norms_and_are_shared_by_fused_projections(tiny):
    model, windows, layers, norms = tiny
    names = [layer.name for layer in layers]
    hessians = input_hessians(model, windows.calib_ids, names)
    tokens = windows.calib_ids.numel()
    for name in names:
        assert torch.allclose(torch.diagonal(hessians[name]) * tokens, norms[name].square(), rtol=1e-3)
    attention = "model.layers.0.self_attn"
    assert hessians[f"{attention}.q_proj"] is hessians[f"{attention}.v_proj"]


def test_owl_profile_averages_to_the_target():
    ratios = {f"b{i}": r for i, r in enumerate([0.01, 0.03, 0.02, 0.08])}
    params = {block: 100 for block in ratios}
    sparsities = owl_sparsities(ratios, params, 0.5, spread=0.08)
    assert abs(sum(sparsities.values()) / 4 - 0.5) < 1e-3
    assert sparsities["b3"] == min(sparsities.values()) and sparsities["b0"] == max(sparsities.values())
    assert max(sparsities.values()) - min(sparsities.values()) == pytest.approx(0.16, abs=2e-3)


def test_owl_plan_is_a_valid_non_uniform_plan(tiny):
    model, _, layers, norms = tiny
    plan = owl_plan(model, layers, norms, 0.5, base=LayerPlan(bits=4))
    assert set(plan.layers) == {layer.name for layer in layers}
    by_block = {layer.block: plan[layer.name].sparsity for layer in layers}
    weighted = sum(plan[layer.name].sparsity * layer.num_params for layer in layers) / sum(l.num_params for l in layers)
    assert abs(weighted - 0.5) < 2e-3 and len(set(by_block.values())) > 1
    assert all(lp.bits == 4 and lp.prune_method == "wanda" for lp in plan.layers.values())


def test_spaces_offer_the_methods_and_keep_structure_consistent():
    import optuna

    from compsearch.spaces.layers import LayerInfo
    from compsearch.spaces.space import SpaceError, get_space

    heads = {"heads": 4, "kv_heads": 2, "head_dim": 16}
    layers = [LayerInfo(f"model.layers.{b}.{n}", o, i, **(heads if "attn" in n else {})) for b in range(2) for n, o, i in [
        ("self_attn.q_proj", 64, 64), ("self_attn.k_proj", 32, 64), ("self_attn.v_proj", 32, 64),
        ("self_attn.o_proj", 64, 64), ("mlp.gate_proj", 128, 64), ("mlp.up_proj", 128, 64), ("mlp.down_proj", 64, 128)]]
    assert set(get_space("quant-methods").knobs()["quant_method"]) == {"rtn", "gptq", "hqq", "kmeans"}
    assert "sparsegpt" in get_space("sparse-methods").knobs()["prune_method"]
    assert "whiten" in get_space("lowrank-methods").knobs()["lowrank_method"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        plan = get_space("sota").suggest_plan(study.ask(), layers)  # Plan validates MLP and attention agreement itself
        assert all(plan[layer.name].channel_fraction == 1.0 for layer in layers if ".mlp." not in layer.name)
        assert all(plan[layer.name].head_fraction in (1.0, 0.5) for layer in layers)  # 0.67 of 2 per group: 1
    with pytest.raises(SpaceError, match="granularity 'layer'"):
        get_space("structured").with_choices(granularity="layer")


def _attention_plan(layers, fraction, **fields):
    return Plan({layer.name: LayerPlan(head_fraction=fraction, **fields) for layer in layers if ".self_attn." in layer.name})


def _tiny_llama(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128)
    return LlamaForCausalLM(config).half().float().eval()  # weights on the fp16 grid a 16-bit plan stores


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped-query (2 query heads per key/value head) and multi-head
def test_removing_dead_heads_keeps_the_outputs(kv_heads):
    base = _tiny_llama(kv_heads)
    head_dim = 16
    for attention in (layer.self_attn for layer in base.model.layers):
        for head in (1, 2):  # one head of each key/value group contributes nothing
            attention.o_proj.weight.data[:, head * head_dim:(head + 1) * head_dim] = 0.0
    layers = linear_layers(base)
    ids = torch.randint(0, 128, (2, 24))
    plan = _attention_plan(layers, 0.5)
    thinned = copy.deepcopy(base)
    apply_plan_(thinned, plan, hessians=input_hessians(base, ids, [layer.name for layer in layers]))
    attention = thinned.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (32, 64) and attention.o_proj.weight.shape == (64, 32)
    assert attention.k_proj.weight.shape == (16 * min(kv_heads, 2), 64)  # multi-head attention loses k/v heads too
    assert attention.num_key_value_groups == 1  # one query head left per key/value head either way
    for layer in layers:
        if ".self_attn." in layer.name:
            (layout,) = layer_layout(layer, plan[layer.name])
            assert tuple(thinned.get_submodule(layer.name).weight.shape) == (layout.rows, layout.cols)
    with torch.no_grad():
        expected, got = base(ids).logits, thinned(ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def test_heads_are_chosen_within_each_key_value_group():
    from compsearch.compress.structured import kept_head_index

    scores = torch.tensor([5.0, 1.0, 0.0, 9.0, 8.0, 7.0])  # 2 groups of 3 query heads
    assert kept_head_index(scores, 2, 2 / 3).tolist() == [0, 1, 3, 4]  # the group's best, not the global best
    assert kept_head_index(scores, 6, 0.5).tolist() == [3, 4, 5]  # multi-head: whole heads compete


def test_kept_heads_round_to_whole_heads_per_group():
    from compsearch.spaces.plan import kept_heads

    assert kept_heads(9, 3, 0.5) == (6, 3) and kept_heads(9, 3, 1 / 3) == (3, 3)  # SmolLM2-135M's 3 groups of 3
    assert kept_heads(32, 8, 0.75) == (24, 8) and kept_heads(4, 2, 0.1) == (2, 2)  # at least one per group
    assert kept_heads(32, 32, 0.75) == (24, 24)  # multi-head: keys and values go with their heads


def test_head_fraction_needs_the_whole_attention():
    with pytest.raises(PlanError, match="only the projections"):
        Plan({"model.layers.0.mlp.up_proj": LayerPlan(head_fraction=0.5)})
    with pytest.raises(PlanError, match="plan them all"):
        Plan({f"model.layers.0.self_attn.{kind}": LayerPlan(head_fraction=0.5) for kind in ("q_proj", "o_proj")})
    with pytest.raises(PlanError, match="disagree on head_fraction"):
        Plan({f"model.layers.0.self_attn.{kind}": LayerPlan(head_fraction=0.5 if kind != "v_proj" else 0.75)
              for kind in ("q_proj", "k_proj", "v_proj", "o_proj")})


def test_space_rounds_head_fractions_and_refuses_models_without_head_layout():
    from compsearch.spaces.layers import LayerInfo
    from compsearch.spaces.space import Space, SpaceError

    layers = [LayerInfo(f"model.layers.0.self_attn.{kind}", out, 576, heads=9, kv_heads=3, head_dim=64)
              for kind, out in (("q_proj", 576), ("k_proj", 192), ("v_proj", 192), ("o_proj", 576))]
    space = Space("heads", head_fractions=(1.0, 0.75, 0.5))
    plans = {fraction: Plan({layer.name: space.layer_plan(layer, {"head_fraction": fraction}) for layer in layers})
             for fraction in (0.75, 0.5)}
    assert plans[0.75] == plans[0.5]  # both keep 2 of each group's 3 heads: the same plan
    assert plans[0.5]["model.layers.0.self_attn.q_proj"].head_fraction == pytest.approx(2 / 3)
    space.check_layers(layers)
    with pytest.raises(SpaceError, match="head layout"):
        space.check_layers([LayerInfo(layer.name, layer.out_features, layer.in_features) for layer in layers])


def test_kept_columns_absorb_removed_ones_by_least_squares():
    from compsearch.compress.structured import compensated_columns

    torch.manual_seed(0)
    inputs = torch.randn(4096, 8, dtype=torch.float64)
    inputs[:, 3] = 0.5 * inputs[:, 0] - inputs[:, 5]  # a removed column the kept ones explain exactly
    weight = torch.randn(6, 8, dtype=torch.float64)
    hessian = inputs.T @ inputs / len(inputs)
    kept = torch.tensor([0, 1, 2, 4, 5, 6, 7])
    compensated = compensated_columns(weight, hessian, kept, damping=0.0)
    assert torch.allclose(inputs[:, kept] @ compensated.T, inputs @ weight.T, atol=1e-8)
    plain_error = (inputs[:, kept] @ weight[:, kept].T - inputs @ weight.T).norm()
    assert plain_error > 1.0  # dropping the column without compensation loses its share


def test_unit_energy_is_each_units_share_of_the_output():
    from compsearch.compress.structured import unit_energy

    torch.manual_seed(0)
    inputs, weight = torch.randn(512, 12, dtype=torch.float64), torch.randn(5, 12, dtype=torch.float64)
    hessian = inputs.T @ inputs / len(inputs)
    for width in (1, 4):
        expected = [(inputs[:, u * width:(u + 1) * width] @ weight[:, u * width:(u + 1) * width].T).square().sum() / 512
                    for u in range(12 // width)]
        assert torch.allclose(unit_energy(weight, hessian, width), torch.stack(expected))
