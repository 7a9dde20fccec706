"""One worker's side of a study: hold the base model once, compress a copy per trial, measure it."""
from __future__ import annotations

import copy
import logging
import os
import socket
import time

import torch

from compress import apply_plan_, input_norms
from evaluators import base_log_probs, measure_latency, perplexity_and_kl
from search.models import load_model
from spaces.plan import Plan

log = logging.getLogger(__name__)


class TrialEvaluator:
    """Holds the base model and its cached calibration statistics; `evaluate` runs one plan.

    Plain Python: the Ray runner wraps it as an actor, tests and `export` use it directly.
    """

    def __init__(self, model_ref: str, eval_ids: torch.Tensor, calib_ids: torch.Tensor, *, batch_size: int,
                 with_kl: bool, with_latency: bool, latency_prompt_tokens: int = 64, threads: int | None = None,
                 trust_remote_code: bool = False, device: str = "cpu"):
        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(model_ref, trust_remote_code, device)
        self.eval_ids, self.calib_ids = eval_ids.to(device), calib_ids.to(device)
        self.batch_size, self.with_latency, self.latency_prompt_tokens = batch_size, with_latency, latency_prompt_tokens
        self.base = base_log_probs(self.model, self.eval_ids, batch_size) if with_kl else None
        self._input_norms: dict[str, torch.Tensor] | None = None
        self._svd_cache: dict[str, tuple[torch.Tensor, ...]] = {}  # filled as low-rank plans need them
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def input_norms(self, layer_names: list[str]) -> dict[str, torch.Tensor]:
        """Calibration input norms of every Linear, measured on first use and kept."""
        if self._input_norms is None:
            self._input_norms = input_norms(self.model, self.calib_ids, layer_names, self.batch_size)
        return self._input_norms

    def compressed_model(self, plan: Plan, keep_stored: bool = False):
        """A compressed copy of the base model (and its stored matrices when `keep_stored`)."""
        model = copy.deepcopy(self.model)
        wanda_layers = [name for name, lp in plan.layers.items() if lp.sparsity > 0 and lp.prune_method == "wanda"]
        norms = self.input_norms(self._linear_names()) if wanda_layers else None
        stored = apply_plan_(model, plan, norms, keep_stored=keep_stored, svd_cache=self._svd_cache)
        return model, stored

    def evaluate(self, plan_json: str) -> dict:
        """Metrics of one plan: `ppl` (and `kl`, `latency_ms` when asked), timings and the worker's name."""
        started = time.perf_counter()
        model, _ = self.compressed_model(Plan.from_json(plan_json))
        compressed = time.perf_counter()
        metrics = perplexity_and_kl(model, self.eval_ids, self.batch_size, self.base)
        if self.with_latency:
            metrics.update(measure_latency(model, self.latency_prompt_tokens))
        metrics.update(compress_s=compressed - started, evaluate_s=time.perf_counter() - compressed, worker=self.worker)
        return metrics

    def _linear_names(self) -> list[str]:
        return [name for name, module in self.model.named_modules() if isinstance(module, torch.nn.Linear)]
