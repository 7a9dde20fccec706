"""`compsearch evaluate`: configurations users already have (a plan file, a uniform preset, a GGUF file)
scored with a study's evaluators and protocol, and recorded beside its trials as reference rows."""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from compsearch.compress import plan_bits_per_weight
from compsearch.search.errors import UserError
from compsearch.search.job import JobContext, prepare_job
from compsearch.search.models import load_config
from compsearch.search.results import REFERENCE_ATTR, SEARCH_SOURCE, storable, write_results
from compsearch.search.spec import JobSpec
from compsearch.search.trial import TrialEvaluator, WorkerSettings
from compsearch.spaces.plan import Plan, PlanError
from compsearch.spaces.uniform import PresetError, uniform_plan

log = logging.getLogger(__name__)
SOURCES = ("plan", "uniform", "gguf")  # what a reference configuration is given as


@dataclass(frozen=True)
class Reference:
    """A configuration to score: `source` says how it is given, `value` is the plan file, preset or GGUF file."""

    source: str
    value: str

    @property
    def name(self) -> str:
        """Its label in the tables: the preset as written, or the file's name."""
        return self.value if self.source == "uniform" else Path(self.value).name


def evaluate(references: list[Reference], spec: JobSpec, options, study=None,
             say: Callable[[str], None] = log.info) -> pd.DataFrame:
    """Score each reference with `spec`'s evaluators and protocol (those of `study` when given, whose
    tables then hold them as reference rows, replacing earlier ones of the same name); one row each."""
    if not references:
        raise UserError("nothing to evaluate: give --plan FILE.json, --uniform PRESET (e.g. rtn:4:g128) or --gguf FILE")
    ctx = prepare_job(spec, options.cache_dir)
    plans = {ref: _plan_of(ref, ctx) for ref in references if ref.source != "gguf"}  # every input checked first
    ggufs = [ref for ref in references if ref.source == "gguf"]
    for ref in ggufs:
        _check_gguf(Path(ref.value), ctx)
    threads = _study_threads(study)  # the evaluator computes on as many (float sums depend on it)
    say(f"loading {spec.model} to score {len(references)} configuration(s) on {len(ctx.windows.eval_ids)} "
        f"evaluation windows of {spec.seq_len} tokens")
    settings = WorkerSettings.for_job(spec, latency_budget_ms=None, tasks_each_trial=True, threads=threads,
                                      cache_dir=str(options.cache_dir) if options.cache_dir else None)
    evaluator = TrialEvaluator(ctx.model_ref, ctx.windows.eval_ids, ctx.windows.calib_ids, settings)
    records = []
    for ref in references:
        say(f"scoring {ref.source} {ref.name}")
        metrics = _score_gguf(Path(ref.value), ctx, evaluator) if ref.source == "gguf" \
            else _score_plan(plans[ref], ctx, evaluator)
        records.append({"source": ref.source, "name": ref.name, **storable(metrics)})
        if study is not None:
            study.set_user_attr(f"{REFERENCE_ATTR}:{ref.name}", records[-1])
    if study is None:
        return pd.DataFrame(records)
    trials = write_results(study, options.results_dir)
    return trials[trials["source"] != SEARCH_SOURCE]


def _plan_of(ref: Reference, ctx: JobContext) -> Plan:
    if ref.source == "uniform":
        try:
            return uniform_plan(ref.value, ctx.layers)
        except PresetError as err:
            raise UserError(f"--uniform: {err}") from None
    try:
        payload = json.loads(Path(ref.value).read_text())
        plan = Plan.from_json(json.dumps(payload.get("plan", payload)))  # plan.json, or a best/rank*.json
    except OSError as err:
        raise UserError(f"--plan {ref.value}: cannot be read ({err.strerror})") from None
    except (ValueError, KeyError, TypeError, AttributeError, PlanError) as err:
        raise UserError(f"--plan {ref.value}: not a compsearch plan ({err}); give a plan.json written by "
                        "`compsearch export` or a best/rank*.json of a study") from None
    unknown = sorted(set(plan.layers) - {layer.name for layer in ctx.layers})
    if unknown:
        raise UserError(f"--plan {ref.value}: its layers {unknown[:3]} are not compressible layers of {ctx.spec.model} "
                        "(a plan for another model, or for a space with other layers)")
    return plan


def _score_plan(plan: Plan, ctx: JobContext, evaluator: TrialEvaluator) -> dict:
    metrics = evaluator.evaluate(plan.to_json())
    return {**metrics, "plan_json": plan.to_json(), "memory_bytes": ctx.plan_bytes(plan),
            "bits_per_weight": plan_bits_per_weight(ctx.layers, plan)}


def _check_gguf(path: Path, ctx: JobContext) -> None:
    """Refuse a file that is not a GGUF of this model (another vocabulary or depth) before any work."""
    from gguf import GGUFReader

    try:
        tensors = {tensor.name: tensor for tensor in GGUFReader(str(path)).tensors}
    except OSError as err:
        raise UserError(f"--gguf {path}: cannot be read ({err.strerror})") from None
    except (ValueError, KeyError) as err:
        raise UserError(f"--gguf {path}: not a GGUF file ({err})") from None
    blocks = {name.split(".")[1] for name in tensors if name.startswith("blk.")}
    vocab = int(tensors["token_embd.weight"].shape[-1]) if "token_embd.weight" in tensors else None
    config = load_config(ctx.model_ref, ctx.spec.trust_remote_code)
    if vocab != config.vocab_size or len(blocks) != config.num_hidden_layers:
        raise UserError(f"--gguf {path}: holds {len(blocks)} blocks and a vocabulary of {vocab}; {ctx.spec.model} has "
                        f"{config.num_hidden_layers} and {config.vocab_size}: give a GGUF of the study's model")


def _score_gguf(path: Path, ctx: JobContext, evaluator: TrialEvaluator) -> dict:
    """The file in llama.cpp itself: perplexity and KL to the base model on the protocol's windows, its
    bytes, its Linears' bits per weight, and llama.cpp's latency when the study measures latency."""
    from compsearch.compress.gguf_export import gguf_linear_bits_per_weight
    from compsearch.evaluators.llamacpp import LlamaCppMissing, llamacpp_latency, llamacpp_perplexity_and_kl

    settings = evaluator.settings
    try:
        metrics = llamacpp_perplexity_and_kl(path, ctx.windows.eval_ids, settings.threads, evaluator.base)
        if settings.latency is not None:
            metrics.update(llamacpp_latency(path, settings.latency, settings.threads))
    except LlamaCppMissing as err:
        raise UserError(f"--gguf {path}: {err}") from None
    except ValueError as err:  # llama.cpp refused the file
        raise UserError(f"--gguf {path}: llama.cpp cannot load it ({err})") from None
    return {**metrics, "memory_bytes": path.stat().st_size, "gguf_file_bytes": path.stat().st_size,
            "bits_per_weight": gguf_linear_bits_per_weight(path)}


def _study_threads(study) -> int | None:
    """The torch threads the study's trials ran on (the most common), or None without a study or record."""
    if study is None:
        return None
    counts = Counter(trial.user_attrs["threads"] for trial in study.get_trials(deepcopy=False)
                     if "threads" in trial.user_attrs)
    return counts.most_common(1)[0][0] if counts else None
