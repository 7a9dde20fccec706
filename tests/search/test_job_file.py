"""Job files: `submit --config job.yaml` takes every flag from YAML, and the job.yaml a study writes
reads back as the same spec."""
import pytest
import yaml

from compsearch.search.cli import job_spec, parse_args
from compsearch.search.commands import RunOptions, write_job_file
from compsearch.search.errors import UserError
from compsearch.search.spec import JobSpec


def test_a_studys_job_file_reads_back_as_the_same_spec(tiny_model_dir, tmp_path):
    spec = JobSpec(study="round", model=str(tiny_model_dir), space="quant", bits=(2, 4, 8), group_sizes=(64,),
                   objectives=("ppl", "memory", "kl"), memory_budget="0.4", seq_len=32, eval_windows=4,
                   guided=False, task_paths=("tasks/a",), latency_budget_ms=25.0)
    path = write_job_file(spec, 12, RunOptions(results_dir=tmp_path, workers=2, worker_resources={"node_b": 1.0}))
    assert path == tmp_path / "round" / "job.yaml"
    args = parse_args(["submit", "--config", str(path)])
    assert job_spec(args) == spec
    assert (args.trials, args.workers, args.worker_resources) == (12, 2, {"node_b": 1.0})


def test_flags_given_win_over_the_job_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"study": "a", "trials": 8, "bits": [2, 4], "memory_budget": "60MB"}))
    args = parse_args(["submit", "--config", str(path), "--study", "b", "--bits", "3,4", "--trials", "9"])
    spec = job_spec(args)
    assert (spec.study, spec.bits, spec.memory_budget, args.trials) == ("b", (3, 4), "60MB", 9)


@pytest.mark.parametrize("content, fragment", [
    ({"memory_budgets": "60MB"}, "unknown keys ['memory_budgets']"),
    ({"bits": ["four"]}, "bits: ['four'] is not valid"),
    ("- just\n- a list\n", "give a mapping of flag names to values"),
    ("bits: [2, 4\n", "not valid YAML"),
])
def test_bad_job_files_name_the_problem(tmp_path, content, fragment):
    path = tmp_path / "job.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_args(["submit", "--config", str(path), "--study", "x", "--trials", "2"])


def test_submit_without_a_study_or_trials_names_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="submit needs --study and --trials"):
        job_spec(parse_args(["submit"]))


def test_the_command_line_is_read_without_the_heavy_libraries():
    """A typo, or a job's flags and job file, are read before torch, optuna or pandas is imported (seconds)."""
    import subprocess
    import sys

    script = ("import sys; from compsearch.search.cli import main, parse_args\n"
              "args = parse_args(['submit', '--study', 's', '--trials', '4', '--bits', '4,8', '--memory-budget', '60MB'])\n"
              "try:\n    main(['subimt'])\nexcept SystemExit as exit_:\n    assert exit_.code == 2\n"
              "print(sorted(m for m in ('torch', 'optuna', 'pandas', 'ray', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]" and "invalid choice: 'subimt'" in done.stderr
