"""Small builders shared by the search tests."""
from pathlib import Path

from compsearch.search.spec import JobSpec

TINY_RUN = dict(seq_len=32, eval_windows=4, calib_windows=4, batch_size=4, population_size=4)


def tiny_spec(model_dir: Path, study: str = "tiny", **overrides) -> JobSpec:
    fields = {"model": str(model_dir), "space": "joint", "granularity": "block", **TINY_RUN, **overrides}
    return JobSpec(study=study, **fields)


def cli_args(model_dir: Path, results: Path, study: str, trials: int, *extra: str) -> list[str]:
    return ["submit", "--study", study, "--model", str(model_dir), "--results-dir", str(results),
            "--trials", str(trials), "--seq-len", "32", "--eval-windows", "4", "--calib-windows", "4",
            "--population-size", "4", *extra]
