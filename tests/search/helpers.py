"""Small builders shared by the search tests."""
from pathlib import Path

import psutil

from compsearch.search.spec import JobSpec

TINY_RUN = dict(seq_len=32, eval_windows=4, calib_windows=4, batch_size=4, population_size=4)


def tiny_spec(model_dir: Path, study: str = "tiny", **overrides) -> JobSpec:
    fields = {"model": str(model_dir), "space": "joint", "granularity": "block", **TINY_RUN, **overrides}
    return JobSpec(study=study, **fields)


def cli_args(model_dir: Path, results: Path, study: str, trials: int, *extra: str) -> list[str]:
    return ["submit", "--study", study, "--model", str(model_dir), "--results-dir", str(results),
            "--trials", str(trials), "--seq-len", "32", "--eval-windows", "4", "--calib-windows", "4",
            "--population-size", "4", *extra]


def ray_actor_processes(root: psutil.Process, title: str) -> list[psutil.Process]:
    """`root`'s descendants whose Ray process title starts with `title` (`ray::Class`, or `ray::Class.method`
    while it runs that method)."""
    found = []
    for child in root.children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith(title):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found
