"""The worker-side evaluator: sensitivity measurements leave the base model exactly as it was."""
import torch

from compsearch.evaluators.data import load_text, make_windows
from compsearch.search.models import load_tokenizer
from compsearch.search.trial import TrialEvaluator, WorkerSettings
from compsearch.spaces.plan import LayerPlan, Plan


def _evaluator(model_dir):
    tokenizer = load_tokenizer(str(model_dir))
    text, source = load_text(None)
    windows = make_windows(tokenizer, text, source, seq_len=32, eval_windows=2, calib_windows=2)
    evaluator = TrialEvaluator(str(model_dir), windows.eval_ids, windows.calib_ids,
                               WorkerSettings(batch_size=2, with_kl=False))
    return evaluator, windows


def test_profile_kl_restores_the_base_model(tiny_model_dir):
    evaluator, windows = _evaluator(tiny_model_dir)
    before = {name: param.clone() for name, param in evaluator.model.state_dict().items()}
    plans = [Plan({"model.layers.0.mlp.up_proj": LayerPlan(bits=2, group_size=32)}),
             Plan({"model.layers.1.mlp.down_proj": LayerPlan(rank_fraction=0.25, sparsity=0.5)}),
             Plan({"model.layers.1.mlp.down_proj": LayerPlan(bits=8)}),
             Plan({f"model.layers.0.self_attn.{kind}": LayerPlan(head_fraction=0.5)
                   for kind in ("q_proj", "k_proj", "v_proj", "o_proj")})]
    kls = evaluator.profile_kl([plan.to_json() for plan in plans], windows=2, seq_len=16)
    assert kls[0] > kls[2] >= 0 and kls[1] > kls[2] and kls[3] > kls[2]  # 8 bits barely moves the output
    after = evaluator.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert evaluator.model.model.layers[0].self_attn.num_key_value_groups == 2  # the attention's grouping too
    again = evaluator.profile_kl([plans[0].to_json()], windows=2, seq_len=16)
    assert again[0] == kls[0]  # deterministic, and measured on the restored model


def test_skipping_unchanged_blocks_gives_the_full_forward_result(tiny_model_dir):
    from compsearch.evaluators.quality import base_log_probs, perplexity_and_kl
    from compsearch.search.profiling import BlockReplay

    evaluator, windows = _evaluator(tiny_model_dir)
    ids = windows.calib_ids
    base = base_log_probs(evaluator.model, ids, len(ids))
    replay = BlockReplay(evaluator.model, ids)
    plan = Plan({"model.layers.1.self_attn.v_proj": LayerPlan(bits=2, group_size=32)})
    assert replay.first_changed(plan.layers) == 1
    model, _ = evaluator.compressed_model(plan)
    full = perplexity_and_kl(model, ids, len(ids), base)["kl"]
    with evaluator._base_with_plan(plan) as in_place, replay.skipping(plan.layers):
        assert type(in_place.model.layers[0]).__name__ == "Replay"
        skipped = perplexity_and_kl(in_place, ids, len(ids), base)["kl"]
    assert full > 0 and abs(skipped - full) <= 1e-6 * full
    assert type(evaluator.model.model.layers[0]).__name__ != "Replay"  # restored


def test_output_error_grows_with_the_damage_and_runs_only_the_changed_blocks(tiny_model_dir):
    evaluator, _ = _evaluator(tiny_model_dir)
    before = {name: param.clone() for name, param in evaluator.model.state_dict().items()}
    blocks = evaluator.model.model.layers
    evaluator.profile_error([], windows=2, seq_len=16)  # the base model's replay is made first, in full
    later = []
    handle = blocks[-1].register_forward_hook(lambda *_: later.append(1))
    plans = [Plan({"model.layers.0.mlp.up_proj": LayerPlan(bits=2, group_size=32)}),
             Plan({"model.layers.0.mlp.up_proj": LayerPlan(bits=8)}),
             Plan({"model.embed_tokens": LayerPlan(bits=4, group_size=32)})]
    try:
        errors = evaluator.profile_error([plan.to_json() for plan in plans], windows=2, seq_len=16)
    finally:
        handle.remove()
    assert len(blocks) > 1 and not later  # stopped after block 0, the last (only) one changed
    assert errors[0] > errors[1] > 0
    assert errors[2] is None  # the tiny model's head shares the embedding: no block output shows that change
    after = evaluator.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(not block._forward_hooks and type(block).__name__ != "Replay" for block in blocks)


def test_the_base_model_is_scored_once_when_the_worker_starts(tiny_model_dir, monkeypatch):
    from compsearch.evaluators.quality import perplexity_and_kl

    tokenizer = load_tokenizer(str(tiny_model_dir))
    text, source = load_text(None)
    windows = make_windows(tokenizer, text, source, seq_len=32, eval_windows=2, calib_windows=2)
    evaluator = TrialEvaluator(str(tiny_model_dir), windows.eval_ids, windows.calib_ids, WorkerSettings(batch_size=2))
    full = perplexity_and_kl(evaluator.model, windows.eval_ids, 2, evaluator.base)

    def no_copy(*args, **kwargs):
        raise AssertionError("the empty plan copied or compressed the model")

    monkeypatch.setattr(evaluator, "compressed_model", no_copy)
    metrics = evaluator.evaluate(Plan().to_json())
    assert metrics["ppl"] == full["ppl"] and metrics["nll"] == full["nll"] and metrics["kl"] == 0.0


def test_statistics_are_measured_as_plans_need_them_and_kept(tiny_model_dir):
    """Norms alone first (a cheaper pass), Hessians once a plan needs them (the norms trials used stay),
    the output head's only for a plan that compresses it."""
    evaluator, _ = _evaluator(tiny_model_dir)
    wanda = Plan({"model.layers.0.mlp.up_proj": LayerPlan(sparsity=0.5, prune_method="wanda")})
    norms, hessians = evaluator.statistics_for(wanda)
    assert hessians is None and "model.layers.1.mlp.down_proj" in norms and "lm_head" not in norms
    gptq = Plan({"model.layers.0.mlp.up_proj": LayerPlan(bits=3, group_size=32, quant_method="gptq")})
    again, hessians = evaluator.statistics_for(gptq)
    assert again is None and hessians["model.layers.1.mlp.down_proj"].shape == (128, 128)
    assert evaluator.statistics_for(wanda)[0] is norms
    head = Plan({"lm_head": LayerPlan(sparsity=0.5, prune_method="wanda")})
    assert evaluator.statistics_for(head)[0]["lm_head"].shape == (64,)
    assert evaluator.statistics_for(Plan({"model.layers.0.mlp.up_proj": LayerPlan(bits=4)})) == (None, None)


def test_workers_share_the_calibration_statistics(ray_session, tiny_model_dir):
    """Each worker measures a share of the calibration windows; every worker gets the merged statistics,
    equal to one pass over all windows."""
    import ray

    from compsearch.search.job import prepare_job
    from compsearch.search.runner import share_calibration, start_workers
    from tests.search.helpers import tiny_spec

    ctx = prepare_job(tiny_spec(tiny_model_dir, "shared-statistics", space="sota"))
    pool = start_workers(ctx, 2, 1)
    assert len(share_calibration(ctx, pool)) == 1
    plan = Plan({"model.layers.0.mlp.up_proj": LayerPlan(bits=3, group_size=32, quant_method="gptq",
                                                         sparsity=0.5, prune_method="wanda")})
    alone = TrialEvaluator(ctx.model_ref, ctx.windows.eval_ids, ctx.windows.calib_ids, WorkerSettings(batch_size=2))
    norms, hessians = alone.statistics_for(plan)
    for shared_norms, shared_hessians in ray.get([worker.statistics_for.remote(plan) for worker in pool]):
        for name in norms:
            assert torch.allclose(shared_norms[name], norms[name], rtol=1e-4)
            assert torch.allclose(shared_hessians[name], hessians[name], rtol=1e-4, atol=1e-7)
    quant_only = prepare_job(tiny_spec(tiny_model_dir, "no-statistics", space="quant"))
    assert share_calibration(quant_only, pool) == []  # round-to-nearest needs none
