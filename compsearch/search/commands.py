"""What each CLI command does, as functions that return data (the CLI prints it)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import optuna
import pandas as pd
import torch
import yaml

from compsearch.compress import COMPRESS_VERSION, load_compressed, save_compressed
from compsearch.compress.distill import DistillSettings
from compsearch.evaluators.quality import perplexity_and_kl
from compsearch.search.errors import UserError
from compsearch.search.job import JobContext, check_out, check_writable, prepare_job
from compsearch.search.models import load_config, load_tokenizer, study_gguf_template
from compsearch.search.results import (BEST_DIR, DISTILLED_ATTR, DISTILLED_COLUMNS, LAYERS_FILE, PARETO_FILE,
                                       SEARCH_SOURCE, TRIALS_FILE, storable, trials_frame, write_results)
from compsearch.search.runner import TrialEvent, plans_to_distill, run_study
from compsearch.search.spec import DEFAULT_MODEL, EXPORT_FORMATS, JobSpec
from compsearch.search.study import (BASE_METRICS_ATTR, SPEC_ATTR, create_study, default_storage_url, done_count, live_driver,
                                     load_study, open_storage, requeue_interrupted, study_exists)
from compsearch.search.trial import TrialEvaluator, WorkerSettings
from compsearch.spaces.layers import meta_model
from compsearch.spaces.plan import Plan

log = logging.getLogger(__name__)
# How close a reloaded export's perplexity must be to its trial's for `--verify` to pass: the same
# runtime reproduces it up to float summation order; llama.cpp within 1% (see README, GGUF).
VERIFY_TOLERANCE = {"compsearch": 1e-3, "compressed-tensors": 1e-3, "gguf": 0.01}
TARGET_ATTR = "target_trials"
JOB_FILE = "job.yaml"


@dataclass
class RunOptions:
    """How to run a job, as opposed to what it searches (`JobSpec`)."""

    results_dir: Path = Path("results")
    storage: str | None = None
    workers: int = 2
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    worker_resources: dict[str, float] | None = None  # custom Ray resources each worker asks for
    address: str | None = None  # a cluster address for the driver here (auto, HOST:PORT, ray://...)
    cache_dir: Path | None = None
    on_trial: Callable[[TrialEvent], None] | None = field(default=None, repr=False)
    on_ready: Callable[[JobContext, optuna.Study, list[int]], None] | None = field(default=None, repr=False)
    on_status: Callable[[str], None] | None = field(default=None, repr=False)
    on_progress: Callable[[str, int, int], None] | None = field(default=None, repr=False)  # (stage, done, total)

    def storage_url(self, study: str) -> str:
        return self.storage or default_storage_url(self.results_dir, study)


def submit(spec: JobSpec, trials: int, options: RunOptions, force: bool = False) -> pd.DataFrame:
    """Start a new study and run it to `trials` trials."""
    _check_counts(trials, options)
    check_writable(options.results_dir)
    ctx = prepare_job(spec, options.cache_dir)  # every input error surfaces before the storage is touched
    storage = open_storage(options.storage_url(spec.study))
    if study_exists(storage, spec.study):
        existing, old_spec = load_study(spec.study, storage)
        driver = live_driver(existing)
        if driver:  # checked first: --force never replaces a study under a live driver
            raise UserError(f"study {spec.study!r} is already running ({driver}); a second submit is refused, "
                            f"with or without --force. Follow it with `compsearch status --study {spec.study}`, "
                            "or stop that driver first")
        if not force:
            raise UserError(_exists_message(spec, old_spec))
        optuna.delete_study(study_name=spec.study, storage=storage)
        _remove_tables(options.results_dir / spec.study)
    study = create_study(spec, storage, ctx.study_attrs())
    write_job_file(spec, trials, options)
    try:
        return _run(ctx, study, trials, options, requeued=[])
    except Exception:
        if not any(trial.state != optuna.trial.TrialState.WAITING for trial in study.get_trials(deepcopy=False)):
            # failed before any trial started (workers, profile): leave no empty study that blocks a new submit
            optuna.delete_study(study_name=spec.study, storage=storage)
            _remove_tables(options.results_dir / spec.study)
        raise


def resume(study_name: str, trials: int, options: RunOptions, distill_top: int | None = None,
           distill_steps: int | None = None, students: int | None = None,
           student_steps: int | None = None) -> pd.DataFrame:
    """Continue a study until it has `trials` trials done; interrupted trials run again first. `distill_top`,
    `distill_steps`, `students` and `student_steps`, when given, replace the study's own (`--trials` equal
    to the trials done then only distills)."""
    _check_counts(trials, options)
    check_writable(options.results_dir)
    study, spec = _open_existing(study_name, options)
    driver = live_driver(study)
    if driver:
        raise UserError(f"study {study_name!r} is already running ({driver}); wait for it or stop that driver")
    changed = {key: value for key, value in (("distill_top", distill_top), ("distill_steps", distill_steps),
                                             ("students", students), ("student_steps", student_steps))
               if value is not None}
    if changed:
        spec = dataclasses.replace(spec, **changed)  # validated again
        study.set_user_attr(SPEC_ATTR, spec.to_dict())
    ctx = prepare_job(spec, options.cache_dir)
    recorded = study.user_attrs.get("protocol", {})
    if recorded.get("data_sha256", ctx.windows.protocol.data_sha256) != ctx.windows.protocol.data_sha256:
        raise UserError(f"the data of study {study_name!r} changed since it was submitted (sha256 "
                        f"{recorded['data_sha256'][:12]}... now {ctx.windows.protocol.data_sha256[:12]}...); "
                        "restore it or submit a new study")
    if recorded.get("compress_version", COMPRESS_VERSION) != COMPRESS_VERSION:
        raise UserError(f"study {study_name!r} was measured with compression version {recorded['compress_version']}, "
                        f"this compsearch has version {COMPRESS_VERSION}: new trials would not be comparable with "
                        "its old ones; submit a new study")
    write_job_file(spec, trials, options)
    return _run(ctx, study, trials, options, requeued=requeue_interrupted(study))


def write_job_file(spec: JobSpec, trials: int, options: RunOptions) -> Path:
    """RESULTS/STUDY/job.yaml: the study's spec and how it ran, under the submit flags' names, so that
    `submit --config` re-runs or shares it."""
    job = {**spec.to_dict(), "trials": trials, "workers": options.workers, "cpus_per_worker": options.cpus_per_worker,
           "gpus_per_worker": options.gpus_per_worker}
    if options.worker_resources:
        job["worker_resources"] = json.dumps(options.worker_resources)
    path = Path(options.results_dir) / spec.study / JOB_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _run(ctx: JobContext, study: optuna.Study, trials: int, options: RunOptions, requeued: list[int]) -> pd.DataFrame:
    done = done_count(study)
    if trials < done:
        raise UserError(f"study {ctx.spec.study!r} has {done} trials done already; --trials is the total to reach: "
                        f"give more than {done}")
    study.set_user_attr(TARGET_ATTR, trials)
    if options.on_ready:
        options.on_ready(ctx, study, requeued)
    if done_count(study) >= trials and not plans_to_distill(study, ctx.spec):
        return write_results(study, options.results_dir)
    return run_study(ctx, study, trials, options.workers, options.results_dir, options.cpus_per_worker,
                     options.address, options.on_trial, options.on_status, options.cache_dir,
                     gpus_per_worker=options.gpus_per_worker, worker_resources=options.worker_resources,
                     on_progress=options.on_progress)


def status(study_name: str, options: RunOptions) -> dict:
    """Trial counts by state, the target, whether a driver is running, and the best feasible trial."""
    study, spec = _open_existing(study_name, options)
    everything = trials_frame(study)
    trials = everything[everything["source"] == SEARCH_SOURCE]
    ranked = trials[trials["rank"].notna()]
    return {
        "study": study_name, "spec": spec, "target": study.user_attrs.get(TARGET_ATTR), "done": done_count(study),
        "states": trials["state"].value_counts().to_dict(), "driver": live_driver(study),
        "feasible": int((trials["feasible"] == True).sum()),  # noqa: E712
        "front": int(trials["on_front"].sum()), "base": study.user_attrs.get(BASE_METRICS_ATTR),
        "best": ranked.iloc[0].to_dict() if len(ranked) else None,
        "memory_budget_bytes": study.user_attrs.get("memory_budget_bytes"),
        "base_bytes": study.user_attrs.get("base_bytes"), "references": len(everything) - len(trials),
    }


def leaderboard(study_name: str, options: RunOptions, top: int = 10) -> pd.DataFrame:
    """The ranked completed trials (feasible front first), best `top` rows."""
    if top < 1:
        raise UserError(f"--top {top}: give how many rows to show, at least 1")
    study, _ = _open_existing(study_name, options)
    trials = trials_frame(study)
    return pd.concat([trials[trials["rank"].notna()].head(top), trials[trials["source"] != SEARCH_SOURCE]])


def evaluate(references: list, options: RunOptions, study_name: str | None = None, model: str | None = None,
             data: str | None = None, trust_remote_code: bool = False,
             on_status: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Score configurations users already have (`search.evaluate.Reference`s) with the study's evaluators
    and protocol, recorded beside its trials; without a study, with the default protocol on `model`."""
    from compsearch.search.evaluate import evaluate as score

    if study_name is None:
        spec = JobSpec(study="evaluate", model=model or DEFAULT_MODEL, data=data, trust_remote_code=trust_remote_code)
        return score(references, spec, options, None, on_status or log.info)
    study, spec = _open_existing(study_name, options)
    if model is not None and model != spec.model or data is not None and data != spec.data:
        raise UserError(f"study {study_name!r} scores {spec.model} on {spec.data or 'the default data'}: leave out "
                        "--model and --data (the study's protocol is used), or drop --study")
    check_writable(options.results_dir)
    return score(references, spec, options, study, on_status or log.info)


def report(study_name: str, options: RunOptions, out_dir: Path | None = None) -> Path:
    """The study's HTML report and figures (`compsearch.report`) in `out_dir` (default RESULTS/STUDY/report)."""
    from compsearch.report import write_report

    study, _ = _open_existing(study_name, options)
    out_dir = Path(out_dir) if out_dir else Path(options.results_dir) / study_name / "report"
    check_writable(out_dir)
    return write_report(study, out_dir)


def dashboard(study_name: str, options: RunOptions, host: str = "127.0.0.1", port: int = 8080,
              on_ready: Callable[[str], None] | None = None) -> None:
    """Serve optuna-dashboard for the study's storage on `host`:`port` (0: any free port) until interrupted;
    `on_ready` gets the study's address once the server listens."""
    from compsearch.search.dashboard import serve_dashboard

    _open_existing(study_name, options)  # refuses a study that is not there
    serve_dashboard(open_storage(options.storage_url(study_name)), study_name, host, port, on_ready or log.info)


def export(study_name: str, rank: int, out_dir: Path, options: RunOptions, checkpoint: bool = False,
           verify: bool = False, distill: DistillSettings | None = None,
           on_status: Callable[[str], None] | None = None, export_format: str = "compsearch",
           gguf_template: Path | None = None, overwrite: bool = False) -> dict:
    """Write the plan ranked `rank` (and with `checkpoint` the compressed model) to `out_dir`.

    With `distill`, the checkpoint's model is first distilled from the base model on the study's
    calibration split (`compress.distill`); its perplexity before and after, on the evaluation
    split, goes to export.json and to the study (`distilled_ppl` in the trials table).
    `export_format` `gguf` writes a .gguf file llama.cpp runs to `out_dir` (a file path), and
    `llama-quantize` the `--tensor-type-file` that makes the same mix with llama.cpp's quantizer, and
    `compressed-tensors` a checkpoint folder vLLM and transformers load (symmetric integer plans).
    Files already at `out_dir` are written over only with `overwrite`. With `verify`, what was written
    is loaded again and scored: `verified` says whether it reproduced the trial (`VERIFY_TOLERANCE`).
    """
    if export_format not in EXPORT_FORMATS:
        raise UserError(f"--format {export_format!r} is unknown; choose one of {EXPORT_FORMATS}")
    if distill is not None and not checkpoint:
        raise UserError("distillation changes the model's weights: add --checkpoint to keep them")
    if export_format == "compressed-tensors":
        return _export_compressed_tensors(study_name, rank, Path(out_dir), options, verify, overwrite)
    if export_format != "compsearch":
        return _export_for_llamacpp(study_name, rank, Path(out_dir), options, verify, export_format, gguf_template,
                                    on_status or log.info, overwrite)
    study, spec = _open_existing(study_name, options)
    plan, ranked = _ranked_plan(trials_frame(study), study_name, rank)
    out_dir = Path(out_dir)
    check_out(out_dir, folder=True, overwrite=overwrite)
    check_writable(out_dir)
    summary = {"study": study_name, **ranked, "spec": spec.to_dict(), "protocol": study.user_attrs.get("protocol")}
    (out_dir / "plan.json").write_text(plan.to_json() + "\n")
    if checkpoint:
        summary.update(_export_checkpoint(spec, plan, out_dir, options, verify, distill, on_status or log.info,
                                          ranked["threads"]))
    if "checkpoint_ppl" in summary:  # a distilled checkpoint must reproduce the distilled model
        _verdict(summary, "checkpoint_ppl", summary.get("distilled_ppl", summary["metrics"]["ppl"]), "compsearch")
    if "distilled_ppl" in summary:
        study.set_user_attr(f"{DISTILLED_ATTR}:{summary['trial']}", storable({
            key: summary[key] for key in DISTILLED_COLUMNS if key in summary}))
        write_results(study, options.results_dir)
    (out_dir / "export.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _export_compressed_tensors(study_name: str, rank: int, out_dir: Path, options: RunOptions, verify: bool,
                               overwrite: bool) -> dict:
    """The ranked plan as a compressed-tensors checkpoint (`compress.ct_export`)."""
    from compsearch.compress.ct_export import (
        CompressedTensorsExportError, check_exportable, checkpoint_nbytes, export_compressed_tensors, load_checkpoint,
    )

    spec, ctx, plan, summary = _export_target(study_name, rank, out_dir, options, "compressed-tensors", overwrite)
    evaluator = _export_evaluator(spec, ctx)
    try:
        check_exportable(evaluator.model, plan)
        model, stored = _compressed_as_trial(evaluator, plan, summary["threads"])
        export_compressed_tensors(model, plan, stored, out_dir, load_tokenizer(ctx.model_ref, spec.trust_remote_code))
    except CompressedTensorsExportError as err:
        raise UserError(str(err)) from None
    summary.update(checkpoint_bytes=checkpoint_nbytes(out_dir), plan_bytes=ctx.plan_bytes(plan))
    if verify:
        loaded = load_checkpoint(out_dir, spec.trust_remote_code)
        summary["checkpoint_ppl"] = perplexity_and_kl(loaded, ctx.windows.eval_ids, spec.batch_size)["ppl"]
        _verdict(summary, "checkpoint_ppl", summary["metrics"]["ppl"], "compressed-tensors")
    (out_dir / "plan.json").write_text(plan.to_json() + "\n")
    (out_dir / "export.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _export_target(study_name: str, rank: int, out: Path, options: RunOptions, export_format: str,
                   overwrite: bool) -> tuple[JobSpec, JobContext, Plan, dict]:
    """The study's spec and job, the ranked plan and the export's summary so far, once `out` (a folder
    for compressed-tensors, else a file) is known to be free (or `overwrite`) and writable."""
    study, spec = _open_existing(study_name, options)
    plan, summary = _ranked_plan(trials_frame(study), study_name, rank)
    summary.update(study=study_name, format=export_format, out=str(out))
    folder = export_format == "compressed-tensors"
    check_out(out, folder=folder, overwrite=overwrite)
    check_writable(out if folder else out.parent)
    return spec, prepare_job(spec, options.cache_dir), plan, summary


def _verdict(summary: dict, measured: str, expected: float, export_format: str) -> None:
    """Record whether the reloaded export's perplexity `summary[measured]` reproduces `expected`."""
    gap = abs(summary[measured] - expected) / expected
    summary.update(verified=bool(gap <= VERIFY_TOLERANCE[export_format]), verify_gap=gap)


def _ranked_plan(trials: pd.DataFrame, study_name: str, rank: int) -> tuple[Plan, dict]:
    """The plan ranked `rank` in the study's `trials` table and its row's metrics."""
    ranked = trials[trials["rank"] == rank]
    if ranked.empty:
        count = int(trials["rank"].notna().sum())
        raise UserError(f"--rank {rank} does not exist: study {study_name!r} has {count} ranked trials (1..{count})")
    row = ranked.iloc[0]
    metrics = {key: _plain(row[key]) for key in ("ppl", "kl", "memory_bytes", "bits_per_weight", "latency_ms")}
    threads = _plain(row["threads"]) if "threads" in row else None  # None: a trial from before it was recorded
    return Plan.from_json(row["plan_json"]), {"trial": int(row["trial"]), "rank": rank, "metrics": metrics,
                                              "threads": int(threads) if threads else None}


def _export_for_llamacpp(study_name: str, rank: int, out_path: Path, options: RunOptions, verify: bool,
                         export_format: str, template: Path | None, say: Callable[[str], None], overwrite: bool) -> dict:
    """A .gguf file (`gguf`) or llama-quantize's tensor types (`llama-quantize`) for the ranked plan."""
    from compsearch.compress.gguf_export import GGUFExportError, llama_quantize_types

    spec, ctx, plan, summary = _export_target(study_name, rank, out_path, options, export_format, overwrite)
    template = study_gguf_template(spec, template)
    if export_format == "llama-quantize":
        try:
            out_path.write_text(llama_quantize_types(meta_model(load_config(ctx.model_ref)), plan, template))
        except GGUFExportError as err:
            raise UserError(str(err)) from None
        return summary
    return _write_gguf_files(spec, ctx, [(plan, summary, out_path)], template, verify, say)[0]


def export_front(study_name: str, out_dir: Path, options: RunOptions, verify: bool = False,
                 template: Path | None = None, on_status: Callable[[str], None] | None = None,
                 overwrite: bool = False) -> list[dict]:
    """Every plan of the study's feasible Pareto front as a .gguf file in `out_dir`
    (`rankNN-trialNNN.gguf`, and `front.json` with each file's summary): the base model is loaded once
    and layers shared by several plans are compressed once."""
    say = on_status or log.info
    study, spec = _open_existing(study_name, options)
    trials = trials_frame(study)
    front = trials[trials["on_front"] & (trials["feasible"] == True)].sort_values("rank")  # noqa: E712
    if front.empty:
        raise UserError(f"study {study_name!r} has no feasible Pareto front yet: run trials first")
    out_dir = Path(out_dir)
    check_out(out_dir, folder=True, overwrite=overwrite)
    check_writable(out_dir)
    items = []
    for rank, trial in zip(front["rank"].astype(int), front["trial"].astype(int)):
        plan, summary = _ranked_plan(trials, study_name, rank)
        out_path = out_dir / f"rank{rank:02d}-trial{trial:03d}.gguf"
        items.append((plan, {**summary, "study": study_name, "format": "gguf", "out": str(out_path)}, out_path))
    ctx = prepare_job(spec, options.cache_dir)
    summaries = _write_gguf_files(spec, ctx, items, study_gguf_template(spec, template), verify, say,
                                  options.on_progress)
    (out_dir / "front.json").write_text(json.dumps(summaries, indent=1, default=str) + "\n")
    return summaries


def _write_gguf_files(spec: JobSpec, ctx: JobContext, items: list[tuple[Plan, dict, Path]], template: Path | None,
                      verify: bool, say: Callable[[str], None],
                      on_progress: Callable[[str, int, int], None] | None = None) -> list[dict]:
    """Write each (plan, summary, path) as a .gguf file with one evaluator; the summaries, completed."""
    from compsearch.compress.gguf_export import GGUFExportError, export_gguf

    evaluator = _export_evaluator(spec, ctx)
    for index, (plan, summary, out_path) in enumerate(items):
        if on_progress is not None:
            on_progress("GGUF files", index, len(items))
        try:
            model, stored = _compressed_as_trial(evaluator, plan, summary["threads"])
            say(f"writing {out_path}")
            export_gguf(model, plan, stored, out_path, template, Path(ctx.model_ref))
        except GGUFExportError as err:
            raise UserError(str(err)) from None
        summary.update(file_bytes=out_path.stat().st_size, plan_bytes=ctx.plan_bytes(plan))
        if verify:
            from compsearch.evaluators.llamacpp import LlamaCppMissing, llamacpp_perplexity_and_kl

            say(f"measuring {out_path.name}'s perplexity in llama.cpp on the study's evaluation windows")
            try:
                summary["llamacpp_ppl"] = llamacpp_perplexity_and_kl(out_path, ctx.windows.eval_ids)["ppl"]
            except LlamaCppMissing as err:
                raise UserError(str(err)) from None
            _verdict(summary, "llamacpp_ppl", summary["metrics"]["ppl"], "gguf")
    if on_progress is not None:
        on_progress("GGUF files", len(items), len(items))
    return [summary for _, summary, _ in items]


def _export_evaluator(spec: JobSpec, ctx: JobContext) -> TrialEvaluator:
    """The base model, ready to compress a plan for export (no KL, no latency)."""
    settings = WorkerSettings(batch_size=spec.batch_size, with_kl=False, trust_remote_code=spec.trust_remote_code)
    return TrialEvaluator(ctx.model_ref, ctx.windows.eval_ids, ctx.windows.calib_ids, settings)


def _compressed_as_trial(evaluator: TrialEvaluator, plan: Plan, threads: int | None):
    """The compressed model and its stored matrices, compressed on as many torch `threads` as the trial's
    worker used: float sums, hence GPTQ's rounding, depend on the thread count, and the export must hold
    the very codes the trial measured."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return evaluator.compressed_model(plan, keep_stored=True)
    finally:
        torch.set_num_threads(before)


def _export_checkpoint(spec: JobSpec, plan: Plan, out_dir: Path, options: RunOptions, verify: bool,
                       distill: DistillSettings | None, say: Callable[[str], None], threads: int | None) -> dict:
    ctx = prepare_job(spec, options.cache_dir)
    evaluator = _export_evaluator(spec, ctx)
    model, stored = _compressed_as_trial(evaluator, plan, threads)
    result = {}
    if distill is not None:
        result.update(_distill(evaluator, model, stored, distill, say))
    path = save_compressed(model, plan, stored, out_dir, load_tokenizer(ctx.model_ref, spec.trust_remote_code))
    result.update(checkpoint=str(path), checkpoint_bytes=path.stat().st_size, plan_bytes=ctx.plan_bytes(plan))
    if verify:
        loaded, _ = load_compressed(out_dir, spec.trust_remote_code)
        result["checkpoint_ppl"] = perplexity_and_kl(loaded, ctx.windows.eval_ids, spec.batch_size)["ppl"]
    return result


def _distill(evaluator: TrialEvaluator, model, stored: dict, settings: DistillSettings,
             say: Callable[[str], None]) -> dict:
    """Distill the compressed `model` from the evaluator's base model; its perplexity before and after."""
    every = max(1, settings.steps // 10)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == settings.steps:
            say(f"distillation step {step}/{settings.steps}: KL to the base model {loss:.4f}")

    result = evaluator.distill(model, stored, settings, progress)
    if result["distilled_ppl"] >= result["ppl_before_distill"]:
        say(f"warning: distillation did not help (perplexity {result['ppl_before_distill']:.3f} -> "
            f"{result['distilled_ppl']:.3f}); export without --distill-steps, or try a lower --distill-lr")
    return {**result, "distill_settings": dataclasses.asdict(settings)}


def _open_existing(study_name: str, options: RunOptions) -> tuple[optuna.Study, JobSpec]:
    url = options.storage_url(study_name)
    if options.storage is None and not (Path(options.results_dir) / study_name / "study.db").exists():
        raise UserError(f"no study {study_name!r} under {options.results_dir}/ (looked for "
                        f"{options.results_dir}/{study_name}/study.db); check --study, --results-dir or --storage")
    return load_study(study_name, open_storage(url))


def _exists_message(spec: JobSpec, old: JobSpec) -> str:
    new, before = spec.to_dict(), old.to_dict()
    changed = [key for key in new if new[key] != before.get(key)]
    if not changed:
        return (f"study {spec.study!r} already exists; continue it with `compsearch resume --study {spec.study} "
                f"--trials N`, or pass --force to start it over")
    diffs = ", ".join(f"{key}: {before.get(key)!r} -> {new[key]!r}" for key in changed[:4])
    return (f"study {spec.study!r} already exists with a different spec ({diffs}); pick another --study, "
            f"or pass --force to delete it and start over")


def _remove_tables(folder: Path) -> None:
    for name in (TRIALS_FILE, LAYERS_FILE, PARETO_FILE, JOB_FILE):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / BEST_DIR, ignore_errors=True)


def _check_counts(trials: int, options: RunOptions) -> None:
    if trials < 1:
        raise UserError(f"--trials {trials}: give the number of trials to reach, at least 1")
    if options.workers < 1 or options.cpus_per_worker < 1:
        raise UserError(f"--workers {options.workers} / --cpus-per-worker {options.cpus_per_worker}: both must be >= 1")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if options.address is None and options.workers * options.cpus_per_worker > cpus:
        raise UserError(f"--workers {options.workers} x --cpus-per-worker {options.cpus_per_worker} needs "
                        f"{options.workers * options.cpus_per_worker} CPUs; this machine has {cpus}: use "
                        f"--workers {max(1, cpus // options.cpus_per_worker)} or more with --address of a Ray cluster")
    if not 0 <= options.gpus_per_worker:
        raise UserError(f"--gpus-per-worker {options.gpus_per_worker}: give 0 (CPU), a fraction like 0.5, or whole GPUs")
    bad = {name: amount for name, amount in (options.worker_resources or {}).items()
           if not isinstance(amount, (int, float)) or amount < 0}
    if bad:
        raise UserError(f"--worker-resources {bad}: amounts must be non-negative numbers, e.g. '{{\"node_b\": 1}}'")


def _plain(value):
    return None if value is None or pd.isna(value) else value.item() if hasattr(value, "item") else value
