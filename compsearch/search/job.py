"""Preparing a job before any trial: the model's layers, the data, budgets, and what the space can reach."""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compsearch.compress import COMPRESS_VERSION, layer_nbytes, plan_nbytes
from compsearch.evaluators.data import DataError, Windows, load_text, make_windows
from compsearch.evaluators.bigbench import TaskError
from compsearch.evaluators.metrics import is_task_metric
from compsearch.evaluators.tasks import TaskSuite, task_column
from compsearch.search.errors import UserError
from compsearch.search.models import check_weights, load_config, load_tokenizer, resolve_model, study_gguf_template
from compsearch.search.spec import JobSpec, parse_memory_budget
from compsearch.spaces.layers import (LayerInfo, count_params, embedding_layers, head_is_tied, linear_layers,
                                      meta_model)
from compsearch.spaces.plan import Plan
from compsearch.spaces.space import Space, SpaceError

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """What every part of a running job needs to know about the model, data and budgets."""

    spec: JobSpec
    model_ref: str
    space: Space
    layers: list[LayerInfo]
    total_params: int
    windows: Windows
    memory_budget_bytes: int | None
    smallest_plan_bytes: int
    largest_plan_bytes: int
    profile: Any = None  # the sensitivity profile, once measured (guided search)
    gguf_layout: Any = None  # with latency in llama.cpp, a plan's memory is its GGUF file's bytes
    tied_embeddings: bool = False  # the output head is the token embedding

    @property
    def base_bytes(self) -> int:
        """The model with every parameter at 16 bits: what budgets given as fractions refer to."""
        return self.total_params * 2

    def plan_bytes(self, plan: Plan) -> int:
        """The bytes of what the plan deploys as: its GGUF file (llama.cpp studies), else its checkpoint."""
        return plan_bytes(self.layers, plan, self.total_params, self.gguf_layout)

    def unsearched_bytes(self) -> int:
        """A plan's bytes outside its searched layers: what stays 16-bit in a checkpoint; in a GGUF file
        also its header, vocabulary and 32-bit norms (about 1.5 MB more on SmolLM2-135M)."""
        return self.plan_bytes(Plan()) - sum(layer.num_params for layer in self.layers) * 2

    def protocol(self) -> dict:
        """What a trial's numbers depend on besides its plan: the data protocol and the compression version."""
        return {**self.windows.protocol.to_dict(), "compress_version": COMPRESS_VERSION}

    def study_attrs(self) -> dict:
        return {"layers": [layer.to_dict() for layer in self.layers], "total_params": self.total_params,
                "base_bytes": self.base_bytes, "memory_budget_bytes": self.memory_budget_bytes,
                "latency_budget_ms": self.spec.latency_budget_ms, "protocol": self.protocol(),
                "model_ref": self.model_ref}


def prepare_job(spec: JobSpec, cache_dir: Path | None = None) -> JobContext:
    """Load what the job needs without loading weights, and refuse budgets no plan can meet."""
    model_ref = resolve_model(spec.model, cache_dir)
    config = load_config(model_ref, spec.trust_remote_code)
    check_weights(model_ref)
    skeleton = meta_model(config, spec.trust_remote_code)
    if spec.include_lm_head and head_is_tied(skeleton):
        raise UserError("--include-lm-head: this model's output head shares its weight with the input embeddings, "
                        "so it cannot be compressed on its own; leave the head out")
    space = spec.search_space()
    layers = linear_layers(skeleton, spec.include_lm_head) + (embedding_layers(skeleton) if space.embeddings else [])
    if not layers:
        raise UserError(f"model {spec.model!r} has no Linear layers to compress")
    try:
        space.check_layers(layers)
    except SpaceError as err:
        raise UserError(str(err)) from None
    check_task_objectives(spec, cache_dir)
    if spec.needs_latency and spec.latency_runtime == "llamacpp":
        from compsearch.evaluators.llamacpp import INSTALL_HINT, llamacpp_available

        if not llamacpp_available():
            raise UserError(f"latency in llama.cpp needs llama-cpp-python; {INSTALL_HINT}, or pass --runtime torch")
    tokenizer = load_tokenizer(model_ref, spec.trust_remote_code)
    try:
        text, source = load_text(spec.data)
        windows = make_windows(tokenizer, text, source, spec.seq_len, spec.eval_windows, spec.calib_windows)
    except DataError as err:
        raise UserError(str(err)) from None
    total_params = count_params(skeleton)
    layout = _gguf_layout(spec, skeleton, model_ref) if spec.latency_runtime == "llamacpp" else None
    smallest, largest = memory_range(space, layers, total_params, layout)
    budget = parse_memory_budget(spec.memory_budget, total_params * 2) if spec.memory_budget else None
    if budget is not None and budget < smallest:
        raise UserError(
            f"memory budget {spec.memory_budget} ({budget / 1e6:.1f} MB) is below the smallest plan in space "
            f"{spec.space!r}: {smallest / 1e6:.1f} MB ({smallest / (total_params * 2):.3f} of the 16-bit model); "
            "raise the budget or allow fewer bits, more sparsity or lower ranks")
    return JobContext(spec, model_ref, space, layers, total_params, windows, budget, smallest, largest,
                      gguf_layout=layout, tied_embeddings=head_is_tied(skeleton))


def check_task_objectives(spec: JobSpec, cache_dir: Path | None) -> None:
    """Refuse a task objective that none of the study's tasks produces (it would be missing from every trial)."""
    wanted = [name for name in spec.objectives if is_task_metric(name)]
    if not wanted:
        return
    try:
        names = TaskSuite(**spec.task_settings, cache_dir=cache_dir).names
    except TaskError as err:
        raise UserError(str(err)) from None
    prefixes = [task_column(name, "") + "_" for name in names]
    for objective in wanted:
        if not any(objective.startswith(prefix) for prefix in prefixes):
            raise UserError(f"objective {objective} is not produced by this study's tasks, whose columns are "
                            f"{', '.join(p + '<metric>' for p in prefixes)} (e.g. {prefixes[0]}acc); fix --objectives")


def plan_bytes(layers: list[LayerInfo], plan: Plan, total_params: int, gguf_layout=None) -> int:
    """A plan's bytes: its GGUF file's with a layout, else its checkpoint's (`compress.plan_nbytes`)."""
    if gguf_layout is not None:
        return gguf_layout.file_nbytes(layers, plan)
    return plan_nbytes(layers, plan, total_params)


def memory_range(space: Space, layers: list[LayerInfo], total_params: int, gguf_layout=None) -> tuple[int, int]:
    """Bytes of the smallest and largest plan the space can produce (each group chooses freely)."""
    choices = list(space.uniform_choices())
    groups = list(space.groups(layers).values())
    smallest, largest = {}, {}
    for members in groups:
        sizes = [(sum(layer_nbytes(m, space.layer_plan(m, c)) for m in members), c) for c in choices]
        smallest.update({m.name: space.layer_plan(m, min(sizes, key=lambda s: s[0])[1]) for m in members})
        largest.update({m.name: space.layer_plan(m, max(sizes, key=lambda s: s[0])[1]) for m in members})
    return (plan_bytes(layers, Plan(smallest), total_params, gguf_layout),
            plan_bytes(layers, Plan(largest), total_params, gguf_layout))


def _gguf_layout(spec: JobSpec, skeleton, model_ref: str):
    from compsearch.compress.gguf_export import GGUFExportError, gguf_file_layout

    template = study_gguf_template(spec)
    try:
        return gguf_file_layout(skeleton, template, Path(model_ref))
    except GGUFExportError as err:
        raise UserError(str(err)) from None


def check_out(path: Path, folder: bool, overwrite: bool) -> None:
    """Refuse to write an export over files already there, unless asked to (`overwrite`)."""
    path = Path(path)
    taken = path.is_dir() and any(path.iterdir()) if folder else path.exists()
    if taken and not overwrite:
        what = "is a folder with files in it" if folder else "exists"
        raise UserError(f"--out {str(path)!r} {what}; pass --force to write over it, or choose another --out")


def check_writable(folder: Path) -> None:
    """Refuse a results folder we cannot write into, before anything is started."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"results folder {str(folder)!r} is not writable ({err.strerror}); "
                        "pass --results-dir with a folder you can write to") from None
