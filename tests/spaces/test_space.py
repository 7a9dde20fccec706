import optuna
import pytest

from compsearch.spaces.layers import LayerInfo, group_layers
from compsearch.spaces.space import Space, SpaceError, get_space

LAYERS = [
    LayerInfo("model.layers.0.self_attn.q_proj", 64, 64), LayerInfo("model.layers.0.self_attn.k_proj", 32, 64),
    LayerInfo("model.layers.0.self_attn.v_proj", 32, 64), LayerInfo("model.layers.0.self_attn.o_proj", 64, 64),
    LayerInfo("model.layers.0.mlp.gate_proj", 128, 64), LayerInfo("model.layers.0.mlp.up_proj", 128, 64),
    LayerInfo("model.layers.0.mlp.down_proj", 64, 128), LayerInfo("model.layers.1.mlp.down_proj", 64, 128),
]


def test_layer_granularity_ties_fused_projections():
    groups = group_layers(LAYERS, "layer", tie_fused=True)
    assert groups["model.layers.0.self_attn.k_proj+q_proj+v_proj"] == [l.name for l in LAYERS[:3]]
    assert groups["model.layers.0.mlp.gate_proj+up_proj"] == [LAYERS[4].name, LAYERS[5].name]
    assert len(group_layers(LAYERS, "layer", tie_fused=False)) == len(LAYERS)


def test_block_and_type_granularity():
    assert set(group_layers(LAYERS, "block")) == {"model.layers.0", "model.layers.1"}
    assert group_layers(LAYERS, "type")["down_proj"] == [LAYERS[6].name, LAYERS[7].name]


def test_suggest_plan_gives_tied_layers_the_same_choice():
    space = get_space("joint").with_choices(granularity="layer")
    study = optuna.create_study(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(5):
        plan = space.suggest_plan(study.ask(), LAYERS)
        q, k, v = (plan[l.name] for l in LAYERS[:3])
        assert q.bits == k.bits == v.bits and q.sparsity == k.sparsity == v.sparsity
        assert set(plan.layers) == {l.name for l in LAYERS}


def test_rank_that_saves_nothing_leaves_layer_full_rank():
    space = Space("r", rank_fractions=(0.5, 1.0), granularity="block")
    plan = space.suggest_plan(optuna.trial.FixedTrial({"model.layers.0:rank_fraction": 0.5,
                                                              "model.layers.1:rank_fraction": 1.0}), LAYERS)
    assert plan["model.layers.0.self_attn.q_proj"].rank_fraction == 1.0  # 64x64 at rank 32 saves nothing
    assert plan["model.layers.0.mlp.up_proj"].rank_fraction == 0.5  # 128x64 at rank 32 does


def test_params_for_enqueues_a_uniform_plan():
    space = get_space("quant")
    params = space.params_for({group: {"bits": 4, "group_size": 64} for group in space.groups(LAYERS)})
    plan = space.suggest_plan(optuna.trial.FixedTrial(params), LAYERS)
    assert {(lp.bits, lp.group_size) for lp in plan.layers.values()} == {(4, 64)}


@pytest.mark.parametrize("overrides, fragment", [
    ({"bits": (4, 7)}, "bits 7"), ({"sparsities": ("1:3",)}, "pattern '1:3'"), ({"sparsities": ("abc",)}, "'abc'"),
    ({"rank_fractions": (0.0,)}, "rank fraction 0.0"), ({"group_sizes": ()}, "no group size"),
])
def test_bad_choices_are_refused(overrides, fragment):
    with pytest.raises(SpaceError, match=fragment):
        get_space("joint").with_choices(**overrides)


def test_unknown_space_lists_valid_names():
    with pytest.raises(SpaceError, match="choose one of"):
        get_space("nope")


def test_nm_pattern_must_divide_inputs():
    with pytest.raises(SpaceError, match="divisible by 8"):
        Space("s", sparsities=("0", "4:8")).check_layers([LayerInfo("x", 8, 12)])


def test_vllm_groups_are_whole_groups_of_each_layers_inputs():
    space = get_space("vllm")
    down, q_proj = LayerInfo("model.layers.0.mlp.down_proj", 576, 1536), LayerInfo("model.layers.0.self_attn.q_proj", 576, 576)
    choice = {"bits": 4, "group_size": 128, "quant_method": "gptq-sym"}
    assert space.layer_plan(down, choice).group_size == 128
    assert space.layer_plan(q_proj, choice).group_size == 64  # 576 = 4.5 x 128: the largest whole group offered
    assert space.layer_plan(q_proj, {**choice, "quant_method": "rtn"}).group_size == 128  # its format allows a ragged group
    assert space.layer_plan(q_proj, {**choice, "bits": 16}).is_identity
    assert space.fallbacks([down, q_proj]) == {"q_proj (576 inputs)": {"group 128": "group 64"}}
    space.check_layers([down, q_proj])
    with pytest.raises(SpaceError, match="no offered group size up to 32 divides 20 inputs"):
        space.check_layers([LayerInfo("x", 8, 20)])


def test_gguf_choices_set_the_bits_and_fall_back_where_rows_do_not_fit():
    space = get_space("gguf")
    down, q_proj = LayerInfo("model.layers.0.mlp.down_proj", 576, 1536), LayerInfo("model.layers.0.self_attn.q_proj", 576, 576)
    assert (space.layer_plan(down, {"quant_method": "q4_k"}).bits, space.layer_plan(down, {"quant_method": "q4_k"}).quant_method) == (4, "q4_k")
    assert space.layer_plan(q_proj, {"quant_method": "q4_k"}).quant_method == "q5_0"  # llama-quantize's fallback
    assert space.layer_plan(q_proj, {"quant_method": "f16"}).is_identity
    assert space.fallbacks([q_proj])["q_proj (576 inputs)"]["q3_k"] == "q4_0"
    with pytest.raises(SpaceError, match="leave q4_0 out"):
        Space("g", quant_methods=("f16", "q4_0")).check_layers([LayerInfo("x", 8, 20)])


def test_rows_no_fallback_can_hold_keep_16_bits_as_in_llama_quantize():
    narrow = LayerInfo("model.layers.0.self_attn.q_proj", 32, 16)  # too short for Q4_K and for its fallback Q5_0
    space = Space("g", quant_methods=("q4_k", "q8_0"), rank_fractions=(1.0, 0.5), channel_fractions=(1.0, 0.75))
    assert space.layer_plan(narrow, {"quant_method": "q4_k"}).is_identity  # llama-quantize's last fallback is F16
    assert Space("k", quant_methods=("q4_k", "rtn")).fallbacks([narrow]) == {"q_proj (16 inputs)": {"q4_k": "f16"}}
    with pytest.raises(SpaceError, match="leave q8_0 out"):  # a type without fallbacks is refused, as there
        space.check_layers([narrow])
    down = LayerInfo("model.layers.0.mlp.down_proj", 32, 64)
    assert space.layer_plan(down, {"quant_method": "q8_0", "channel_fraction": 0.75}).bits == 16  # 48 pruned rows
    wide = LayerInfo("model.layers.0.mlp.up_proj", 128, 64)  # rank 0.5 -> factor rows of 32 values
    assert space.layer_plan(wide, {"quant_method": "q8_0", "rank_fraction": 0.5}).rank_fraction == 0.5
    assert space.layer_plan(wide, {"quant_method": "q8_0", "rank_fraction": 0.25}).rank_fraction == 1.0  # rows of 16


@pytest.mark.parametrize("choice", [{"quant_method": q, "rank_fraction": r, "channel_fraction": c, "head_fraction": h}
                                    for q in ("q4_k", "q8_0", "rtn", "gptq") for r in (1.0, 0.5, 0.25)
                                    for c in (1.0, 0.75, 0.5) for h in (1.0, 0.5)])
def test_every_plan_a_space_gives_can_be_stored(choice):
    from compsearch.compress.apply import layer_nbytes

    space = Space("all", quant_methods=("q4_k", "q8_0", "rtn", "gptq"), bits=(4,), group_sizes=(32,),
                  rank_fractions=(1.0, 0.5, 0.25), channel_fractions=(1.0, 0.75, 0.5), head_fractions=(1.0, 0.5))
    layers = [LayerInfo(l.name, l.out_features, l.in_features, heads=4, kv_heads=2, head_dim=16) for l in LAYERS]
    for layer in layers:
        assert layer_nbytes(layer, space.layer_plan(layer, choice)) > 0
