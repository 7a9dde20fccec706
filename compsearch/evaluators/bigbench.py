"""BIG-bench JSON task files turned into lm-eval multiple-choice tasks (a YAML file and a JSONL data file).

BIG-bench's own prompt format is kept: `task_prefix`, then `example_input_prefix` (default "\\nQ: "),
the input, the choices appended when `append_choices_to_input` (default true) as "\\n  choice: X", and
`example_output_prefix` (default "\\nA: "). Each choice is scored by its log-likelihood after the
prompt. Where several choices score highest in `target_scores`, the first of them (in file order) is
the target; examples without `target_scores` (generative ones) are skipped.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

BIGBENCH_PREFIX = "bigbench:"
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_]+")


class TaskError(ValueError):
    """A task name, task folder or task file that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class ConvertedTask:
    """One BIG-bench file as an lm-eval task: its name, YAML and data file, and how many examples it kept."""

    name: str
    yaml_path: Path
    data_path: Path
    examples: int
    skipped: int


def task_name_for(path: Path, data: dict) -> str:
    """The lm-eval task name of a BIG-bench file: `bigbench_<name>` from its `name` field or file stem."""
    raw = str(data.get("name") or path.stem)
    return "bigbench_" + _NAME_CHARS.sub("_", raw).strip("_").lower()


def format_example(example: dict, task: dict) -> tuple[str, list[str], int] | None:
    """(prompt, choices, index of the target) for one example, or None when it has no `target_scores`."""
    scores = example.get("target_scores")
    if not isinstance(scores, dict) or not scores:
        return None
    choices = [str(choice) for choice in scores]
    values = [float(value) for value in scores.values()]
    gold = values.index(max(values))
    input_prefix = task.get("example_input_prefix", "\nQ: ")
    output_prefix = task.get("example_output_prefix", "\nA: ")
    text = str(example["input"])
    if task.get("append_choices_to_input", True):
        choice_prefix = task.get("choice_prefix", "\n  choice: ")
        text += choice_prefix + choice_prefix.join(choices)
    prompt = task.get("task_prefix", "") + input_prefix + text + output_prefix
    # lm-eval joins prompt and choice with one space (target_delimiter); BIG-bench's "\nA: " ends in it.
    return prompt.rstrip(" "), choices, gold


def read_task_file(path: Path) -> dict:
    """A BIG-bench task as a dict, with an error that names the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TaskError(f"bigbench task {path}: cannot read it as JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise TaskError(f"bigbench task {path}: not a BIG-bench task file (it needs an 'examples' list)")
    return data


def convert_task(path: Path, out_dir: Path, limit: int | None = None) -> ConvertedTask:
    """Write `<name>.yaml` and `<name>.jsonl` for the BIG-bench file `path` into `out_dir`.

    `limit` keeps the first `limit` multiple-choice examples. The data path in the YAML is absolute,
    since lm-eval resolves relative `data_files` against the working directory.
    """
    path = Path(path).resolve()
    data = read_task_file(path)
    name = task_name_for(path, data)
    rows, skipped = [], 0
    for example in data["examples"]:
        formatted = format_example(example, data)
        if formatted is None:
            skipped += 1
            continue
        prompt, choices, gold = formatted
        rows.append({"query": prompt, "choices": choices, "gold": gold})
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise TaskError(f"bigbench task {path}: no example has 'target_scores', so it is not a multiple-choice "
                        "task; only multiple-choice BIG-bench tasks can be scored")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_path = out_dir / f"{name}.jsonl"
    data_path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    yaml_path = out_dir / f"{name}.yaml"
    yaml_path.write_text(_task_yaml(name, data_path), encoding="utf-8")
    return ConvertedTask(name, yaml_path, data_path, len(rows), skipped)


def _task_yaml(name: str, data_path: Path) -> str:
    # JSON is valid YAML: no quoting rules to get wrong for odd paths or names.
    config = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_path)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}", "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return json.dumps(config, indent=1, ensure_ascii=False) + "\n"


def task_files(target: str) -> list[Path]:
    """The BIG-bench JSON files named by `bigbench:PATH` (a file, or every *.json in a folder)."""
    path = Path(target[len(BIGBENCH_PREFIX):] if target.startswith(BIGBENCH_PREFIX) else target).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise TaskError(f"--tasks {target}: the folder has no .json task files")
        return files
    if not path.is_file():
        raise TaskError(f"--tasks {target}: no such file or folder; give bigbench:PATH.json or bigbench:FOLDER")
    return [path]


def conversion_dir(cache_root: Path, files: list[Path], limit: int | None) -> Path:
    """A cache folder keyed by the files' contents and the limit, so a changed file is converted again."""
    digest = hashlib.sha256(str(limit).encode())
    for path in files:
        digest.update(Path(path).read_bytes())
    return Path(cache_root) / "bigbench" / digest.hexdigest()[:16]
