"""`compsearch`: submit, resume, status, leaderboard and export compression searches."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

from compsearch.evaluators.metrics import METRICS, is_task_metric
from compsearch.search.cluster import check_reachable, is_jobs_address, use_token_auth
from compsearch.search.errors import UserError
from compsearch.search.spec import (DEFAULT_MAX_PPL_RATIO, DEFAULT_MODEL, EXPORT_FORMATS, OBJECTIVES, RUNTIMES, SAMPLERS,
                                    STUDENT_STEPS, JobSpec)
from compsearch.spaces.knobs import KNOBS
from compsearch.spaces.layers import GRANULARITIES
from compsearch.spaces.space import DEFAULT_SPACE, SPACE_KEYWORDS

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except UserError as err:
        print(f"compsearch: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if not getattr(args, "address", None):
        # Read by Ray when it is imported (later, by the command): a local instance listens on loopback only,
        # and uses token auth (Ray's default for a new local instance, which it warns about when left unsaid;
        # set once Ray is imported, this process and the instance it starts would disagree).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if "ray" not in sys.modules:
            os.environ.setdefault("RAY_AUTH_MODE", "token")
    _quiet_libraries(args.verbose)
    if is_jobs_address(getattr(args, "address", None)):
        use_token_auth()  # before anything imports Ray: it reads RAY_AUTH_MODE once
    try:
        return args.handler(args)
    except UserError as err:
        print(f"compsearch: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.handler in (_submit, _resume):
            print(f"\ninterrupted; trials in flight were re-queued. Continue with "
                  f"`compsearch resume --study {args.study} --trials N`", file=sys.stderr)
        else:
            print("\ninterrupted", file=sys.stderr)
        return 130


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, with a submit's --config job file read in (its values are the flags' defaults)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        args = _with_job_file(parser, argv, args.config)
    args.argv = argv  # what a Ray job re-runs on the cluster
    return args


def job_spec(args: argparse.Namespace) -> JobSpec:
    """The submit command's `JobSpec` (validated: a bad value raises `UserError`)."""
    missing = [flag for flag, value in (("--study", args.study), ("--trials", args.trials)) if value is None]
    if missing:
        raise UserError(f"submit needs {' and '.join(missing)} (as flags or as keys of --config)")
    return JobSpec(**{field.name: getattr(args, field.name) for field in dataclasses.fields(JobSpec)})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compsearch", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    _submit_parser(commands.add_parser("submit", help="start a new search study", formatter_class=_HelpFormatter, description=(
        "Start a new search study. Every flag can also come from a YAML file (--config job.yaml: keys are the "
        "flags' names with underscores, e.g. memory_budget: 60MB, bits: [2, 4, 8]); flags given here win. The "
        "study's full job is written to RESULTS/STUDY/job.yaml, which --config reads back.")))

    resume = commands.add_parser("resume", help="continue a study to a total trial count")
    _common(resume)
    _run_options(resume)
    _distill_top_options(resume, resuming=True)
    resume.set_defaults(handler=_resume)

    status = commands.add_parser("status", help="trial counts and the best trial so far (and the Ray job's state)")
    _common(status)
    _address_option(status)
    status.set_defaults(handler=_status)

    board = commands.add_parser("leaderboard", help="ranked trials: the feasible Pareto front first")
    _common(board)
    board.add_argument("--top", type=int, default=10)
    board.set_defaults(handler=_leaderboard)

    export = commands.add_parser("export", help="write a ranked plan (and optionally its checkpoint)",
                                 formatter_class=_HelpFormatter)
    _common(export)
    export.add_argument("--rank", type=int, default=1)
    export.add_argument("--front", action="store_true",
                        help="every plan of the feasible Pareto front, as .gguf files in the --out folder "
                             "(with --format gguf; the base model is loaded once for all)")
    export.add_argument("--out", type=Path, required=True,
                        help="a folder (compsearch, compressed-tensors, or gguf with --front), a .gguf file (gguf) "
                             "or a text file (llama-quantize)")
    export.add_argument("--format", dest="export_format", default="compsearch", choices=EXPORT_FORMATS,
                        help="compsearch: plan.json (and --checkpoint, safetensors); gguf: a file llama.cpp runs "
                             "(GGUF-type plans); llama-quantize: the plan as llama-quantize's --tensor-type-file; "
                             "compressed-tensors: a checkpoint folder vLLM and transformers load (vllm space plans)")
    export.add_argument("--gguf-template", type=Path,
                        help="a GGUF of the base model whose metadata (tokenizer, chat template) the .gguf copies "
                             "(default: the bundled model's own; Llama checkpoints without one get it from their files)")
    export.add_argument("--force", action="store_true", help="write over files already at --out")
    export.add_argument("--checkpoint", action="store_true", help="also write the compressed model (safetensors)")
    export.add_argument("--verify", action="store_true",
                        help="reload what was written and measure its perplexity (a .gguf in llama.cpp itself); "
                             "exit 1 when it does not reproduce the trial")
    export.add_argument("--distill-steps", type=int, default=0,
                        help="distill the checkpoint's model from the base model for this many steps first "
                             "(scales, codebooks, 16-bit weights, norms; needs --checkpoint)")
    for rate, text in (("lr", "16-bit weights, norms and biases"),
                       ("scale_lr", "the factors on quantization scales and codebooks")):
        _help_suffix(export.add_argument(f"--distill-{rate.replace('_', '-')}", type=float,
                                         help=f"Adam learning rate of {text}"), lambda rate=rate: _distill_default(rate))
    export.set_defaults(handler=_export)

    evaluate = commands.add_parser("evaluate", help="score given configurations (plans, uniform presets, GGUF files)",
                                   description="Score configurations you already have with a study's evaluators and "
                                   "protocol; with --study they are recorded beside its trials (source column) and "
                                   "shown by leaderboard and report. Repeat --plan/--uniform/--gguf for several.")
    _common(evaluate, study_required=False, study_help="the study whose protocol scores them and whose tables "
            "record them (default: none; the default protocol on --model, printed only)")
    evaluate.add_argument("--model", help=f"without --study: the model (default: the bundled {DEFAULT_MODEL})")
    evaluate.add_argument("--data", help="without --study: the text file or folder (default: pydoc topics)")
    evaluate.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    for source, metavar, text in (("plan", "FILE.json", "a plan (export's plan.json or a study's best/rank*.json)"),
                                  ("uniform", "PRESET", "one choice for every layer: rtn:4:g128, gptq:3:g128, "
                                   "q4_k, wanda:0.5, sparsegpt:2:4, whiten:0.5, or joined by + (wanda:2:4+rtn:8:g128)"),
                                  ("gguf", "FILE.gguf", "a GGUF file of the model, scored in llama.cpp itself")):
        evaluate.add_argument(f"--{source}", dest="references", action=_AppendReference, metavar=metavar, help=text,
                              default=[])
    evaluate.set_defaults(handler=_evaluate)

    report = commands.add_parser("report", help="an HTML report with figures of the study (works offline)")
    _common(report)
    report.add_argument("--out", type=Path, help="folder for report.html and the PNGs (default: RESULTS/STUDY/report)")
    report.set_defaults(handler=_report)

    dashboard = commands.add_parser("dashboard", help="optuna-dashboard for the study's storage, until Ctrl-C")
    _common(dashboard)
    dashboard.add_argument("--port", type=int, default=8080)
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    dashboard.set_defaults(handler=_dashboard)

    cache = commands.add_parser("cache", help="what the cache folder holds: models, sensitivity profiles, layer variants")
    _cache_dir_option(cache)
    cache.add_argument("--clear-variants", action="store_true", help="remove every stored compressed-layer variant")
    cache.add_argument("-v", "--verbose", action="store_true")
    cache.set_defaults(handler=_cache)
    return parser


class _AppendReference(argparse.Action):
    """--plan/--uniform/--gguf in the order given, as `Reference`s of one list."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        from compsearch.search.evaluate import Reference

        setattr(namespace, self.dest, [*getattr(namespace, self.dest), Reference(option_string.lstrip("-"), value)])


def _submit_parser(submit: argparse.ArgumentParser) -> None:
    """The `submit` flags, grouped by concern in --help."""
    submit.add_argument("--config", type=Path, help="a YAML job file (e.g. a study's job.yaml) with defaults for every flag")
    _common(submit, study_required=False, study_help="the study's name (required: here or in --config)")
    data = submit.add_argument_group("model and data")
    data.add_argument("--model", default=DEFAULT_MODEL,
                      help=f"Hugging Face model folder or id (default: the bundled {DEFAULT_MODEL})")
    data.add_argument("--data", help="text file or folder for calibration and evaluation (default: pydoc topics)")
    data.add_argument("--seq-len", type=int, default=JobSpec.seq_len, help="tokens per window (BOS included)")
    data.add_argument("--eval-windows", type=int, default=JobSpec.eval_windows)
    data.add_argument("--calib-windows", type=int, default=JobSpec.calib_windows,
                      help=f"calibration windows of --seq-len tokens (default: {JobSpec.calib_windows})")
    data.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    space = submit.add_argument_group("space")
    space.add_argument("--space", default=DEFAULT_SPACE,
                       help=f"search space: {', '.join(SPACE_KEYWORDS)} (default: {DEFAULT_SPACE})")
    space.add_argument("--granularity", help=f"one decision per: {', '.join(GRANULARITIES)} (default: the space's "
                       "own: block; layer for gguf and vllm)")
    space.add_argument("--no-tie-fused", dest="tie_fused", action="store_false", default=None,
                       help="let q/k/v and gate/up choose separately at layer granularity (default: the space's "
                            "own: apart for gguf, whose files store them apart; tied otherwise, as vLLM fuses them)")
    space.add_argument("--include-lm-head", action="store_true", help="compress the output head too (untied models)")
    for knob in KNOBS:  # overrides of the space's choices, one flag per knob
        _help_suffix(space.add_argument(knob.flag, dest=knob.choices, type=_list_of(knob.parse), metavar="A,B,...",
                                        help=f"override the space's {knob.help}"), lambda knob=knob: _registered_help(knob))
    goals = submit.add_argument_group("objectives and budgets")
    goals.add_argument("--objectives", type=_strings, default=("ppl", "memory"),
                       help=f"comma-separated: {', '.join(OBJECTIVES)} (minimized), or a task metric column such "
                            "as task_bigbench_hyperbaton_acc (maximized; needs --tasks) (default: ppl,memory)")
    goals.add_argument("--memory-budget", help="bytes with a unit (60MB, 1.2GiB) or a fraction of the 16-bit model (0.35)")
    goals.add_argument("--latency-budget", dest="latency_budget_ms", type=float, help="milliseconds per forward pass")
    goals.add_argument("--max-quality-loss", dest="max_ppl_ratio", type=_ratio_or_none, default=DEFAULT_MAX_PPL_RATIO,
                       metavar="RATIO", help="the quality floor: plans above RATIO x the base model's perplexity are "
                       f"infeasible and never parents (default: {DEFAULT_MAX_PPL_RATIO:g}; none: no floor)")
    search = submit.add_argument_group("search")
    search.add_argument("--sampler", default="nsga2", help=f"{', '.join(SAMPLERS)} (default: nsga2)")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--population-size", type=int, default=8, help="NSGA-II population / TPE start-up trials")
    search.add_argument("--no-uniform-seeds", dest="uniform_seeds", action="store_false",
                        help="do not start with uniform plans (every layer alike)")
    search.add_argument("--no-guided", dest="guided", action="store_false",
                        help="no sensitivity profile: no profile-optimal seeds, plain sampler children")
    search.add_argument("--profile-windows", type=int, default=2, help="calibration windows per sensitivity measurement")
    search.add_argument("--profile-seq-len", type=int, default=128, help="tokens of each of those windows")
    search.add_argument("--force", action="store_true", help="replace an existing study of the same name")
    _distill_top_options(search)
    _run_options(submit.add_argument_group("workers"), trials_required=False)
    evaluation = submit.add_argument_group("evaluation")
    evaluation.add_argument("--batch-size", type=int, default=0,
                            help="windows per forward pass for perplexity, KL and tasks (default 0: fit free memory)")
    _evaluator_options(evaluation)
    evaluation.add_argument("--runtime", choices=RUNTIMES,
                            help="what latency is measured in: torch, or llamacpp (each plan timed as a GGUF file in "
                                 "llama.cpp; the default for the gguf space)")
    evaluation.add_argument("--gguf-template", help="a GGUF of the base model whose metadata the GGUF files copy "
                                                    "(default: the bundled model's own)")
    submit.set_defaults(handler=_submit)


def _distill_top_options(parser, resuming: bool = False) -> None:
    own = " (default: the study's own)" if resuming else ""
    parser.add_argument("--distill-top", type=int, default=None if resuming else 0, metavar="K",
                        help="once the search is done, distill the K best feasible plans on the workers; their rows "
                             "gain distilled_ppl, distilled_kl, distill_s" + (own or " (default: 0, none)"))
    steps = parser.add_argument("--distill-steps", type=int, help="steps of each of those distillations" + own)
    if not resuming:
        _help_suffix(steps, lambda: _distill_default("steps"))
    parser.add_argument("--students", type=int, default=None if resuming else 0, metavar="S",
                        help="the student path: also distill the S best feasible plans that remove MLP channels or "
                             "attention heads (smaller dense models), for --student-steps each" + (own or " (default: 0)"))
    parser.add_argument("--student-steps", type=int,
                        help="steps of each student's distillation" + (own or f" (default: {STUDENT_STEPS})"))


def _evaluator_options(parser: argparse.ArgumentParser) -> None:
    """lm-eval tasks, latency measurement and the KL cache (see the README's Evaluators section)."""
    parser.add_argument("--tasks", type=_strings,
                        help="lm-eval task names and BIG-bench files, e.g. hellaswag,bigbench:FILE.json,bigbench:DIR")
    parser.add_argument("--task-path", dest="task_paths", action="append",
                        help="a folder of lm-eval task YAML files (repeatable); name its tasks in --tasks")
    parser.add_argument("--tasks-on", default="all", choices=("all", "pareto"),
                        help="score tasks on every trial, or only on the final Pareto front (default: all)")
    parser.add_argument("--task-limit", type=int, help="score only the first N examples of each task")
    parser.add_argument("--measure-latency", action="store_true",
                        help="measure prefill/decode latency on every trial (on by default with a latency objective or budget)")
    parser.add_argument("--latency-prompt-tokens", type=int, default=64, help="prompt tokens of the timed prefill")
    parser.add_argument("--decode-tokens", type=int, default=16, help="timed decode steps per repeat")
    parser.add_argument("--decode-batch", type=int, default=4, help="the batched decode measurement's batch")
    parser.add_argument("--latency-repeats", type=int, default=5, help="timed repeats (median and p90 recorded)")
    parser.add_argument("--kl-top-k", type=int, default=1024,
                        help="base-model tokens cached per position for KL (0: the full distribution)")


def _common(parser: argparse.ArgumentParser, study_required: bool = True, study_help: str | None = None) -> None:
    parser.add_argument("--study", required=study_required, help=study_help)
    parser.add_argument("--results-dir", type=Path, default=Path("results"))
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite in the study's results folder)")
    _cache_dir_option(parser)
    parser.add_argument("-v", "--verbose", action="store_true")


def _cache_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, help="where one-time work is kept: the converted default model, "
                        "sensitivity profiles, compressed-layer variants (default: $COMPSEARCH_CACHE, else ~/.cache/compsearch)")


def _run_options(parser, trials_required: bool = True) -> None:
    parser.add_argument("--trials", type=int, required=trials_required, help="total number of trials to reach"
                        + ("" if trials_required else " (required)"))
    parser.add_argument("--workers", type=int, default=2, help="Ray workers, each holding the model once")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0,
                        help="GPUs per worker; fractions share a GPU, e.g. 0.5 runs two workers per GPU (default: 0, CPU)")
    parser.add_argument("--worker-resources", type=_resources, default=None,
                        help='custom Ray resources per worker as JSON, e.g. \'{"node_b": 1}\' to place workers')
    _address_option(parser)


def _address_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="http://HEAD:8265 (Ray Jobs API): run the driver on the cluster as a Ray "
                        "job and return its id; auto, HOST:6379 or ray://HEAD:10001: run the driver here on that "
                        "cluster (default: start a local Ray instance)")


def _options(args: argparse.Namespace):
    from compsearch.search.commands import RunOptions
    from compsearch.search.progress import Progress

    progress = Progress()

    def on_trial(event) -> None:
        progress.line(_trial_line(event))
        if progress.live:  # in a log, each trial's line says how far the study is
            progress.step("trials", event.done, event.target)

    return RunOptions(results_dir=args.results_dir, storage=args.storage, cache_dir=args.cache_dir,
                      workers=getattr(args, "workers", 2), cpus_per_worker=getattr(args, "cpus_per_worker", 1),
                      gpus_per_worker=getattr(args, "gpus_per_worker", 0.0),
                      worker_resources=getattr(args, "worker_resources", None),
                      address=getattr(args, "address", None), on_trial=on_trial, on_ready=_print_ready,
                      on_status=progress.line, on_progress=progress.step)


def _with_job_file(parser: argparse.ArgumentParser, argv: list[str], path: Path) -> argparse.Namespace:
    """`argv` parsed again with the YAML job file's values as the submit flags' defaults (flags still win)."""
    submit = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices["submit"]
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise UserError(f"--config {path}: cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    actions = {action.dest: action for action in submit._actions if action.dest not in ("help", "config", "handler")}
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: give a mapping of flag names to values, e.g. `memory_budget: 60MB`")
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UserError(f"--config {path}: unknown keys {unknown}; the keys are the submit flags' names with "
                        f"underscores: {', '.join(sorted(actions))}")
    submit.set_defaults(**{key: _job_file_value(actions[key], value, path) for key, value in values.items()})
    return parser.parse_args(argv)


def _job_file_value(action: argparse.Action, value, path: Path):
    """A job file's value as the flag's own parser reads it (lists are written as YAML lists)."""
    if value is None or action.type is None:
        return tuple(value) if isinstance(value, list) else value
    text = json.dumps(value) if isinstance(value, dict) else ",".join(map(str, value)) if isinstance(value, list) \
        else str(value)
    try:
        return action.type(text)
    except (argparse.ArgumentTypeError, ValueError) as err:
        raise UserError(f"--config {path}: {action.dest}: {value!r} is not valid ({err})") from None


def _submit(args: argparse.Namespace) -> int:
    from compsearch.search.commands import submit

    spec = job_spec(args)  # validated here, also when it runs as a Ray job
    if is_jobs_address(args.address):
        return _send_job(args)
    if args.address:
        check_reachable(args.address)  # before the model is loaded
    trials = submit(spec, args.trials, _options(args), force=args.force)
    _print_summary(args, trials)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from compsearch.search.commands import resume

    if is_jobs_address(args.address):
        return _send_job(args)
    if args.address:
        check_reachable(args.address)
    trials = resume(args.study, args.trials, _options(args), distill_top=args.distill_top,
                    distill_steps=args.distill_steps, students=args.students, student_steps=args.student_steps)
    _print_summary(args, trials)
    return 0


def _send_job(args: argparse.Namespace) -> int:
    from compsearch.search.cluster import submit_job

    job_id = submit_job(args.address, args.argv, args.study)
    print(f"submitted Ray job {job_id} for study {args.study} to {args.address}")
    token = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE") == "token" else ""  # Ray's CLI needs it too
    print(f"  logs:   {token}ray job logs --address {args.address} --follow {job_id}")
    print(f"  status: compsearch status --address {args.address} --study {args.study}")
    return 0


def _print_job(args: argparse.Namespace) -> None:
    from compsearch.search.cluster import job_state

    job = job_state(args.address, args.study)
    if job is None:
        print(f"ray job: none submitted for study {args.study} at {args.address}")
        return
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time)) if job.start_time else "?"
    detail = f" ({job.message})" if job.message and job.status not in ("RUNNING", "SUCCEEDED") else ""
    print(f"ray job: {job.job_id} {job.status} since {since}{detail}; logs: ray job logs --address {args.address} {job.job_id}")


def _status(args: argparse.Namespace) -> int:
    from compsearch.search.commands import status

    if is_jobs_address(args.address):
        _print_job(args)
        try:
            info = status(args.study, _options(args))
        except UserError as err:  # the study's storage may live only on the cluster
            print(f"study {args.study}: not readable from here ({err})")
            return 0
    else:
        info = status(args.study, _options(args))
    states = ", ".join(f"{count} {state.lower()}" for state, count in sorted(info["states"].items()))
    print(f"study {info['study']}: {info['done']}/{info['target']} trials done ({states or 'none yet'})")
    print(f"driver: {'running, ' + info['driver'] if info['driver'] else 'not running'}")
    if info["memory_budget_bytes"]:
        print(f"memory budget: {_mb(info['memory_budget_bytes'])} of {_mb(info['base_bytes'])} (16-bit model)")
    if info["base"]:
        print(f"base model: ppl {info['base']['ppl']:.3f}, {_mb(info['base_bytes'])}")
    print(f"feasible trials: {info['feasible']}, on the front: {info['front']}")
    if info["best"]:
        best = info["best"]
        print(f"rank 1: trial {best['trial']}, ppl {best['ppl']:.3f}, {_mb(best['memory_bytes'])}, "
              f"{best['bits_per_weight']:.2f} bits/weight")
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    from compsearch.search.commands import leaderboard

    print(_table(leaderboard(args.study, _options(args), args.top)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from compsearch.search.commands import export, export_front

    if args.front:
        if args.export_format != "gguf" or args.checkpoint or args.distill_steps:
            raise UserError("--front writes .gguf files: use it with --format gguf (no --checkpoint, no distillation)")
        status = 0
        for summary in export_front(args.study, args.out, _options(args), args.verify, args.gguf_template,
                                    on_status=lambda line: print(line, flush=True), overwrite=args.force):
            measured = f", in llama.cpp {summary['llamacpp_ppl']:.4f}" if "llamacpp_ppl" in summary else ""
            print(f"rank {summary['rank']} (trial {summary['trial']}): {summary['out']} {_mb(summary['file_bytes'])}, "
                  f"trial ppl {summary['metrics']['ppl']:.3f}{measured}")
            status = max(status, _verified(summary))
        return status
    try:
        from compsearch.compress.distill import DistillSettings

        rates = {"lr": args.distill_lr, "scale_lr": args.distill_scale_lr}
        distill = DistillSettings(args.distill_steps, **{k: v for k, v in rates.items() if v is not None}) \
            if args.distill_steps else None
    except ValueError as error:
        raise UserError(f"--distill-steps/--distill-lr/--distill-scale-lr: {error}") from None
    summary = export(args.study, args.rank, args.out, _options(args), args.checkpoint, args.verify, distill,
                     on_status=lambda line: print(line, flush=True), export_format=args.export_format,
                     gguf_template=args.gguf_template, overwrite=args.force)
    metrics = summary["metrics"]
    if args.export_format != "compsearch":
        print(f"exported rank {summary['rank']} (trial {summary['trial']}) as {args.export_format}: {args.out}")
        if "file_bytes" in summary:
            print(f"file {_mb(summary['file_bytes'])} (plan {_mb(summary['plan_bytes'])}); trial ppl {metrics['ppl']:.3f}")
        if "checkpoint_bytes" in summary:
            print(f"checkpoint {_mb(summary['checkpoint_bytes'])} on disk (plan {_mb(summary['plan_bytes'])})")
        if "llamacpp_ppl" in summary:
            print(f"perplexity in llama.cpp {summary['llamacpp_ppl']:.4f} (trial reported {metrics['ppl']:.4f})")
        if "checkpoint_ppl" in summary:
            print(f"reloaded checkpoint ppl {summary['checkpoint_ppl']:.4f} (trial reported {metrics['ppl']:.4f})")
        return _verified(summary)
    print(f"exported rank {summary['rank']} (trial {summary['trial']}): ppl {metrics['ppl']:.3f}, "
          f"{_mb(metrics['memory_bytes'])} planned -> {args.out}/plan.json")
    if "checkpoint" in summary:
        print(f"checkpoint {summary['checkpoint']}: {_mb(summary['checkpoint_bytes'])} on disk "
              f"(plan {_mb(summary['plan_bytes'])})")
    if "distilled_ppl" in summary:
        print(f"distilled {summary['distill_steps']} steps in {summary['distill_s']:.0f}s: ppl "
              f"{summary['ppl_before_distill']:.3f} -> {summary['distilled_ppl']:.3f}")
    if "checkpoint_ppl" in summary:
        expected, source = ((summary["distilled_ppl"], "distilled model") if "distilled_ppl" in summary
                            else (metrics["ppl"], "trial reported"))
        print(f"reloaded checkpoint ppl {summary['checkpoint_ppl']:.4f} ({source} {expected:.4f})")
    return _verified(summary)


def _evaluate(args: argparse.Namespace) -> int:
    from compsearch.search.commands import evaluate

    rows = evaluate(args.references, _options(args), args.study, args.model, args.data, args.trust_remote_code,
                    on_status=lambda line: print(line, flush=True))
    columns = [c for c in ("source", "name", "ppl", "kl", "memory_bytes", "bits_per_weight", "latency_ms", "feasible")
               if c in rows and rows[c].notna().any()]
    shown = rows[columns].sort_values("memory_bytes", ascending=False)
    shown["memory_bytes"] = shown["memory_bytes"].map(_mb)
    print(shown.rename(columns={"memory_bytes": "memory"}).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if args.study:
        print(f"recorded beside the trials of study {args.study}: `compsearch leaderboard --study {args.study}` "
              "lists them, `compsearch report` draws them")
    return 0


def _cache(args: argparse.Namespace) -> int:
    import shutil

    from compsearch.compress.variants import VariantStore
    from compsearch.paths import default_cache_dir, variant_store_bytes

    root = args.cache_dir or default_cache_dir()
    try:
        bound = variant_store_bytes()
    except ValueError as err:
        raise UserError(str(err)) from None
    if not root.is_dir():
        print(f"{root}: nothing cached yet")
        return 0
    print(f"{root}:")
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        sizes = [path.stat().st_size for path in folder.rglob("*") if path.is_file()]
        print(f"  {folder.name}/: {len(sizes)} files, {_mb(sum(sizes))}")
    stores = sorted(path for path in (root / "variants").glob("*") if path.is_dir())
    for folder in stores:
        held = VariantStore(folder, bound).contents()
        print(f"variants/{folder.name} (model-calibration-device-version; at most {_mb(bound)}, "
              "$COMPSEARCH_VARIANT_CACHE_GB):")
        for plan, (count, nbytes) in sorted(held.items(), key=lambda item: -item[1][1]):
            print(f"  {plan}: {count} matrices, {_mb(nbytes)}")
    if args.clear_variants and stores:
        shutil.rmtree(root / "variants")
        print(f"removed {len(stores)} variant folder(s)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from compsearch.search.commands import report

    path = report(args.study, _options(args), args.out)
    print(f"report: {path} (figures as PNG beside it)")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from compsearch.search.commands import dashboard

    dashboard(args.study, _options(args), args.host, args.port,
              on_ready=lambda url: print(f"optuna-dashboard for study {args.study}: {url} (Ctrl-C stops it)", flush=True))
    return 0


def _verified(summary: dict) -> int:
    """Exit status of an export: 1 when --verify found that what was written does not reproduce the trial."""
    if summary.get("verified", True):
        return 0
    print(f"compsearch: error: the export does not reproduce its trial (perplexity off by "
          f"{100 * summary['verify_gap']:.2f}%, see above); it was written, but do not rely on it", file=sys.stderr)
    return 1


def _print_ready(ctx, study, requeued: list[int]) -> None:
    low, high = ctx.smallest_plan_bytes, ctx.largest_plan_bytes
    budget = f", budget {_mb(ctx.memory_budget_bytes)}" if ctx.memory_budget_bytes else ""
    print(f"study {study.study_name}: {len(ctx.layers)} layers in {len(ctx.space.groups(ctx.layers))} groups, "
          f"16-bit model {_mb(ctx.base_bytes)}; plans span {_mb(low)}..{_mb(high)}{budget}")
    for role, fallbacks in ctx.space.fallbacks(ctx.layers).items():
        print(f"  {role}: rows that cannot hold a choice get another: " +
              ", ".join(f"{chosen} -> {actual}" for chosen, actual in fallbacks.items()))
    if requeued:
        print(f"re-queued interrupted trials {requeued}")
    sys.stdout.flush()


def _trial_line(event) -> str:
    m = event.metrics
    if event.state == "COMPLETE":
        mark = "feasible" if event.feasible else "past the " + " and ".join(
            "quality floor" if name == "quality" else f"{name} budget" for name in event.violated)
        result = f"ppl {m['ppl']:.3f}  {_mb(m['memory_bytes'])}  {m['bits_per_weight']:.2f} b/w  {mark}"
    else:
        result = f"{event.state.lower()}: {event.error}"
    best = f"best ppl {event.best['ppl']:.3f} @ {_mb(event.best['memory_bytes'])}" if event.best else "no feasible yet"
    return f"[{event.done}/{event.target}] trial {event.trial}: {result} | {best} | feasible {event.feasible_count}"


def _print_summary(args: argparse.Namespace, trials) -> None:
    ranked = trials[trials["rank"].notna()]
    print(f"\n{len(ranked)} completed trials; top of the leaderboard:")
    print(_table(ranked.head(5)))
    print(f"\ntables in {args.results_dir / args.study}/ (trials.parquet, layers.parquet, pareto.parquet, best/)")


def _table(frame) -> str:
    import pandas as pd

    from compsearch.search.results import SEARCH_SOURCE

    if frame.empty:
        return "(no completed trials)"
    tasks = [column for column in frame.columns if is_task_metric(column) and column.endswith("_acc")]
    board = [m for m in METRICS if m.on_board]
    quality = [m.name for m in board if m.unit in ("", "nats/token") and m.direction]
    rest = [m.name for m in board if m.name not in quality]
    references = ["source", "name"] if "source" in frame and (frame["source"] != SEARCH_SOURCE).any() else []
    distilled = [column for column in ("distilled_ppl", "distilled_kl") if column in frame]  # --distill-top's
    shown = frame[["rank", "trial", *references, *quality, *distilled, *tasks, *rest, "feasible", "on_front"]]
    shown = shown.dropna(axis=1, how="all").copy()  # (empty where nothing was distilled: dropped)
    if references:  # the search's own trials have no name, references no rank or trial number
        for column in ("rank", "trial"):
            if column in shown:
                shown[column] = shown[column].map(lambda value: "-" if pd.isna(value) else str(int(value)))
        shown["name"] = shown["name"].fillna("")
    byte_columns = [m.name for m in board if m.unit == "bytes" and m.name in shown]
    for column in byte_columns:
        shown[column] = shown[column].map(lambda b: _mb(b) if b == b else "")
    shown = shown.rename(columns={column: column.removesuffix("_bytes") for column in byte_columns})
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def _mb(nbytes) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _resources(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({err.msg}); write e.g. '{{\"node_b\": 1}}'") from None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in value.values()):
        raise argparse.ArgumentTypeError(f"{text!r}: give a JSON object of resource name -> amount, e.g. '{{\"node_b\": 1}}'")
    return {str(key): float(amount) for key, amount in value.items()}


def _list_of(parse):
    """An argparse type: comma-separated values, each read by `parse` (int, float, str)."""
    def values(text: str) -> tuple:
        return tuple(parse(part) for part in _strings(text))

    values.__name__ = f"comma-separated {parse.__name__}"  # argparse names the type in its error
    return values


class _HelpFormatter(argparse.HelpFormatter):
    """Completes an action's help with its `help_suffix()` only when help is shown: those suffixes read the
    technique registries or the distillation defaults, which import torch."""

    def _get_help_string(self, action: argparse.Action) -> str:
        suffix = getattr(action, "help_suffix", None)
        return super()._get_help_string(action) + (suffix() if suffix else "")


def _help_suffix(action: argparse.Action, suffix) -> None:
    action.help_suffix = suffix


def _distill_default(field: str) -> str:
    from compsearch.compress.distill import DistillSettings

    return f" (default: {getattr(DistillSettings, field)})"


def _registered_help(knob) -> str:
    """For a knob whose values are registered names (the methods): which are registered."""
    supported = knob.supported()
    return f": {','.join(map(str, supported))}" if supported and isinstance(supported[0], str) else ""


def _ratio_or_none(text: str) -> float | None:
    """A perplexity ratio such as 3 or 3x, or none."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text.strip().lower().removesuffix("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a perplexity ratio; write e.g. 3 (or 3x), or none") from None


def _strings(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # torch.utils._pytree: torchao's import warns that registering its enums is deprecated, twice a run
    for name in ("torchao", "optuna", "ray", "transformers", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR if not verbose else logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(not_caused_by_interrupt)
    import optuna  # after the arguments are read: a typo or --help needs none of the heavy libraries

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def not_caused_by_interrupt(record: logging.LogRecord) -> bool:
    """False for a record whose exception follows a Ctrl-C: SQLAlchemy invalidates the connection a
    KeyboardInterrupt cut short and then logs, with two tracebacks, that the cursor could not close. The
    interrupt is handled (`main` re-queues and says how to resume); the record would only bury that line."""
    error = record.exc_info[1] if record.exc_info else None
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return False
        error = error.__context__
    return True


if __name__ == "__main__":
    sys.exit(main())
