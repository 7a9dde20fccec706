"""End-to-end studies on the tiny model with a real local Ray instance and real Optuna storage."""
import json
import math

import pandas as pd
import pytest

from compsearch.search.commands import RunOptions, evaluate, export, leaderboard, resume, status, submit
from compsearch.search.errors import UserError
from compsearch.search.evaluate import Reference
from compsearch.search.results import trials_frame
from compsearch.search.study import BASE_METRICS_ATTR, done_count, load_study, open_storage
from compsearch.spaces.plan import LayerPlan, Plan
from tests.search.helpers import tiny_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_study(tiny_model_dir, ray_session, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    spec = tiny_spec(tiny_model_dir, "e2e", memory_budget="0.6", objectives=("ppl", "memory", "kl"))
    events = []
    options = RunOptions(results_dir=results, workers=2, on_trial=events.append,
                         cache_dir=tmp_path_factory.mktemp("cache"))
    trials = submit(spec, 10, options)
    return spec, results, options, trials, events


def test_the_workers_share_one_base_reference(finished_study):
    """Each of the two workers measured half of the evaluation windows; the merged reference is the one a
    single process measures: the base perplexity, and KL 0 for the base model's own plan."""
    from compsearch.evaluators.quality import base_reference
    from compsearch.search.job import prepare_job
    from compsearch.search.trial import TrialEvaluator, WorkerSettings

    spec, _, options, _, _ = finished_study
    ctx = prepare_job(spec)
    evaluator = TrialEvaluator(ctx.model_ref, ctx.windows.eval_ids, ctx.windows.calib_ids, WorkerSettings(batch_size=4))
    _, alone = base_reference(evaluator.model, ctx.windows.eval_ids, 4)
    shared = load_study("e2e", open_storage(options.storage_url("e2e")))[0].user_attrs[BASE_METRICS_ATTR]
    assert shared["ppl"] == pytest.approx(alone["ppl"], rel=1e-5) and shared["kl"] == 0.0


def test_study_writes_every_table(finished_study):
    spec, results, options, trials, events = finished_study
    folder = results / "e2e"
    table = pd.read_parquet(folder / "trials.parquet")
    assert len(table) == 10 and table["trial"].is_unique
    assert set(table["state"]) == {"COMPLETE"}
    assert table["ppl"].gt(1).all() and table["kl"].ge(0).all()
    assert table["memory_bytes"].gt(0).all() and table["memory_budget_bytes"].notna().all()
    assert table["protocol_eval_tokens"].eq(4 * 31).all() and table["protocol_data_sha256"].nunique() == 1
    assert table["worker"].nunique() == 2  # both Ray workers ran trials
    # infeasible trials are kept and marked, not hidden
    assert set(table["feasible"]) <= {True, False}
    # the default quality floor, 3x the base model's perplexity, is a constraint like the memory budget
    base_ppl = load_study("e2e", open_storage(options.storage_url("e2e")))[0].user_attrs[BASE_METRICS_ATTR]["ppl"]
    assert table["quality_violation"].to_numpy() == pytest.approx(((table["ppl"] / base_ppl - 3) / 3).to_numpy())
    assert (table["feasible"] == ((table["memory_bytes"] <= table["memory_budget_bytes"])
                                  & (table["quality_violation"] <= 0))).all()
    layers = pd.read_parquet(folder / "layers.parquet")
    per_trial = layers.groupby("trial")["bytes"].sum()
    assert len(layers) == 10 * layers["layer"].nunique()
    pareto = pd.read_parquet(folder / "pareto.parquet")
    assert len(pareto) >= 1 and pareto["feasible"].all()
    best = sorted((folder / "best").glob("*.json"))
    assert len(best) == len(pareto)
    assert json.loads(best[0].read_text())["rank"] == 1
    assert per_trial.gt(0).all()
    assert [event.done for event in events] == list(range(1, 11))


def test_seed_trials_run_first_within_budget(finished_study):
    spec, results, _, _, _ = finished_study
    table = pd.read_parquet(results / "e2e" / "trials.parquet").sort_values("trial")
    seeds = table[table["seed"].notna()]
    # every trial asked before the first generation completes is a seed (no random plan: with 2 workers the
    # sampler's own draws would start at population + 1); the uniform ones first, before the profile exists
    assert len(seeds) >= spec.population_size + 1 and list(seeds["trial"]) == list(range(len(seeds)))
    assert list(seeds["seed"]) == sorted(seeds["seed"], key=lambda kind: kind != "uniform")
    assert seeds["seed"].eq("uniform").any()
    profile_seeds = seeds[seeds["seed"] == "profile"]
    assert len(profile_seeds) >= 1 and profile_seeds["feasible"].all()  # profile-optimal plans fit the budget
    # every trial after the profile carries its estimate next to the measured KL (the uniform seeds ran before it)
    after = table[table["seed"] != "uniform"]
    assert after["estimated_kl"].notna().all() and table["kl"].notna().all()


def test_leaderboard_ranks_feasible_front_first(finished_study):
    _, _, options, _, _ = finished_study
    board = leaderboard("e2e", options, top=20)
    assert list(board["rank"]) == list(range(1, len(board) + 1))
    tiers = [0 if (f and front) else 1 if f else 2 for f, front in zip(board["feasible"], board["on_front"])]
    assert tiers == sorted(tiers)
    front = board[board["on_front"]]
    assert front["ppl"].is_monotonic_increasing


def test_status_reports_counts(finished_study):
    _, _, options, _, _ = finished_study
    info = status("e2e", options)
    assert info["done"] == 10 and info["target"] == 10 and info["driver"] is None
    assert info["base"]["ppl"] > 1


def test_export_checkpoint_reproduces_trial_perplexity(finished_study, tmp_path):
    _, _, options, _, _ = finished_study
    summary = export("e2e", 1, tmp_path, options, checkpoint=True, verify=True)
    assert summary["threads"] == 1  # compressed on as many threads as the trial's worker (1 CPU each)
    assert math.isclose(summary["checkpoint_ppl"], summary["metrics"]["ppl"], rel_tol=1e-5) and summary["verified"]
    assert abs(summary["checkpoint_bytes"] - summary["plan_bytes"]) < 0.02 * summary["plan_bytes"] + 64 * 1024
    assert (tmp_path / "plan.json").exists() and (tmp_path / "export.json").exists()
    with pytest.raises(UserError, match="is a folder with files in it; pass --force"):
        export("e2e", 2, tmp_path, options)
    assert json.loads((tmp_path / "export.json").read_text())["rank"] == 1  # untouched


def test_export_distills_and_records_the_result(finished_study, tmp_path):
    from compsearch.compress.distill import DistillSettings

    _, results, options, _, _ = finished_study
    with pytest.raises(UserError, match="--checkpoint"):
        export("e2e", 1, tmp_path, options, distill=DistillSettings(steps=2))
    summary = export("e2e", 2, tmp_path, options, checkpoint=True, verify=True,
                     distill=DistillSettings(steps=3, batch_size=2))
    assert summary["distill_steps"] == 3 and summary["ppl_before_distill"] == pytest.approx(summary["metrics"]["ppl"])
    assert summary["checkpoint_ppl"] == pytest.approx(summary["distilled_ppl"], rel=1e-6)  # the checkpoint is the distilled model
    table = pd.read_parquet(results / "e2e" / "trials.parquet")
    assert table.loc[table["trial"] == summary["trial"], "distilled_ppl"].item() == pytest.approx(summary["distilled_ppl"])
    assert table["distilled_ppl"].notna().sum() == 1


def test_resume_continues_to_the_new_total(finished_study):
    spec, results, options, _, _ = finished_study
    trials = resume("e2e", 13, options)
    # a worker lost under memory pressure re-queues its trial: that row is marked interrupted, not counted
    assert trials["trial"].is_unique and trials["interrupted"].isna().sum() == 13
    study, _ = load_study("e2e", open_storage(options.storage_url("e2e")))
    assert done_count(study) == 13
    assert len(pd.read_parquet(results / "e2e" / "trials.parquet")) == 13


def test_resume_refuses_a_study_measured_by_another_compression_version(finished_study):
    _, _, options, _, _ = finished_study
    study, _ = load_study("e2e", open_storage(options.storage_url("e2e")))
    protocol = study.user_attrs["protocol"]
    assert "compress_version" in protocol
    study.set_user_attr("protocol", {**protocol, "compress_version": -1})
    try:
        with pytest.raises(UserError, match="compression version -1"):
            resume("e2e", 20, options)
    finally:
        study.set_user_attr("protocol", protocol)
    assert done_count(study) == 13  # refused before any trial ran


def test_trial_that_cannot_be_built_is_recorded_and_study_goes_on(tiny_model_dir, ray_session, tmp_path):
    spec = tiny_spec(tiny_model_dir, "fails", space="quant", uniform_seeds=False)
    options = RunOptions(results_dir=tmp_path, workers=2)
    submit(spec, 1, options)
    study, _ = load_study("fails", open_storage(options.storage_url("fails")))
    params = study.trials[0].params
    study.enqueue_trial({key: 7 if key.endswith(":bits") else value for key, value in params.items()},
                        skip_if_exists=False)
    trials = resume("fails", 4, options)
    failed = trials[trials["state"] == "FAIL"]
    assert len(failed) == 1 and "'7' not in" in failed.iloc[0]["error"]
    assert (trials["state"] == "COMPLETE").sum() == 3 and len(trials) == 4


def test_non_finite_metrics_fail_the_trial_with_the_reason(tmp_path, ray_session):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tiny_model

    folder = build_tiny_model(tmp_path / "overflowing")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():  # beyond float16's range: the 16-bit model overflows to inf
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 1e6
    model.save_pretrained(folder)
    spec = tiny_spec(folder, "nan", space="quant")
    trials = submit(spec, 2, RunOptions(results_dir=tmp_path / "results", workers=2))
    assert list(trials["state"]) == ["FAIL", "FAIL"]
    assert trials["error"].str.contains("non-finite metrics: ppl=").all()


def test_profile_is_measured_once_and_reused_across_budgets(finished_study, tiny_model_dir, tmp_path):
    spec, results, options, _, _ = finished_study
    first, _ = load_study("e2e", open_storage(options.storage_url("e2e")))
    assert first.user_attrs["profile_s"] > 0  # measured for the first study (cache dir was empty)
    other = tiny_spec(tiny_model_dir, "other-budget", memory_budget="0.8", objectives=("ppl", "memory", "kl"))
    submit(other, 2, RunOptions(results_dir=results, workers=2, cache_dir=options.cache_dir))
    second, _ = load_study("other-budget", open_storage(options.storage_url("other-budget")))
    assert second.user_attrs["profile_s"] == 0.0


def test_evaluate_records_references_beside_the_trials(finished_study, tmp_path):
    """The rank-1 plan scored again as a reference reproduces its trial; a uniform preset is held
    against the study's budget; both are rows of the study's tables (after its trials, unranked)."""
    spec, results, options, _, _ = finished_study
    best = sorted((results / "e2e" / "best").glob("rank001_*.json"))[0]
    rows = evaluate([Reference("plan", str(best)), Reference("uniform", "rtn:4:g128")], options, "e2e")
    assert list(rows["name"]) == [best.name, "rtn:4:g128"] and list(rows["source"]) == ["plan", "uniform"]
    trials = trials_frame(load_study("e2e", open_storage(options.storage_url("e2e")))[0])
    rank1 = trials[trials["rank"] == 1].iloc[0]
    again = rows[rows["source"] == "plan"].iloc[0]
    assert abs(again["ppl"] - rank1["ppl"]) / rank1["ppl"] < 1e-4 and again["memory_bytes"] == rank1["memory_bytes"]
    uniform = rows[rows["source"] == "uniform"].iloc[0]
    assert 4 < uniform["bits_per_weight"] < 5  # 4-bit codes and per-group scales
    assert bool(uniform["feasible"]) == (uniform["memory_bytes"] <= rank1["memory_budget_bytes"])
    table = pd.read_parquet(results / "e2e" / "trials.parquet")
    assert set(table["source"]) == {"search", "plan", "uniform"}
    assert table[table["source"] != "search"]["rank"].isna().all()
    board = leaderboard("e2e", options, top=3)
    assert list(board["source"]) == ["search"] * 3 + ["plan", "uniform"]
    assert status("e2e", options)["references"] == 2
    evaluate([Reference("uniform", "rtn:4:g128")], options, "e2e")  # the same name again replaces its row
    assert status("e2e", options)["references"] == 2


@pytest.mark.parametrize("reference, fragment", [
    (Reference("uniform", "rtn:4:g100"), "group size 100 is not supported"),
    (Reference("uniform", "awq:4"), "'awq' is not a quantizer"),
    (Reference("plan", "/no/such/plan.json"), "cannot be read"),
    (Reference("gguf", "/no/such/model.gguf"), "cannot be read"),
])
def test_evaluate_refuses_bad_configurations(finished_study, reference, fragment):
    _, _, options, _, _ = finished_study
    with pytest.raises(UserError, match=fragment):
        evaluate([reference], options, "e2e")


def test_evaluate_refuses_a_plan_of_another_model(finished_study, tmp_path):
    _, _, options, _, _ = finished_study
    plan = tmp_path / "plan.json"
    plan.write_text(Plan({"model.layers.99.mlp.up_proj": LayerPlan(bits=4)}).to_json())
    with pytest.raises(UserError, match="not compressible layers of"):
        evaluate([Reference("plan", str(plan))], options, "e2e")


def test_a_resumed_study_does_not_draw_its_first_runs_plans_again(tiny_model_dir, ray_session, tmp_path):
    """The first generation is random: a resumed run must not replay the seeded draws of the first run."""
    spec = tiny_spec(tiny_model_dir, "replay", guided=False, uniform_seeds=False)
    options = RunOptions(results_dir=tmp_path / "results", workers=2)
    submit(spec, 2, options)
    trials = resume("replay", 4, options)
    plans = trials.loc[trials["state"] == "COMPLETE", "plan_json"]
    assert len(plans) == 4 and plans.nunique() == 4


def test_a_results_folder_that_cannot_take_the_tables_does_not_stop_the_study(tiny_model_dir, ray_session, tmp_path,
                                                                              caplog):
    """The study lives in its storage: tables that cannot be written (here trials.parquet is a folder, as a
    full or read-only disk would refuse them) are reported once and rebuilt when they can be."""
    results = tmp_path / "results"
    (results / "blocked" / "trials.parquet").mkdir(parents=True)
    options = RunOptions(results_dir=results, workers=2)
    trials = submit(tiny_spec(tiny_model_dir, "blocked", guided=False), 3, options)
    assert (trials["state"] == "COMPLETE").sum() == 3
    assert caplog.text.count("cannot be written") == 1
    (results / "blocked" / "trials.parquet").rmdir()
    resume("blocked", 3, options)  # runs no trial, rebuilds the tables
    assert len(pd.read_parquet(results / "blocked" / "trials.parquet")) == 3


def test_the_best_plans_are_distilled_once_and_their_rows_show_before_and_after(finished_study):
    """`resume --trials <done> --distill-top 2` only distills: the two best feasible trials' rows gain what
    distillation measured, beside what the trial measured; a trial distilled already (by the module's export
    test) is not distilled again; a second resume finds them all done."""
    spec, results, options, _, _ = finished_study
    done = status("e2e", options)["done"]  # the module's earlier tests may have resumed the study
    before = pd.read_parquet(results / "e2e" / "trials.parquet")
    distilled_before = set(before.loc[before["distilled_ppl"].notna(), "trial"])
    table = resume("e2e", done, options, distill_top=2, distill_steps=2)
    ranked = table[(table["source"] == "search") & (table["feasible"] == True)].sort_values("rank")  # noqa: E712
    best, rest = ranked.head(2), ranked.iloc[2:]
    fresh = best[~best["trial"].isin(distilled_before)]
    assert len(fresh) and (fresh["distill_steps"] == 2).all() and fresh["distill_error"].isna().all()
    assert (best["distilled_ppl"] > 1).all() and (fresh["distilled_kl"] >= 0).all() and (fresh["distill_s"] > 0).all()
    assert best["distilled_ppl"].ne(best["ppl"]).all()  # the model changed; the trial's own numbers stay
    assert rest.loc[~rest["trial"].isin(distilled_before), "distilled_ppl"].isna().all()
    again = resume("e2e", done, options)  # the study's spec now says --distill-top 2: nothing left to distill
    assert again.set_index("trial")["distill_s"].dropna().to_dict() == table.set_index("trial")["distill_s"].dropna().to_dict()
    distilled = pd.read_parquet(results / "e2e" / "trials.parquet")["distilled_ppl"].notna().sum()
    assert distilled == len(distilled_before | set(best["trial"]))


def test_the_student_path_distills_the_best_structured_plan_for_longer(tiny_model_dir, ray_session, tmp_path):
    """`--students 1 --student-steps 3` beside `--distill-top 1 --distill-steps 2`: the best feasible plan
    that removes MLP channels is distilled for 3 steps, the best plan for 2 (3 if it is that plan)."""
    options = RunOptions(results_dir=tmp_path / "results", workers=2, cache_dir=tmp_path / "cache")
    spec = tiny_spec(tiny_model_dir, "students", space="quant", granularity="model", bits=(4, 16), group_sizes=(32,),
                     channel_fractions=(1.0, 0.5), distill_top=1, distill_steps=2, students=1, student_steps=3,
                     max_ppl_ratio=None)
    table = submit(spec, 6, options)
    ranked = table[(table["source"] == "search") & (table["feasible"] == True)].sort_values("rank")  # noqa: E712
    is_student = ranked["plan_json"].map(lambda text: any(lp.is_structured for lp in Plan.from_json(text).layers.values()))
    assert is_student.any() and not is_student.all()
    student, best = ranked[is_student].iloc[0], ranked.iloc[0]
    assert student["distill_steps"] == 3 and student["distilled_ppl"] > 1 and pd.isna(student["distill_error"])
    assert best["distill_steps"] == (3 if best["trial"] == student["trial"] else 2)
    assert ranked["distilled_ppl"].notna().sum() == (1 if best["trial"] == student["trial"] else 2)


def test_a_study_offered_shared_bases_measures_and_exports_them(tiny_model_dir, ray_session, tmp_path):
    """`--share-blocks 1,2`: the uniform seeds include plans whose blocks share their bases; such a trial's
    bytes count each basis once, and its exported checkpoint reproduces the trial's perplexity."""
    from compsearch.compress import plan_nbytes
    from compsearch.search.models import load_model
    from compsearch.spaces.layers import count_params, linear_layers

    options = RunOptions(results_dir=tmp_path / "results", workers=2, cache_dir=tmp_path / "cache")
    spec = tiny_spec(tiny_model_dir, "shared", space="lowrank-methods", rank_fractions=(1.0, 0.5),
                     lowrank_methods=("whiten",), share_blocks=(1, 2), max_ppl_ratio=None)
    trials = submit(spec, 4, options)
    plans = trials["plan_json"].map(Plan.from_json)
    shared = trials[plans.map(lambda plan: bool(plan.shared_bases()))]
    assert len(shared) >= 1 and (shared["state"] == "COMPLETE").all()
    model = load_model(str(tiny_model_dir))
    layers, total = linear_layers(model), count_params(model)
    for _, row in trials.iterrows():
        assert row["memory_bytes"] == plan_nbytes(layers, Plan.from_json(row["plan_json"]), total)
    summary = export("shared", int(shared["rank"].min()), tmp_path / "export", options, checkpoint=True, verify=True)
    assert Plan.from_json((tmp_path / "export" / "plan.json").read_text()).shared_bases()
    assert math.isclose(summary["checkpoint_ppl"], summary["metrics"]["ppl"], rel_tol=1e-5) and summary["verified"]
