"""One worker's side of a study: hold the base model once, compress a copy per trial, measure it."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import os
import socket
import time

from dataclasses import dataclass
from pathlib import Path

import torch

from compsearch.compress import InputStatistics, apply_plan_
from compsearch.compress.distill import DistillSettings, distill_
from compsearch.compress import COMPRESS_VERSION
from compsearch.compress.variants import VariantCache, VariantStore, variant_cache_bytes
from compsearch.evaluators.quality import base_log_probs, base_reference, perplexity_and_kl
from compsearch.evaluators.latency import LatencySettings
from compsearch.evaluators.measure import GGUFTarget, Measurements
from compsearch.evaluators.metrics import check_declared
from compsearch.evaluators.memory import PeakMemory, auto_batch_size
from compsearch.evaluators.tasks import TaskSuite
from compsearch.paths import default_cache_dir, variant_store_bytes
from compsearch.search.models import load_model, load_tokenizer, model_fingerprint, study_gguf_template
from compsearch.search.profiling import BlockReplay
from compsearch.search.spec import JobSpec
from compsearch.spaces.layers import count_params
from compsearch.spaces.plan import Plan

log = logging.getLogger(__name__)
PRUNE_FACTOR = 1.5  # margin over the latency budget before a predicted-slow plan is skipped (cost model error)


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker measures: everything but the model and the data windows.

    `batch_size` 0 picks one from free memory; `latency` None measures no latency; `tasks` holds the
    `TaskSuite` fields (tasks, task_paths, limit), scored on every trial when `tasks_each_trial`;
    `kl_top_k` None caches the full base distribution for KL; plans the latency cost model predicts
    over `PRUNE_FACTOR` x `latency_budget_ms` are not run.
    """

    batch_size: int = 0
    with_kl: bool = True
    latency: LatencySettings | None = None
    tasks: dict | None = None
    tasks_each_trial: bool = True
    kl_top_k: int | None = 1024
    latency_budget_ms: float | None = None
    threads: int | None = None
    trust_remote_code: bool = False
    device: str = "cpu"
    cache_dir: str | None = None  # None: `default_cache_dir()`
    variant_store_bytes: int | None = None  # None: `variant_store_bytes()`; 0 keeps no variants on disk
    latency_runtime: str = "torch"  # or "llamacpp": each plan is timed as a GGUF file in llama.cpp
    gguf_template: str | None = None  # the GGUF whose metadata those files copy

    @classmethod
    def for_job(cls, spec: JobSpec, **overrides) -> "WorkerSettings":
        """The settings a study's spec asks for; `overrides` (threads, device, ...) as the runner places it."""
        settings = cls(batch_size=spec.batch_size, with_kl=spec.needs_kl,
                       latency=LatencySettings(**spec.latency_settings) if spec.needs_latency else None,
                       tasks=spec.task_settings, tasks_each_trial=spec.tasks_on == "all",
                       kl_top_k=spec.kl_top_k or None, latency_budget_ms=spec.latency_budget_ms,
                       trust_remote_code=spec.trust_remote_code, latency_runtime=spec.latency_runtime)
        if settings.latency_runtime == "llamacpp" and settings.latency is not None:
            template = study_gguf_template(spec)
            settings = dataclasses.replace(settings, gguf_template=str(template) if template else None)
        return dataclasses.replace(settings, **overrides)


def variant_store(model_ref: str, calib_ids: torch.Tensor, settings: WorkerSettings) -> VariantStore | None:
    """The on-disk variants of this model compressed with these calibration windows on this kind of device
    (statistics measured elsewhere differ by float round-off), or None when the store is off."""
    max_bytes = settings.variant_store_bytes if settings.variant_store_bytes is not None else variant_store_bytes()
    if max_bytes <= 0:
        return None
    data_key = hashlib.sha256(calib_ids.cpu().numpy().tobytes()).hexdigest()[:16]
    device_type = torch.device(settings.device).type
    name = f"{model_fingerprint(model_ref)}-{data_key}-{device_type}-v{COMPRESS_VERSION}"
    return VariantStore(Path(settings.cache_dir or default_cache_dir()) / "variants" / name, max_bytes)


class TrialEvaluator:
    """Holds the base model and its cached calibration statistics; `evaluate` runs one plan.

    Plain Python: the Ray runner wraps it as an actor, tests and `export` use it directly.
    """

    def __init__(self, model_ref: str, eval_ids: torch.Tensor, calib_ids: torch.Tensor,
                 settings: WorkerSettings = WorkerSettings()):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.model = load_model(model_ref, settings.trust_remote_code, settings.device)
        self.device = settings.device
        self.eval_ids, self.calib_ids = eval_ids.to(self.device), calib_ids.to(self.device)
        self.batch_size = settings.batch_size or auto_batch_size(self.model, self.eval_ids.shape[1], self.device)
        # The base model's distributions on the evaluation windows (for KL) and its own quality, from one
        # forward pass: measured on first use, or given (`set_base_reference`) when the workers share them.
        self._base_reference: tuple[list, dict] | None = None
        tasks = settings.tasks
        suite = TaskSuite(**tasks, cache_dir=settings.cache_dir) \
            if tasks and (tasks.get("tasks") or tasks.get("task_paths")) else None
        tokenizer = load_tokenizer(model_ref, settings.trust_remote_code) if suite is not None else None
        gguf = GGUFTarget(Path(settings.gguf_template) if settings.gguf_template else None, Path(model_ref)) \
            if settings.latency_runtime == "llamacpp" else None
        self.measurements = Measurements(self.model, model_ref, tokenizer, suite=suite, latency=settings.latency,
                                         task_batch_size=self.batch_size, cache_dir=settings.cache_dir, gguf=gguf,
                                         threads=settings.threads)
        self.latency_budget_ms = settings.latency_budget_ms
        self._statistics: InputStatistics | None = None  # measured on first use, or given (`set_calibration`)
        self._svd_cache: dict[str, tuple[torch.Tensor, ...]] = {}  # SVDs, inverse-Hessian factors, as plans need them
        self.variants = VariantCache(variant_cache_bytes(count_params(self.model)),
                                     variant_store(model_ref, self.calib_ids, settings))
        self._profile: tuple | None = None  # profiling windows, their base log-probs, the block replay
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def base(self) -> list | None:
        """The base model's next-token distributions on the evaluation windows (None without KL)."""
        return self._reference()[0]

    @property
    def base_quality(self) -> dict[str, float] | None:
        """The base model's own `perplexity_and_kl` on the evaluation windows (None without KL)."""
        return self._reference()[1]

    def base_reference_share(self, start: int, end: int) -> tuple[list, dict[str, float]]:
        """`base_reference` of evaluation windows [start, end), on the CPU: this worker's share when the
        workers split the measurement."""
        chunks, quality = base_reference(self.model, self.eval_ids[start:end], self.batch_size, self.settings.kl_top_k)
        return [chunk.to("cpu") for chunk in chunks], quality

    def set_base_reference(self, reference: tuple[list, dict[str, float]]) -> None:
        """Use `reference` (`merged_references` of the shares) instead of measuring it here."""
        chunks, quality = reference
        self._base_reference = [chunk.to(self.device) for chunk in chunks], quality

    def _reference(self) -> tuple[list | None, dict[str, float] | None]:
        if not self.settings.with_kl:
            return None, None
        if self._base_reference is None:
            self.set_base_reference(self.base_reference_share(0, len(self.eval_ids)))
        return self._base_reference

    def calibration_share(self, start: int, end: int, with_hessians: bool) -> InputStatistics:
        """Input statistics of calibration windows [start, end) of every Linear but the output head, on the
        CPU: this worker's share when the workers split the measurement (`set_calibration`)."""
        return InputStatistics.measure(self.model, self.calib_ids[start:end], self._body_linears(), self.batch_size,
                                       with_hessians).to("cpu")

    def set_calibration(self, statistics: InputStatistics) -> None:
        """Use `statistics` (the workers' shares merged) instead of measuring them here (factors derived from
        statistics this worker measured before are dropped)."""
        self._statistics = statistics.to(self.device)
        self._svd_cache.clear()

    def statistics_for(self, plan: Plan) -> tuple[dict | None, dict | None]:
        """(input norms, input Hessians) as `plan` needs them (None where it does not), measured on first
        use and kept: norms alone where no plan so far needed Hessians (a cheaper pass); the output head's
        only when a plan compresses it. Inverse-Hessian factors and SVDs are kept in the SVD cache."""
        need_norms = [name for name, lp in plan.layers.items() if lp.needs_norms and self._is_linear(name)]
        need_hessians = [name for name, lp in plan.layers.items() if lp.needs_hessian and self._is_linear(name)]
        if not need_norms and not need_hessians:
            return None, None
        if self._statistics is None or (need_hessians and self._statistics.hessians is None):
            measured = InputStatistics.measure(self.model, self.calib_ids, self._body_linears(), self.batch_size,
                                               bool(need_hessians))
            if self._statistics is not None:  # norms some trials used already stay as they were
                measured.norms = self._statistics.norms
            self._statistics = measured
        statistics = self._statistics
        missing = [name for name in need_norms if name not in statistics.norms]
        missing += [name for name in need_hessians if name not in statistics.hessians]
        if missing:  # the output head
            extra = InputStatistics.measure(self.model, self.calib_ids, sorted(set(missing)), self.batch_size,
                                            statistics.hessians is not None)
            statistics.norms.update(extra.norms)
            if extra.hessians is not None:
                statistics.hessians.update(extra.hessians)
        return (statistics.norms if need_norms else None), (statistics.hessians if need_hessians else None)

    def compressed_model(self, plan: Plan, keep_stored: bool = False):
        """A compressed copy of the base model (and its stored matrices when `keep_stored`)."""
        model = copy.deepcopy(self.model)
        return model, self._compress_(model, plan, keep_stored).stored

    @contextlib.contextmanager
    def _base_with_plan(self, plan: Plan):
        """The base model itself with `plan` applied, restored on exit (whatever the plan's techniques
        changed): for plans touching few layers, cheaper than copying the whole model."""
        applied = self._compress_(self.model, plan, keep_stored=False, undoable=True)
        try:
            yield self.model
        finally:
            applied.edits.undo_(self.model)

    def _compress_(self, model, plan: Plan, keep_stored: bool, undoable: bool = False):
        norms, hessians = self.statistics_for(plan)
        store = self.variants.store
        writes = store.writes if store is not None else 0
        applied = apply_plan_(model, plan, norms, keep_stored=keep_stored, svd_cache=self._svd_cache,
                              hessians=hessians, undoable=undoable, variants=self.variants)
        if store is not None and store.writes > writes:
            store.trim()
        return applied

    def evaluate(self, plan_json: str) -> dict:
        """Metrics of one plan: `ppl` (and `kl`, task metrics, measured and predicted latency when asked),
        peak memory while evaluating, timings and the worker's name.

        A plan the latency cost model predicts over `PRUNE_FACTOR` x the latency budget is not run: its
        metrics say `pruned` (why) and hold only the prediction.
        """
        started = time.perf_counter()
        plan = Plan.from_json(plan_json)
        metrics = self.measurements.predicted_latency(plan)
        predicted = metrics.get("predicted_latency_ms")
        if self.latency_budget_ms and predicted and predicted > PRUNE_FACTOR * self.latency_budget_ms:
            metrics["pruned"] = (f"the latency cost model predicts {predicted:.1f} ms, over {PRUNE_FACTOR} x the "
                                 f"{self.latency_budget_ms:g} ms budget; not run")
            return {**metrics, "worker": self.worker}
        with PeakMemory(self.device) as peak:
            if plan.layers or not self._base_scored():
                model, stored = self.compressed_model(plan, keep_stored=self.measurements.gguf is not None)
                compressed = time.perf_counter()
                metrics.update(perplexity_and_kl(model, self.eval_ids, self.batch_size, self.base))
            else:  # the base model itself, whose quality was scored when this worker started
                model, stored, compressed = self.model, {}, time.perf_counter()
                metrics.update(self.base_quality)
            if self.settings.tasks_each_trial:
                metrics.update(self.measurements.tasks(model))
            metrics.update(self.measurements.measured_latency(model, plan, stored))
        metrics.update(peak.metrics)
        metrics.update(compress_s=compressed - started, evaluate_s=time.perf_counter() - compressed, worker=self.worker,
                       threads=torch.get_num_threads())
        check_declared(metrics)
        return metrics

    def _base_scored(self) -> bool:
        """Whether `evaluate` of the empty plan has nothing left to measure: the base model's quality is
        known and no task or timing is asked for (they would run on the worker's own model, which
        evaluation never touches: the full path runs them on a copy)."""
        tasks = self.settings.tasks_each_trial and self.measurements.has_tasks
        return self.base_quality is not None and not tasks and self.measurements.latency is None

    def predicted_latency_ms(self, plan_jsons: list[str]) -> list[float | None]:
        """The latency cost model's prefill milliseconds of each plan, without running any (None without
        latency settings)."""
        return [self.measurements.predicted_latency(Plan.from_json(plan_json)).get("predicted_latency_ms")
                for plan_json in plan_jsons]

    def score_tasks(self, plan_json: str) -> dict[str, float]:
        """Task metrics of one plan alone (for scoring only the final Pareto candidates)."""
        model, _ = self.compressed_model(Plan.from_json(plan_json))
        return self.measurements.tasks(model)

    def distilled(self, plan_json: str, steps: int | None = None) -> dict[str, float]:
        """One plan compressed and distilled for `steps` steps (None: the default) for a study's
        `--distill-top` (see `distill`)."""
        model, stored = self.compressed_model(Plan.from_json(plan_json), keep_stored=True)
        return self.distill(model, stored, DistillSettings(steps=steps) if steps else DistillSettings())

    def distill(self, model, stored: dict, settings: DistillSettings, on_step=None) -> dict[str, float]:
        """Distill the compressed `model` (with its `stored` matrices, updated in place) from the base model
        on the calibration windows (`compress.distill`): its perplexity and KL on the evaluation windows
        before and after, the steps, the last step's loss and the seconds the training took."""
        before = perplexity_and_kl(model, self.eval_ids, self.batch_size, self.base)
        started = time.perf_counter()
        losses = distill_(model, self.model, stored, self.calib_ids, settings, on_step)
        spent = time.perf_counter() - started
        after = perplexity_and_kl(model, self.eval_ids, self.batch_size, self.base)
        return {"ppl_before_distill": before["ppl"], "kl_before_distill": before.get("kl"),
                "distilled_ppl": after["ppl"], "distilled_kl": after.get("kl"), "distill_steps": settings.steps,
                "distill_final_loss": losses[-1], "distill_s": spent}

    def profile_kl(self, plan_jsons: list[str], windows: int, seq_len: int) -> list[float]:
        """KL to the base model of each plan on the first `seq_len` tokens of the first `windows`
        calibration windows (sensitivity profiling: many cheap measurements, one batch each)."""
        ids, base, replay = self._profiling(windows, seq_len)
        kls = []
        for plan_json in plan_jsons:
            plan = Plan.from_json(plan_json)
            with self._base_with_plan(plan) as model, replay.skipping(plan.layers):
                kl = perplexity_and_kl(model, ids, len(ids), base)["kl"]
            kls.append(max(0.0, kl))  # a compact base cache can put a near-zero KL slightly below 0
        return kls

    def profile_error(self, plan_jsons: list[str], windows: int, seq_len: int) -> list[float | None]:
        """Each plan's relative output error at the last decoder block it changes, on the same windows as
        `profile_kl` (`BlockReplay.output_error`: the changed blocks alone run); None where only the full
        forward pass shows the change."""
        ids, _, replay = self._profiling(windows, seq_len)
        errors = []
        for plan_json in plan_jsons:
            plan = Plan.from_json(plan_json)
            if replay.last_changed(plan.layers) is None:
                errors.append(None)
                continue
            with self._base_with_plan(plan) as model:
                errors.append(replay.output_error(model, ids, plan.layers))
        return errors

    def _profiling(self, windows: int, seq_len: int) -> tuple[torch.Tensor, list, BlockReplay]:
        """The profiling windows, the base model's log-probabilities on them and their block replay."""
        ids = self.calib_ids[:windows, :seq_len]
        if self._profile is None or self._profile[0].shape != ids.shape:
            self._profile = (ids, base_log_probs(self.model, ids, len(ids)), BlockReplay(self.model, ids))
        return self._profile

    def _body_linears(self) -> list[str]:
        """Every Linear but the output head (whose input statistics only a plan that compresses it needs)."""
        head = self.model.get_output_embeddings()
        return [name for name, module in self.model.named_modules()
                if isinstance(module, torch.nn.Linear) and module is not head]

    def _is_linear(self, name: str) -> bool:
        return isinstance(self.model.get_submodule(name), torch.nn.Linear)
