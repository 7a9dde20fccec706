"""Fuzzing the submit command line (hypothesis): whatever the flags, the job is either valid (the spec,
the model's layers, the data windows, the sampler are all built) or refused with one clear line (exit 2);
never a traceback.

The examples are the same on every run (CI must not fail by chance); to explore new ones, run
`COMPSEARCH_FUZZ_EXAMPLES=3000 python -m pytest tests/search/test_fuzz_cli.py -m slow -s`."""
import io
import os
import re
from contextlib import redirect_stderr

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compsearch.search.cli import job_spec, parse_args
from compsearch.search.errors import UserError
from compsearch.search.job import prepare_job
from compsearch.search.study import make_sampler

HOSTILE = st.one_of(
    st.sampled_from(["", "0", "-1", "1e99B", "nan", "inf", "-inf", "60MB", "0.5", "2:4", "4,7", ",", "../x", "1" * 30,
                     "ppl,ppl", "task_x_acc", "0x10", "½", "4 ,8", "None", "true"]),
    st.text(alphabet=st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=12),
    st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
)
FLAGS = {  # each flag's usual values, mixed with hostile ones
    "--space": st.sampled_from(["joint", "quant", "sparse", "gguf", "vllm", "sota"]),
    "--granularity": st.sampled_from(["block", "layer", "type", "model"]),
    "--bits": st.sampled_from(["2,4", "4,8,16", "3", "16"]),
    "--group-sizes": st.sampled_from(["64", "32,128", "128"]),
    "--sparsity": st.sampled_from(["0,0.5", "2:4", "0,0.25,4:8"]),
    "--prune-methods": st.sampled_from(["wanda", "magnitude,sparsegpt"]),
    "--ranks": st.sampled_from(["1,0.5", "0.25"]),
    "--quant-methods": st.sampled_from(["rtn", "gptq,hqq", "q4_k,q8_0", "f16,q4_0"]),
    "--lowrank-methods": st.sampled_from(["svd", "whiten"]),
    "--mlp-channels": st.sampled_from(["1,0.75", "0.5"]),
    "--attention-heads": st.sampled_from(["1,0.5"]),
    "--objectives": st.sampled_from(["ppl,memory", "kl,memory,latency", "ppl"]),
    "--memory-budget": st.sampled_from(["0.5", "60MB", "1GiB", "35%"]),
    "--latency-budget": st.sampled_from(["25", "0.5"]),
    "--max-quality-loss": st.sampled_from(["3", "1.5x", "none", "1", "0.5"]),
    "--sampler": st.sampled_from(["nsga2", "tpe", "random"]),
    "--seed": st.integers(0, 2**40).map(str),
    "--population-size": st.integers(-3, 50).map(str),
    "--seq-len": st.integers(-3, 5000).map(str),
    "--eval-windows": st.integers(-3, 5000).map(str),
    "--calib-windows": st.integers(-3, 64).map(str),
    "--batch-size": st.integers(-3, 64).map(str),
    "--tasks-on": st.sampled_from(["all", "pareto"]),
    "--task-limit": st.integers(-3, 10).map(str),
    "--decode-tokens": st.integers(-3, 10).map(str),
    "--kl-top-k": st.integers(-3, 2000).map(str),
    "--runtime": st.sampled_from(["torch", "llamacpp"]),
    "--study": st.sampled_from(["ok", "a.b-c_d", "x" * 101, "../up", "name\n", ".hidden"]),
}
ARGV = st.dictionaries(st.sampled_from(sorted(FLAGS)), st.none(), max_size=6).flatmap(
    lambda chosen: st.fixed_dictionaries({flag: st.one_of(FLAGS[flag], FLAGS[flag], HOSTILE) for flag in chosen}))
OUTCOMES: dict[str, int] = {}  # "valid" and each distinct refusal (quoted values elided): how often, printed at the end


def _outcome(tiny_model_dir, tmp_path, flags: dict[str, str]) -> str:
    """'valid', or the line the CLI prints (argparse's own errors exit 2 with a usage line first)."""
    argv = ["submit", "--study", "fuzz", "--trials", "4", "--model", str(tiny_model_dir),
            *[f"{flag}={value}" for flag, value in flags.items()]]
    stderr = io.StringIO()
    try:
        with redirect_stderr(stderr):
            spec = job_spec(parse_args(argv))
        prepare_job(spec, tmp_path)
        make_sampler(spec)  # what create_study builds next
        return "valid"
    except SystemExit as exit_:
        assert exit_.code == 2
        return stderr.getvalue().strip().splitlines()[-1]
    except UserError as err:
        return f"compsearch: error: {err}"


@pytest.mark.slow
@settings(max_examples=int(os.environ.get("COMPSEARCH_FUZZ_EXAMPLES", 200)),
          derandomize="COMPSEARCH_FUZZ_EXAMPLES" not in os.environ, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=ARGV)
def test_any_submit_flags_give_a_valid_job_or_one_clear_line(tiny_model_dir, tmp_path, flags):
    outcome = _outcome(tiny_model_dir, tmp_path, flags)
    assert "\n" not in outcome and outcome.strip(), outcome
    if outcome != "valid":
        assert outcome.startswith(("compsearch: error: ", "compsearch submit: error: ")), outcome
        outcome = re.sub(r"'[^']*'|\d[\d.e+]*", "_", outcome.split("error: ", 1)[1])[:90]
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


@pytest.mark.slow
def test_the_fuzzing_saw_valid_jobs_and_many_refusals():
    refusals = sorted((count, text) for text, count in OUTCOMES.items() if text != "valid")
    print(f"\n{sum(OUTCOMES.values())} examples: {OUTCOMES.get('valid', 0)} valid jobs, "
          f"{len(refusals)} distinct refusals:\n  " + "\n  ".join(f"{count:3d} {text}" for count, text in refusals[::-1]))
    assert OUTCOMES.get("valid", 0) > 0 and len(refusals) >= 10
