"""lm-eval on the tiny model, passed as an object: accuracy equals scoring the choices by hand."""
import pytest
import torch

from compsearch.evaluators.tasks import TaskSuite, local_task_names, score_tasks, task_column, task_metrics
from compsearch.search.models import load_model, load_tokenizer
from tests.evaluators.test_bigbench import EXPECTED, write_task


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def choice_log_likelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), tokenized the way lm-eval's HFLM does it."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    continuation_ids = whole[len(context_ids):]
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        log_probs = model(ids).logits.log_softmax(-1)[0, len(context_ids) - 1:-1]
    return log_probs.gather(1, torch.tensor(continuation_ids).unsqueeze(1)).sum().item()


def test_bigbench_accuracy_matches_hand_scoring(tiny, tmp_path):
    model, tokenizer = tiny
    suite = TaskSuite(tasks=(f"bigbench:{write_task(tmp_path)}",), cache_dir=tmp_path / "cache")
    assert suite.names == ["bigbench_tiny_order"] and not suite.uses_hub
    metrics = score_tasks(model, tokenizer, suite, batch_size=2)
    correct = 0
    for prompt, choices, gold in EXPECTED:
        scores = [choice_log_likelihood(model, tokenizer, prompt, " " + choice) for choice in choices]
        correct += scores.index(max(scores)) == gold
    assert metrics["task_bigbench_tiny_order_acc"] == pytest.approx(correct / len(EXPECTED))
    assert 0.0 <= metrics["task_bigbench_tiny_order_acc_norm"] <= 1.0


def test_user_task_folder_needs_no_builtin_index(tiny, tmp_path):
    model, tokenizer = tiny
    converted = TaskSuite(tasks=(f"bigbench:{write_task(tmp_path)}",), cache_dir=tmp_path / "cache")
    user = tmp_path / "my_tasks"
    user.mkdir()
    yaml_text = open(f"{converted.include_paths[0]}/bigbench_tiny_order.yaml").read()
    (user / "mine.yaml").write_text(yaml_text.replace('"bigbench_tiny_order"', '"my_task"'))
    assert local_task_names([str(user)]) == {"my_task"}
    suite = TaskSuite(tasks=("my_task",), task_paths=(str(user),))
    assert not suite.uses_hub
    metrics = score_tasks(model, tokenizer, suite, batch_size=4)
    assert metrics["task_my_task_acc"] == score_tasks(model, tokenizer, converted)["task_bigbench_tiny_order_acc"]


def test_metric_columns():
    results = {"bigbench_x": {"alias": "x", "acc,none": 0.5, "acc_stderr,none": "N/A", "acc_norm,none": 0.25,
                              "sample_len": 4}}
    assert task_metrics(results) == {"task_bigbench_x_acc": 0.5, "task_bigbench_x_acc_norm": 0.25}
    assert task_column("mmlu-pro", "exact_match,strict") == "task_mmlu_pro_exact_match_strict"
