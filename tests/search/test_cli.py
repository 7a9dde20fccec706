"""The CLI: every bad input is one clear line on stderr and exit code 2, and no existing study is damaged."""
import json
import logging
import sqlite3
import sys

import pandas as pd
import pytest
import torch

from compsearch.compress.matrix import MatrixLayout, MatrixStats, compress_matrix
from compsearch.compress.variants import VariantStore
from compsearch.search.cli import main, not_caused_by_interrupt
from compsearch.search.study import default_storage_url, open_storage, study_exists
from compsearch.spaces.plan import LayerPlan
from tests.search.helpers import cli_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def existing(tiny_model_dir, ray_session, tmp_path_factory):
    results = tmp_path_factory.mktemp("cli")
    assert main(cli_args(tiny_model_dir, results, "kept", 3, "--space", "quant")) == 0
    return results


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compsearch: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("extra, fragment", [
    (["--model", "/no/such/model"], "'/no/such/model' is neither a local model folder"),
    (["--space", "everything"], "space 'everything' is unknown"),
    (["--sampler", "cmaes"], "sampler 'cmaes' is unknown"),
    (["--objectives", "ppl,speed"], "'ppl,speed' are not valid"),
    (["--memory-budget", "1KB"], "is below the smallest plan in space 'quant-sparse'"),
    (["--memory-budget", "12"], "has no unit"),
    (["--data", "/no/such/file.txt"], "no such file or folder"),
    (["--bits", "4,7"], "bits 7 is not supported"),
    (["--trials", "0"], "--trials 0"),
    (["--workers", "100"], "needs 100 CPUs; this machine has"),
    (["--distill-top", "3", "--distill-steps", "0"], "--distill-top 3 --distill-steps 0"),
    (["--students", "2"], "space 'quant-sparse' removes neither: offer some (--mlp-channels 1,0.75"),
    (["--students", "1", "--student-steps", "0", "--space", "structured"], "--students 1 --student-steps 0"),
    (["--share-blocks", "1,5"], "blocks sharing a basis 5 is not supported"),
])
def test_bad_submit_inputs(tiny_model_dir, tmp_path, capsys, extra, fragment):
    argv = cli_args(tiny_model_dir, tmp_path, "bad", 2) + extra  # a later --model overrides the first
    err = _error(capsys, argv)
    assert fragment in err
    assert not (tmp_path / "bad" / "study.db").exists()  # nothing was created


def test_an_unreachable_latency_budget_is_refused_before_any_trial(tiny_model_dir, ray_session, tmp_path, capsys):
    err = _error(capsys, cli_args(tiny_model_dir, tmp_path, "fast", 2, "--latency-budget", "0.001"))
    assert "latency budget 0.001 ms is out of reach: the fastest plan of space 'quant-sparse' is predicted at" in err
    assert not study_exists(open_storage(default_storage_url(tmp_path, "fast")), "fast")  # a new submit may use the name
    assert main(cli_args(tiny_model_dir, tmp_path, "fast", 1, "--latency-budget", "10000", "--latency-repeats", "1")) == 0


def test_unwritable_results_folder(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "is not writable" in _error(capsys, cli_args(tiny_model_dir, blocker / "results", "s", 2))


def test_existing_study_is_refused_and_untouched(tiny_model_dir, existing, capsys):
    before = pd.read_parquet(existing / "kept" / "trials.parquet")
    same = _error(capsys, cli_args(tiny_model_dir, existing, "kept", 3, "--space", "quant"))
    assert "already exists; continue it with `compsearch resume" in same
    changed = _error(capsys, cli_args(tiny_model_dir, existing, "kept", 3, "--space", "sparse"))
    assert "already exists with a different spec (space: 'quant' -> 'sparse')" in changed
    after = pd.read_parquet(existing / "kept" / "trials.parquet")
    pd.testing.assert_frame_equal(before, after)


def test_force_replaces_a_study(tiny_model_dir, existing, capsys):
    assert main(cli_args(tiny_model_dir, existing, "kept", 2, "--space", "sparse", "--force")) == 0
    table = pd.read_parquet(existing / "kept" / "trials.parquet")
    sparse = table["plan_json"].map(lambda text: any(lp["sparsity"] > 0 for lp in json.loads(text)["layers"].values()))
    assert len(table) == 2 and sparse.all()


def test_read_commands(existing, capsys, tmp_path):
    assert main(["status", "--study", "kept", "--results-dir", str(existing)]) == 0
    assert "trials done" in capsys.readouterr().out
    assert main(["leaderboard", "--study", "kept", "--results-dir", str(existing), "--top", "2"]) == 0
    assert "rank" in capsys.readouterr().out
    assert "--rank 99 does not exist" in _error(
        capsys, ["export", "--study", "kept", "--results-dir", str(existing), "--rank", "99", "--out", str(tmp_path)])
    export = ["export", "--study", "kept", "--results-dir", str(existing), "--out", str(tmp_path)]
    assert "add --checkpoint" in _error(capsys, export + ["--distill-steps", "5"])
    assert "steps >= 1" in _error(capsys, export + ["--checkpoint", "--distill-steps", "-2"])
    assert "use it with --format gguf" in _error(capsys, export + ["--front"])
    assert "no study 'ghost'" in _error(capsys, ["status", "--study", "ghost", "--results-dir", str(existing)])
    assert "no study 'ghost'" in _error(
        capsys, ["resume", "--study", "ghost", "--results-dir", str(existing), "--trials", "3"])
    assert "--top 0: give how many rows" in _error(
        capsys, ["leaderboard", "--study", "kept", "--results-dir", str(existing), "--top", "0"])
    assert "trials done already; --trials is the total to reach" in _error(
        capsys, ["resume", "--study", "kept", "--results-dir", str(existing), "--trials", "1"])


def test_only_errors_that_follow_a_ctrl_c_are_kept_out_of_the_log():
    def close_after_interrupt():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")

    def record(error_call) -> logging.LogRecord:
        try:
            error_call()
        except Exception:
            exc_info = sys.exc_info()
        return logging.LogRecord("sqlalchemy.pool.impl.QueuePool", logging.ERROR, __file__, 1, "Error closing cursor",
                                 None, exc_info)

    def closed_database():
        raise sqlite3.ProgrammingError("Cannot operate on a closed database.")

    assert not not_caused_by_interrupt(record(close_after_interrupt))
    assert not_caused_by_interrupt(record(closed_database))
    assert not_caused_by_interrupt(logging.LogRecord("compsearch", logging.WARNING, __file__, 1, "note", None, None))


def test_cache_says_what_it_holds_and_clears_the_variants(tmp_path, capsys):
    weight = torch.randn(16, 64)
    plans = [LayerPlan(bits=3, group_size=32, quant_method="hqq"), LayerPlan(bits=4, group_size=32, quant_method="hqq")]
    store = VariantStore(tmp_path / "variants" / "model-data-cpu-v5", 2**30)
    for index, plan in enumerate(plans):
        layout = MatrixLayout(f"layers.{index}.weight", 16, 64, 16 * 64, plan.bits, plan.group_size, plan.quant_method)
        for key in ("a.weight", "b.weight"):
            store.put(key, plan, compress_matrix(weight, layout, plan, MatrixStats()))
    assert main(["cache", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "variants/: 4 files" in out and "variants/model-data-cpu-v5" in out
    assert "bits=3 group_size=32 quant_method=hqq: 2 matrices" in out
    assert "bits=4 group_size=32 quant_method=hqq: 2 matrices" in out
    assert main(["cache", "--cache-dir", str(tmp_path), "--clear-variants"]) == 0
    assert "removed 1 variant folder(s)" in capsys.readouterr().out and not (tmp_path / "variants").exists()
