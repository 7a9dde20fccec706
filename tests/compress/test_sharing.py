"""Basis Sharing across blocks: plans, bytes, the shared factorization, checkpoints, and the space's decision groups."""
import copy

import pytest
import torch
from safetensors import safe_open

from compsearch.compress import apply_plan_, layer_nbytes, load_compressed, plan_nbytes, save_compressed
from compsearch.compress.checkpoint import WEIGHTS_FILE
from compsearch.compress.sequential import apply_plan_sequentially_
from compsearch.spaces.layers import count_params
from compsearch.spaces.plan import LayerPlan, Plan, PlanError, share_owner
from compsearch.spaces.space import Space

MLP_KINDS = ("gate_proj", "up_proj", "down_proj")


def _mlp_plan(layers, **fields):
    return Plan({layer.name: LayerPlan(**fields) for layer in layers if layer.kind in MLP_KINDS})


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_the_owner_of_a_basis_is_the_first_block_of_its_run():
    assert share_owner("model.layers.3.mlp.up_proj", 2) == "model.layers.2.mlp.up_proj"
    assert share_owner("model.layers.11.mlp.up_proj", 4) == "model.layers.8.mlp.up_proj"
    assert share_owner("model.layers.8.self_attn.q_proj", 4) == "model.layers.8.self_attn.q_proj"


@pytest.mark.parametrize("layers, message", [
    ({"model.layers.0.mlp.up_proj": dict(share_blocks=2)}, "give a rank_fraction below 1.0"),
    ({"model.layers.1.mlp.up_proj": dict(rank_fraction=0.5, share_blocks=2)},
     "model.layers.0.mlp.up_proj is planned not at all"),
    ({"model.layers.0.mlp.up_proj": dict(rank_fraction=0.5, share_blocks=2),
      "model.layers.1.mlp.up_proj": dict(rank_fraction=0.5, share_blocks=2, bits=4)}, "is planned differently"),
    ({"model.embed_tokens": dict(rank_fraction=0.5, share_blocks=2)}, "only layers of numbered decoder blocks"),
])
def test_plans_that_cannot_share_are_refused_with_the_fix(layers, message):
    with pytest.raises(PlanError, match=message):
        Plan({name: LayerPlan(**fields) for name, fields in layers.items()})


def test_a_shared_basis_is_counted_once(calibrated_tiny):
    model, _, _, layers, _ = calibrated_tiny
    own = _mlp_plan(layers, rank_fraction=0.5)
    shared = _mlp_plan(layers, rank_fraction=0.5, share_blocks=2)
    total = count_params(model)
    by_name = {layer.name: layer for layer in layers}
    # block 1 stores only its up factors: each of its MLP projections saves the rank x inputs basis
    saved = sum(layer_nbytes(by_name[name], own[name]) - layer_nbytes(by_name[name], shared[name])
                for name in shared.layers if name.startswith("model.layers.1."))
    assert saved == sum(32 * by_name[name].in_features * 2 for name in shared.layers if name.startswith("model.layers.1."))
    assert plan_nbytes(layers, own, total) - plan_nbytes(layers, shared, total) == saved
    assert all(layer_nbytes(by_name[name], shared[name]) == layer_nbytes(by_name[name], own[name])
               for name in shared.layers if name.startswith("model.layers.0."))


def test_plain_sharing_is_the_best_rank_r_fit_of_the_stacked_weights(calibrated_tiny):
    """With plain SVD the members' error is exactly what the stacked matrix's discarded singular values say,
    and every member computes with the one basis module."""
    model, _, _, layers, _ = calibrated_tiny
    shared = copy.deepcopy(model)
    plan = _mlp_plan(layers, rank_fraction=0.5, share_blocks=2)
    apply_plan_(shared, plan)
    for kind in MLP_KINDS:
        names = [f"model.layers.{block}.mlp.{kind}" for block in (0, 1)]
        first, second = (shared.get_submodule(name) for name in names)
        assert first.down is second.down
        stacked = torch.cat([model.get_submodule(name).weight.data.double() for name in names])
        fitted = torch.cat([m.up.weight.data.double() @ m.down.weight.data.double() for m in (first, second)])
        discarded = torch.linalg.svdvals(stacked)[first.rank:].square().sum().sqrt()
        assert (fitted - stacked).norm() == pytest.approx(discarded.item(), rel=1e-4)


def test_whitened_sharing_fits_the_calibration_outputs_better(calibrated_tiny):
    model, _, windows, layers, (norms, hessians) = calibrated_tiny
    errors = {}
    for method in ("svd", "whiten"):
        shared = copy.deepcopy(model)
        apply_plan_(shared, _mlp_plan(layers, rank_fraction=0.5, share_blocks=2, lowrank_method=method),
                    hessians=hessians)
        errors[method] = sum(
            torch.trace((model.get_submodule(name).weight.data - m.up.weight.data @ m.down.weight.data)
                        @ hessians[name] @ (model.get_submodule(name).weight.data
                                            - m.up.weight.data @ m.down.weight.data).T).item()
            for name in _mlp_plan(layers).layers for m in [shared.get_submodule(name)])
    assert errors["whiten"] < errors["svd"]


def test_a_quantized_shared_basis_round_trips_through_a_checkpoint_stored_once(calibrated_tiny, tmp_path):
    model, tokenizer, windows, layers, (norms, hessians) = calibrated_tiny
    compressed = copy.deepcopy(model)
    plan = _mlp_plan(layers, rank_fraction=0.5, share_blocks=2, lowrank_method="whiten", bits=4, group_size=32,
                     quant_method="gptq")
    stored = apply_plan_(compressed, plan, hessians=hessians, keep_stored=True).stored
    assert "model.layers.0.mlp.up_proj.down.weight" in stored and "model.layers.1.mlp.up_proj.down.weight" not in stored
    basis = compressed.get_submodule("model.layers.1.mlp.up_proj").down.weight.data
    assert torch.equal(basis, stored["model.layers.0.mlp.up_proj.down.weight"].weight)  # the members use what is stored
    path = save_compressed(compressed, plan, stored, tmp_path, tokenizer)
    with safe_open(str(tmp_path / WEIGHTS_FILE), framework="pt") as archive:
        assert not [key for key in archive.keys() if key.startswith("model.layers.1.mlp.up_proj.down")]
    assert path.stat().st_size < plan_nbytes(layers, plan, count_params(model)) * 1.1
    reloaded, _ = load_compressed(tmp_path)
    ids = windows.eval_ids[:1]
    assert torch.allclose(_logits(reloaded, ids), _logits(compressed, ids), atol=1e-4)
    assert reloaded.get_submodule("model.layers.0.mlp.down_proj").down is \
        reloaded.get_submodule("model.layers.1.mlp.down_proj").down


def test_sequential_calibration_refuses_a_basis_shared_across_blocks(calibrated_tiny):
    model, _, windows, layers, _ = calibrated_tiny
    with pytest.raises(PlanError, match="one-shot"):
        apply_plan_sequentially_(copy.deepcopy(model), _mlp_plan(layers, rank_fraction=0.5, share_blocks=2),
                                 windows.calib_ids)


def test_a_space_that_shares_decides_for_runs_of_blocks(calibrated_tiny):
    """Offered share_blocks 2, block (and layer) decision groups span two blocks, so a run's layers always
    get one plan; a rank that saves weights only when shared is offered only with the basis shared."""
    _, _, _, layers, _ = calibrated_tiny
    space = Space("s", rank_fractions=(1.0, 0.5), lowrank_methods=("whiten",), share_blocks=(1, 2))
    assert list(space.groups(layers)) == ["model.layers.0-1"]
    by_layer = Space("s", granularity="layer", rank_fractions=(1.0, 0.5), share_blocks=(1, 2))
    assert "model.layers.0-1.mlp.gate_proj+up_proj" in by_layer.groups(layers)
    plan = space.plan(layers, {"rank_fraction": 0.5, "share_blocks": 2})
    assert {lp.share_blocks for lp in plan.layers.values()} == {2} and plan.shared_bases()
    # 0.875 of the 64 x 128 down_proj (rank 56) stores more than the dense matrix, unless two blocks share the basis
    down_proj = next(layer for layer in layers if layer.kind == "down_proj")
    assert space.layer_plan(down_proj, {"rank_fraction": 0.875, "share_blocks": 1}).rank_fraction == 1.0
    assert space.layer_plan(down_proj, {"rank_fraction": 0.875, "share_blocks": 2}).share_blocks == 2
    assert space.layer_plan(down_proj, {"rank_fraction": 1.0, "share_blocks": 2}).share_blocks == 1
