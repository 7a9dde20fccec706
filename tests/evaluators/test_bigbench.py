"""BIG-bench JSON -> lm-eval task, checked against prompts and targets written out by hand."""
import json

import pytest

from compsearch.evaluators.bigbench import TaskError, convert_task, format_example, task_files

# Four examples: a plain one, two equally best answers (the first of them is the target), a generative
# example (no target_scores: skipped), and graded scores (the highest wins).
TINY_TASK = {
    "name": "tiny order!",
    "description": "hand-checked",
    "task_prefix": "Answer the question.\n",
    "metrics": ["multiple_choice_grade"],
    "examples": [
        {"input": "Pick a", "target_scores": {"a": 1, "b": 0}},
        {"input": "Two right", "target_scores": {"x": 0.5, "y": 1, "z": 1}},
        {"input": "Say something", "target": "free text"},
        {"input": "Graded", "target_scores": {"p": 0, "q": 0.25, "r": 0.75}},
    ],
}
EXPECTED = [
    ("Answer the question.\n\nQ: Pick a\n  choice: a\n  choice: b\nA:", ["a", "b"], 0),
    ("Answer the question.\n\nQ: Two right\n  choice: x\n  choice: y\n  choice: z\nA:", ["x", "y", "z"], 1),
    ("Answer the question.\n\nQ: Graded\n  choice: p\n  choice: q\n  choice: r\nA:", ["p", "q", "r"], 2),
]


def write_task(folder, task=TINY_TASK, name="tiny.json"):
    path = folder / name
    path.write_text(json.dumps(task))
    return path


def test_conversion_matches_the_hand_checked_prompts(tmp_path):
    converted = convert_task(write_task(tmp_path), tmp_path / "out")
    assert converted.name == "bigbench_tiny_order" and converted.examples == 3 and converted.skipped == 1
    rows = [json.loads(line) for line in converted.data_path.read_text().splitlines()]
    assert [(r["query"], r["choices"], r["gold"]) for r in rows] == EXPECTED
    config = json.loads(converted.yaml_path.read_text())  # JSON is YAML
    assert config["task"] == "bigbench_tiny_order" and config["output_type"] == "multiple_choice"
    data_file = config["dataset_kwargs"]["data_files"]["test"]
    assert data_file == str(converted.data_path) and data_file.startswith("/")


def test_custom_prefixes_and_choices_not_appended():
    task = {"example_input_prefix": "Input: ", "example_output_prefix": "\nOutput: ", "append_choices_to_input": False}
    assert format_example({"input": "2+2?", "target_scores": {"3": 0, "4": 1}}, task) == ("Input: 2+2?\nOutput:", ["3", "4"], 1)
    assert format_example({"input": "x", "target": "y"}, task) is None


def test_limit_folders_and_errors(tmp_path):
    assert convert_task(write_task(tmp_path), tmp_path / "out", limit=2).examples == 2
    write_task(tmp_path, name="second.json")
    assert [p.name for p in task_files(f"bigbench:{tmp_path}")] == ["second.json", "tiny.json"]
    with pytest.raises(TaskError, match="no such file"):
        task_files(f"bigbench:{tmp_path / 'missing.json'}")
    generative = write_task(tmp_path, {"examples": [{"input": "a", "target": "b"}]}, "gen.json")
    with pytest.raises(TaskError, match="not a multiple-choice"):
        convert_task(generative, tmp_path / "out")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TaskError, match="cannot read it as JSON"):
        convert_task(tmp_path / "bad.json", tmp_path / "out")


def test_every_shared_bigbench_file_converts(tmp_path):
    from pathlib import Path

    folder = Path(__file__).resolve().parents[3] / "shared" / "data" / "bigbench"
    if not folder.is_dir():
        pytest.skip("no ../shared/data/bigbench here")
    for path in sorted(folder.glob("*.json")):
        converted = convert_task(path, tmp_path, limit=5)
        assert converted.examples == 5, path.name
