"""`compsearch`: submit, resume, status, leaderboard and export compression searches."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import optuna

from compsearch.compress.distill import DistillSettings
from compsearch.evaluators.metrics import METRICS, is_task_metric
from compsearch.search.cluster import is_jobs_address, use_token_auth
from compsearch.search.errors import UserError
from compsearch.search.spec import DEFAULT_MODEL, EXPORT_FORMATS, OBJECTIVES, RUNTIMES, SAMPLERS, JobSpec
from compsearch.spaces.knobs import CHOICE_FIELDS, KNOBS
from compsearch.spaces.layers import GRANULARITIES
from compsearch.spaces.space import SPACES

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a Ray job re-runs on the cluster
    if not getattr(args, "address", None):
        # Read by Ray when it is imported (later, by the command): a local instance listens on loopback only.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    _quiet_libraries(args.verbose)
    if is_jobs_address(getattr(args, "address", None)):
        use_token_auth()  # before anything imports Ray: it reads RAY_AUTH_MODE once
    try:
        return args.handler(args)
    except UserError as err:
        print(f"compsearch: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\ninterrupted; trials in flight were re-queued. Continue with "
              f"`compsearch resume --study {args.study} --trials N`", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compsearch", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", help="start a new search study")
    _common(submit)
    _run_options(submit)
    submit.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"Hugging Face model folder or id (default: the bundled {DEFAULT_MODEL})")
    submit.add_argument("--data", help="text file or folder for calibration and evaluation (default: pydoc topics)")
    submit.add_argument("--space", default="joint", help=f"search space: {', '.join(SPACES)} (default: joint)")
    submit.add_argument("--granularity", help=f"one decision per: {', '.join(GRANULARITIES)} (default: the space's "
                        "own: block; layer for gguf and vllm)")
    submit.add_argument("--no-tie-fused", dest="tie_fused", action="store_false",
                        help="let q/k/v and gate/up choose separately at layer granularity")
    submit.add_argument("--include-lm-head", action="store_true", help="compress the output head too (untied models)")
    for knob in KNOBS:  # overrides of the space's choices, one flag per knob
        submit.add_argument(knob.flag, dest=knob.choices, type=_list_of(knob.parse), metavar="A,B,...",
                            help=f"override the space's {knob.help}" + _registered_help(knob))
    submit.add_argument("--objectives", type=_strings, default=("ppl", "memory"),
                        help=f"comma-separated: {', '.join(OBJECTIVES)} (minimized), or a task metric column such "
                             "as task_bigbench_hyperbaton_acc (maximized; needs --tasks) (default: ppl,memory)")
    submit.add_argument("--memory-budget", help="bytes with a unit (60MB, 1.2GiB) or a fraction of the 16-bit model (0.35)")
    submit.add_argument("--latency-budget", dest="latency_budget_ms", type=float, help="milliseconds per forward pass")
    submit.add_argument("--sampler", default="nsga2", help=f"{', '.join(SAMPLERS)} (default: nsga2)")
    submit.add_argument("--seed", type=int, default=0)
    submit.add_argument("--population-size", type=int, default=8, help="NSGA-II population / TPE start-up trials")
    submit.add_argument("--no-uniform-seeds", dest="uniform_seeds", action="store_false",
                        help="do not start with uniform plans (every layer alike)")
    submit.add_argument("--no-guided", dest="guided", action="store_false",
                        help="no sensitivity profile: no profile-optimal seeds, plain sampler children")
    submit.add_argument("--profile-windows", type=int, default=2,
                        help="calibration windows per sensitivity measurement")
    submit.add_argument("--profile-seq-len", type=int, default=128, help="tokens of each of those windows")
    submit.add_argument("--seq-len", type=int, default=256, help="tokens per evaluation window (BOS included)")
    submit.add_argument("--eval-windows", type=int, default=16)
    submit.add_argument("--calib-windows", type=int, default=16)
    submit.add_argument("--batch-size", type=int, default=0,
                        help="windows per forward pass for perplexity, KL and tasks (default 0: fit free memory)")
    _evaluator_options(submit)
    submit.add_argument("--runtime", choices=RUNTIMES,
                        help="what latency is measured in: torch, or llamacpp (each plan timed as a GGUF file in "
                             "llama.cpp; the default for the gguf space)")
    submit.add_argument("--gguf-template", help="a GGUF of the base model whose metadata the GGUF files copy "
                                                "(default: the bundled model's own)")
    submit.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    submit.add_argument("--force", action="store_true", help="replace an existing study of the same name")
    submit.set_defaults(handler=_submit)

    resume = commands.add_parser("resume", help="continue a study to a total trial count")
    _common(resume)
    _run_options(resume)
    resume.set_defaults(handler=_resume)

    status = commands.add_parser("status", help="trial counts and the best trial so far (and the Ray job's state)")
    _common(status)
    _address_option(status)
    status.set_defaults(handler=_status)

    board = commands.add_parser("leaderboard", help="ranked trials: the feasible Pareto front first")
    _common(board)
    board.add_argument("--top", type=int, default=10)
    board.set_defaults(handler=_leaderboard)

    export = commands.add_parser("export", help="write a ranked plan (and optionally its checkpoint)")
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
    export.add_argument("--distill-lr", type=float, default=DistillSettings.lr,
                        help="Adam learning rate of 16-bit weights, norms and biases")
    export.add_argument("--distill-scale-lr", type=float, default=DistillSettings.scale_lr,
                        help="Adam learning rate of the factors on quantization scales and codebooks")
    export.set_defaults(handler=_export)
    return parser


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


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True)
    parser.add_argument("--results-dir", type=Path, default=Path("results"))
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite in the study's results folder)")
    parser.add_argument("--cache-dir", type=Path, help="where the converted default model is kept")
    parser.add_argument("-v", "--verbose", action="store_true")


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, required=True, help="total number of trials to reach")
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

    return RunOptions(results_dir=args.results_dir, storage=args.storage, cache_dir=args.cache_dir,
                      workers=getattr(args, "workers", 2), cpus_per_worker=getattr(args, "cpus_per_worker", 1),
                      gpus_per_worker=getattr(args, "gpus_per_worker", 0.0),
                      worker_resources=getattr(args, "worker_resources", None),
                      address=getattr(args, "address", None), on_trial=_print_trial, on_ready=_print_ready,
                      on_status=lambda line: print(line, flush=True))


def _submit(args: argparse.Namespace) -> int:
    from compsearch.search.commands import submit

    fields = {name: getattr(args, name) for name in (
        "model", "data", "space", "granularity", "tie_fused", "include_lm_head", *CHOICE_FIELDS, "objectives", "memory_budget", "latency_budget_ms", "sampler", "seed",
        "population_size", "uniform_seeds", "guided", "profile_windows", "profile_seq_len", "seq_len", "eval_windows", "calib_windows", "batch_size",
        "trust_remote_code", "tasks", "task_paths", "tasks_on", "task_limit", "measure_latency", "decode_tokens",
        "decode_batch", "latency_repeats", "kl_top_k", "latency_prompt_tokens", "runtime", "gguf_template")}
    spec = JobSpec(study=args.study, **fields)  # validated here, also when it runs as a Ray job
    if is_jobs_address(args.address):
        return _send_job(args)
    trials = submit(spec, args.trials, _options(args), force=args.force)
    _print_summary(args, trials)
    return 0


def _resume(args: argparse.Namespace) -> int:
    from compsearch.search.commands import resume

    if is_jobs_address(args.address):
        return _send_job(args)
    trials = resume(args.study, args.trials, _options(args))
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
        distill = DistillSettings(args.distill_steps, args.distill_lr, args.distill_scale_lr) if args.distill_steps else None
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


def _print_trial(event) -> None:
    m = event.metrics
    if event.state == "COMPLETE":
        mark = "feasible" if event.feasible else "over budget"
        result = f"ppl {m['ppl']:.3f}  {_mb(m['memory_bytes'])}  {m['bits_per_weight']:.2f} b/w  {mark}"
    else:
        result = f"{event.state.lower()}: {event.error}"
    best = f"best ppl {event.best['ppl']:.3f} @ {_mb(event.best['memory_bytes'])}" if event.best else "no feasible yet"
    print(f"[{event.done}/{event.target}] trial {event.trial}: {result} | {best} | feasible {event.feasible_count}",
          flush=True)


def _print_summary(args: argparse.Namespace, trials) -> None:
    ranked = trials[trials["rank"].notna()]
    print(f"\n{len(ranked)} completed trials; top of the leaderboard:")
    print(_table(ranked.head(5)))
    print(f"\ntables in {args.results_dir / args.study}/ (trials.parquet, layers.parquet, pareto.parquet, best/)")


def _table(frame) -> str:
    if frame.empty:
        return "(no completed trials)"
    tasks = [column for column in frame.columns if is_task_metric(column) and column.endswith("_acc")]
    board = [m for m in METRICS if m.on_board]
    quality = [m.name for m in board if m.unit in ("", "nats/token") and m.direction]
    rest = [m.name for m in board if m.name not in quality]
    shown = frame[["rank", "trial", *quality, *tasks, *rest, "feasible", "on_front"]].dropna(axis=1, how="all").copy()
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


def _registered_help(knob) -> str:
    """For a knob whose values are registered names (the methods): which are registered."""
    supported = knob.supported()
    return f": {','.join(map(str, supported))}" if supported and isinstance(supported[0], str) else ""


def _strings(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("torchao", "optuna", "ray", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR if not verbose else logging.INFO)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
