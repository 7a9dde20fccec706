"""A study in the vllm space end to end: its best plan exported as a compressed-tensors checkpoint that
transformers loads and scores as the trial did."""
import json

import pytest

from compsearch.search.cli import main
from compsearch.search.commands import RunOptions, submit
from tests.search.helpers import tiny_spec

pytestmark = pytest.mark.slow


def test_the_best_plan_exports_as_a_checkpoint_transformers_scores_like_the_trial(tiny_wide_dir, ray_session,
                                                                                  tmp_path, capsys):
    results = tmp_path / "results"
    spec = tiny_spec(tiny_wide_dir, "vllm", space="vllm", granularity="layer")
    trials = submit(spec, 4, RunOptions(results_dir=results, workers=2, cache_dir=tmp_path / "cache"))
    assert (trials["state"] == "COMPLETE").sum() == 4
    out = tmp_path / "checkpoint"
    argv = ["export", "--study", "vllm", "--results-dir", str(results), "--cache-dir", str(tmp_path / "cache"),
            "--format", "compressed-tensors", "--out", str(out), "--verify"]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "export.json").read_text())
    assert summary["verified"] and summary["verify_gap"] < 1e-3
    assert summary["plan_bytes"] <= summary["checkpoint_bytes"] < summary["plan_bytes"] * 1.01 + 64 * 1024
    assert "reloaded checkpoint ppl" in capsys.readouterr().out
    assert main(argv) == 2  # the folder has files now: --force writes over them
    assert "pass --force" in capsys.readouterr().err
