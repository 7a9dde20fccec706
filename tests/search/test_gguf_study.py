"""A study in the gguf space end to end: plans of GGUF types, each timed as a .gguf file in llama.cpp,
its memory the file's bytes; the chosen plan exported as a file llama.cpp scores as the trial did."""
import gguf
import numpy as np
import pandas as pd
import pytest

from compsearch.evaluators.llamacpp import llamacpp_available
from compsearch.search.commands import RunOptions, evaluate, export, export_front, submit
from compsearch.search.errors import UserError
from compsearch.search.evaluate import Reference
from tests.search.helpers import tiny_spec

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not llamacpp_available(), reason="llama-cpp-python is not installed (./install.sh --with-llamacpp)")]


@pytest.fixture(scope="module")
def gguf_study(tiny_wide_dir, ray_session, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    spec = tiny_spec(tiny_wide_dir, "gguf", space="gguf", objectives=("ppl", "memory", "latency"),
                     latency_repeats=2, decode_tokens=4, latency_prompt_tokens=16)
    options = RunOptions(results_dir=results, workers=2, cache_dir=tmp_path_factory.mktemp("cache"))
    return submit(spec, 6, options), options


def test_every_trial_is_a_gguf_file_timed_in_llama_cpp(gguf_study):
    trials, _ = gguf_study
    done = trials[trials["state"] == "COMPLETE"]
    assert len(done) == 6
    assert done["latency_runtime"].str.startswith("llama.cpp").all() and (done["latency_kernel"] == "real").all()
    assert (done["gguf_file_bytes"] == done["memory_bytes"]).all()  # the plan's bytes are the file's bytes
    assert done["latency_ms"].gt(0).all() and done["decode_ms"].gt(0).all()
    # predicted before running, by the cost model fitted to llama.cpp's timings of each type
    assert done["predicted_latency_ms"].gt(0).all() and done["predicted_decode_ms"].gt(0).all()


def test_the_exported_file_is_the_trial(gguf_study, tmp_path):
    trials, options = gguf_study
    out = tmp_path / "best.gguf"
    summary = export("gguf", 1, out, options, verify=True, export_format="gguf")
    best = trials[trials["rank"] == 1].iloc[0]
    assert out.stat().st_size == best["memory_bytes"] == summary["file_bytes"]
    assert abs(summary["llamacpp_ppl"] - best["ppl"]) / best["ppl"] < 0.01
    types = tmp_path / "types.txt"
    export("gguf", 1, types, options, export_format="llama-quantize")
    assert all("=" in line for line in types.read_text().splitlines())
    assert isinstance(pd.read_parquet(options.results_dir / "gguf" / "layers.parquet"), pd.DataFrame)


def test_the_whole_front_exports_as_files(gguf_study, tmp_path):
    trials, options = gguf_study
    summaries = export_front("gguf", tmp_path / "front", options)
    front = trials[trials["on_front"] & (trials["feasible"] == True)]  # noqa: E712
    assert sorted(s["trial"] for s in summaries) == sorted(front["trial"])
    for summary in summaries:
        path = tmp_path / "front" / f"rank{summary['rank']:02d}-trial{summary['trial']:03d}.gguf"
        assert path.stat().st_size == summary["file_bytes"] == summary["metrics"]["memory_bytes"]
    assert (tmp_path / "front" / "front.json").exists()


def test_evaluate_scores_a_gguf_file_in_llama_cpp_as_its_trial(gguf_study, tmp_path):
    """A GGUF file given to `evaluate` is scored in llama.cpp on the study's windows: the exported rank-1
    file reads as its trial did; a uniform GGUF type is a reference row of the same study."""
    trials, options = gguf_study
    path = tmp_path / "rank1.gguf"
    export("gguf", 1, path, options, export_format="gguf")
    rows = evaluate([Reference("gguf", str(path)), Reference("uniform", "q8_0")], options, "gguf")
    best = trials[trials["rank"] == 1].iloc[0]
    scored = rows[rows["source"] == "gguf"].iloc[0]
    assert scored["name"] == "rank1.gguf" and scored["memory_bytes"] == path.stat().st_size == best["memory_bytes"]
    assert abs(scored["ppl"] - best["ppl"]) / best["ppl"] < 0.01 and abs(scored["kl"] - best["kl"]) < 0.01
    assert scored["latency_ms"] > 0 and str(scored["latency_runtime"]).startswith("llama.cpp")
    uniform = rows[rows["source"] == "uniform"].iloc[0]
    assert uniform["memory_bytes"] > 0 and uniform["ppl"] > 1


def test_evaluate_refuses_a_gguf_of_another_model(gguf_study, tmp_path):
    _, options = gguf_study
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(other), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((7, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="give a GGUF of the study's model"):
        evaluate([Reference("gguf", str(other))], options, "gguf")
