"""A worker's metrics for one plan: tasks, measured and predicted latency, peak memory; objectives and ranks."""
import pandas as pd
import pytest
import torch

from compsearch.evaluators.latency import LatencySettings

from compsearch.evaluators.data import load_text, make_windows
from compsearch.search.errors import UserError
from compsearch.search.models import load_tokenizer
from compsearch.evaluators.metrics import METRICS, UndeclaredMetric, check_declared
from compsearch.search.job import prepare_job
from compsearch.search.results import rank_trials, trials_columns
from compsearch.search.spec import OBJECTIVES, objective_sign
from compsearch.search.trial import TrialEvaluator, WorkerSettings
from compsearch.spaces.plan import LayerPlan, Plan
from tests.evaluators.test_bigbench import write_task
from tests.search.helpers import tiny_spec

LATENCY = {"prompt_tokens": 16, "decode_tokens": 2, "decode_batch": 2, "repeats": 2}


@pytest.fixture(scope="module")
def evaluator(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluator")
    text, source = load_text(None)
    windows = make_windows(load_tokenizer(str(tiny_model_dir)), text, source, seq_len=32, eval_windows=2, calib_windows=2)
    tasks = {"tasks": (f"bigbench:{write_task(folder)}",), "task_paths": (), "limit": None}
    settings = WorkerSettings(batch_size=0, with_kl=True, latency=LatencySettings(**LATENCY), tasks=tasks,
                              cache_dir=str(folder))
    return TrialEvaluator(str(tiny_model_dir), windows.eval_ids, windows.calib_ids, settings)


def test_trial_metrics_hold_tasks_latency_and_memory(evaluator):
    names = [n for n, m in evaluator.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    metrics = evaluator.evaluate(Plan.uniform(names, LayerPlan(bits=8)).to_json())
    assert evaluator.batch_size >= 1  # chosen from free memory
    assert 0 <= metrics["task_bigbench_tiny_order_acc"] <= 1 and metrics["kl"] >= 0
    assert metrics["latency_kernel"] == "real" and metrics["decode_ms"] > 0 and metrics["predicted_decode_ms"] > 0
    assert metrics["peak_rss_bytes"] > 50 * 2**20
    three_bit = evaluator.evaluate(Plan.uniform(names, LayerPlan(bits=3)).to_json())
    assert three_bit["latency_kernel"] == "simulated" and three_bit["latency_simulated_layers"] == len(names)
    assert evaluator.score_tasks(Plan().to_json()).keys() == {"task_bigbench_tiny_order_acc",
                                                             "task_bigbench_tiny_order_acc_norm"}


def test_cost_model_prunes_plans_far_over_the_latency_budget(evaluator):
    evaluator.latency_budget_ms = 1e-6
    try:
        metrics = evaluator.evaluate(Plan().to_json())
    finally:
        evaluator.latency_budget_ms = None
    assert "ppl" not in metrics and "predicts" in metrics["pruned"] and metrics["predicted_latency_ms"] > 0


def test_task_objectives_are_maximized(tmp_path, tiny_model_dir):
    task = f"bigbench:{write_task(tmp_path)}"
    assert OBJECTIVES["task_bigbench_tiny_order_acc"] == "task_bigbench_tiny_order_acc"
    assert objective_sign("task_bigbench_tiny_order_acc") == -1 and objective_sign("ppl") == 1
    assert objective_sign("task_wikitext_word_perplexity") == 1
    spec = tiny_spec(tiny_model_dir, objectives=("task_bigbench_tiny_order_acc", "memory"), tasks=(task,))
    with pytest.raises(UserError, match="needs tasks"):
        tiny_spec(tiny_model_dir, objectives=("task_x_acc", "memory"))
    with pytest.raises(UserError, match="tasks-on all"):
        tiny_spec(tiny_model_dir, objectives=("task_x_acc", "memory"), tasks=(task,), tasks_on="pareto")
    with pytest.raises(UserError, match="no such file"):
        tiny_spec(tiny_model_dir, tasks=("bigbench:/nonexistent.json",))
    frame = pd.DataFrame({"trial": [0, 1, 2], "source": ["search"] * 3, "state": ["COMPLETE"] * 3,
                          "on_front": [True] * 3, "feasible": [True] * 3, "task_bigbench_tiny_order_acc": [0.2, 0.9, 0.5]})
    assert rank_trials(frame, spec)["trial"].tolist() == [1, 2, 0]  # highest accuracy first


def test_a_task_objective_no_task_produces_is_refused_before_any_trial(tmp_path, tiny_model_dir):
    task = f"bigbench:{write_task(tmp_path)}"
    with pytest.raises(UserError, match="not produced by this study's tasks.*task_bigbench_tiny_order_<metric>"):
        prepare_job(tiny_spec(tiny_model_dir, objectives=("task_bigbench_other_acc", "memory"), tasks=(task,)),
                    tmp_path)


def test_undeclared_values_are_refused_and_declared_ones_reach_the_table():
    with pytest.raises(UndeclaredMetric, match="made_up_ms"):
        check_declared({"ppl": 1.0, "made_up_ms": 2.0, "task_x_acc": 0.5})
    assert {metric.name for metric in METRICS} <= set(trials_columns())
