import json

import pytest

from compsearch.spaces.plan import LayerPlan, Plan, PlanError, rank_for, saves_params


def test_plan_round_trips_through_json_exactly():
    plan = Plan({
        "model.layers.1.mlp.up_proj": LayerPlan(bits=3, group_size=64, sparsity=0.5, pattern="2:4", prune_method="wanda"),
        "model.layers.0.self_attn.q_proj": LayerPlan(bits=8, rank_fraction=0.25),
        "model.layers.0.mlp.down_proj": LayerPlan(sparsity=0.3),
    })
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    assert list(json.loads(text)["layers"]) == sorted(plan.layers)


def test_unplanned_layer_is_kept():
    assert Plan()["anything"].is_identity


@pytest.mark.parametrize("kwargs, fragment", [
    ({"bits": 7}, "bits=7"),
    ({"group_size": 100}, "group_size=100"),
    ({"sparsity": 1.0}, "sparsity=1.0"),
    ({"pattern": "3:4", "sparsity": 0.25}, "pattern='3:4'"),
    ({"pattern": "2:4", "sparsity": 0.3}, "set sparsity to 0.5"),
    ({"rank_fraction": 0.0}, "rank_fraction=0.0"),
    ({"prune_method": "random"}, "prune_method='random'"),
])
def test_invalid_layer_plans_name_the_value(kwargs, fragment):
    with pytest.raises(PlanError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        LayerPlan(**kwargs)


def test_plan_is_immutable_and_rejects_unknown_keys():
    plan = Plan({"a": LayerPlan(bits=4)})
    with pytest.raises(TypeError):
        plan.layers["b"] = LayerPlan()
    with pytest.raises(PlanError, match="unknown layer plan keys"):
        Plan.from_json('{"version": 1, "layers": {"a": {"bits": 4, "colour": "red"}}}')


def test_rank_rounds_to_multiple_of_eight_and_only_saving_ranks_pass():
    assert rank_for(576, 1536, 0.5) == 288
    assert rank_for(64, 64, 0.01) == 8
    assert saves_params(576, 1536, 0.5)  # 288 * 2112 < 576 * 1536
    assert not saves_params(576, 576, 0.5)  # 288 * 1152 == 576 * 576: no saving
