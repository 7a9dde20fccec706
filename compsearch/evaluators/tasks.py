"""lm-eval task scoring of a model held in memory: hub task names, task folders, BIG-bench JSON files."""
from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from compsearch.evaluators.bigbench import BIGBENCH_PREFIX, TaskError, conversion_dir, convert_task, task_files

log = logging.getLogger(__name__)
_COLUMN_CHARS = re.compile(r"[^A-Za-z0-9_]+")
_TASK_LINE = re.compile(r"""^\s*["']?(?:task|group)["']?\s*:\s*["']?([^"'\s,]+)""", re.MULTILINE)  # YAML or JSON


@dataclass
class TaskSuite:
    """The tasks a study scores: lm-eval names, BIG-bench files (converted once) and the user's task folders.

    `limit` keeps the first `limit` examples of every task (None: all of them).
    """

    tasks: tuple[str, ...] = ()
    task_paths: tuple[str, ...] = ()
    limit: int | None = None
    cache_dir: Path | None = None
    names: list[str] = field(init=False, default_factory=list)
    include_paths: list[str] = field(init=False, default_factory=list)
    uses_hub: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        for folder in self.task_paths:
            if not Path(folder).is_dir():
                raise TaskError(f"--task-path {folder}: no such folder; give a folder of lm-eval task YAML files")
            self.include_paths.append(str(Path(folder).resolve()))
        cache_root = Path(self.cache_dir or os.environ.get("COMPSEARCH_CACHE", tempfile.gettempdir()))
        for task in self.tasks:
            if task.startswith(BIGBENCH_PREFIX):
                files = task_files(task)
                out_dir = conversion_dir(cache_root, files, self.limit)
                for path in files:
                    converted = convert_task(path, out_dir, self.limit)
                    log.info("bigbench %s -> task %s (%d examples, %d skipped)", path, converted.name,
                             converted.examples, converted.skipped)
                    self.names.append(converted.name)
                if str(out_dir) not in self.include_paths:
                    self.include_paths.append(str(out_dir))
            else:
                self.names.append(task)
                # A task of the user's folders needs no built-in index (5-7 s to build); any other name does.
                self.uses_hub = self.uses_hub or task not in local_task_names(self.include_paths)

    def task_manager(self):
        """An lm-eval TaskManager that knows the local tasks (and the built-in ones only when needed)."""
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=self.include_paths or None, include_defaults=self.uses_hub)
        unknown = [name for name in self.names if name not in manager.all_tasks]
        if unknown:
            where = "the built-in tasks or " if self.uses_hub else ""
            raise TaskError(f"--tasks {','.join(unknown)}: not found in {where}{self.include_paths or 'any folder'}; "
                            "check the name (`lm-eval ls tasks`), or give --task-path DIR / bigbench:PATH.json")
        return manager


def local_task_names(folders: list[str]) -> set[str]:
    """Task and group names defined by the YAML files under `folders` (read as text, as a quick index)."""
    names = set()
    for folder in folders:
        for path in Path(folder).rglob("*.yaml"):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            names.update(_TASK_LINE.findall(text))
    return names


def score_tasks(model: nn.Module, tokenizer, suite: TaskSuite, batch_size: int = 8, manager=None) -> dict[str, float]:
    """`task_<name>_<metric>` for every task of `suite`, with `model` passed to lm-eval as an object."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(suite.names), task_manager=manager or suite.task_manager(),
                                      limit=suite.limit, log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    return task_metrics(results["results"])


def task_metrics(results: dict[str, dict]) -> dict[str, float]:
    """Flatten lm-eval's per-task results into columns; standard errors and non-numbers are left out."""
    metrics = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            if not comma or "_stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            suffix = "" if filter_name in ("", "none") else f"_{filter_name}"
            metrics[task_column(task, metric + suffix)] = float(value) if math.isfinite(value) else math.nan
    return metrics


def task_column(task: str, metric: str = "acc") -> str:
    """The trial column of a task metric: `task_<task>_<metric>` with only letters, digits and '_'."""
    return "task_" + _COLUMN_CHARS.sub("_", f"{task}_{metric}").strip("_").lower()
