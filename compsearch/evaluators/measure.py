"""The per-worker measurements beyond perplexity: lm-eval tasks, real latency and its cost model.

`Measurements` is built once per worker next to the base model (it calibrates the latency cost model
on the base model once per device, cached on disk) and then measures each compressed model.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compsearch.evaluators.costmodel import LatencyCostModel
from compsearch.evaluators.kernels import timing_model
from compsearch.evaluators.latency import LatencySettings, measure_generation, measure_latency
from compsearch.evaluators.llamacpp_costmodel import LlamaCppCostModel
from compsearch.evaluators.tasks import TaskSuite, score_tasks
from compsearch.spaces.plan import Plan

log = logging.getLogger(__name__)


class Measurements:
    """Task scoring and latency (measured and predicted) of compressed copies of one base model."""

    def __init__(self, model: nn.Module, model_ref: str, tokenizer=None, *, suite: TaskSuite | None = None,
                 latency: LatencySettings | None = None, task_batch_size: int = 8, cache_dir: Path | None = None,
                 gguf: GGUFTarget | None = None, threads: int | None = None):
        self.tokenizer, self.suite, self.latency, self.task_batch_size = tokenizer, suite, latency, task_batch_size
        self.gguf, self.threads = gguf, threads
        self._manager = suite.task_manager() if suite is not None and suite.names else None
        self.cost_model = None
        if latency is not None and gguf is not None:
            self.cost_model = LlamaCppCostModel(model, model_ref, latency, gguf, threads, cache_dir)
        elif latency is not None:
            self.cost_model = LatencyCostModel(model, model_ref, latency, cache_dir)
            if not self.cost_model.calibrated:
                measure_latency(model, latency.prompt_tokens, repeats=1, warmup=1)  # first calls pay one-off costs
                self.cost_model.calibrate(measure_generation(model, latency))
                log.info("latency cost model calibrated and cached in %s", self.cost_model.path)

    @property
    def has_tasks(self) -> bool:
        return self._manager is not None

    def tasks(self, model: nn.Module) -> dict[str, float]:
        """`task_<name>_<metric>` of every task of the suite (empty without tasks)."""
        if not self.has_tasks:
            return {}
        return score_tasks(model, self.tokenizer, self.suite, self.task_batch_size, self._manager)

    def predicted_latency(self, plan: Plan) -> dict[str, float]:
        """The cost model's figures for `plan`, without running it (empty without latency settings)."""
        return self.cost_model.predict(plan) if self.cost_model is not None else {}

    def measured_latency(self, model: nn.Module, plan: Plan, stored: dict | None = None) -> dict:
        """Prefill and decode timings of `model` (compressed by `plan`) on the device's fast kernels, or,
        when timing GGUF files, of its .gguf in llama.cpp (`stored`: the matrices `apply_plan_` kept)."""
        if self.latency is None:
            return {}
        if self.gguf is not None:
            return self._llamacpp_latency(model, plan, stored)
        timed, kernels = timing_model(model, plan)
        metrics = measure_generation(timed, self.latency)
        metrics.update(kernels)
        return metrics

    def _llamacpp_latency(self, model: nn.Module, plan: Plan, stored: dict) -> dict:
        from compsearch.compress.gguf_export import export_gguf
        from compsearch.evaluators.llamacpp import llamacpp_latency

        with tempfile.TemporaryDirectory(prefix="compsearch-gguf-") as folder:
            path = export_gguf(model, plan, stored, Path(folder) / "trial.gguf", self.gguf.template,
                               self.gguf.tokenizer_dir)
            metrics = llamacpp_latency(path, self.latency, self.threads)
            metrics["gguf_file_bytes"] = path.stat().st_size
        return metrics


@dataclass(frozen=True)
class GGUFTarget:
    """Time plans as GGUF files in llama.cpp: the metadata template (or None: made from the tokenizer files)."""

    template: Path | None
    tokenizer_dir: Path
