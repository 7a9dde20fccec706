"""The (bytes, quality) front of a study and what a new point would add to it: seeds (in perplexity)
and guided children (in KL) both go where the front can gain the most hypervolume."""
from __future__ import annotations

import math

import optuna
from optuna.trial import FrozenTrial

from compsearch.search.study import BASE_METRICS_ATTR

FLOORLESS_PPL_RATIO = 3.0  # the hypervolume's perplexity bound, in base perplexities, without a quality floor


def base_ppl_of(study: optuna.Study) -> float:
    """The study's measured base perplexity, or 1.0 (a neutral scale: gains then rank by KL alone) while
    none is measured or when the base model itself diverged (stored as "inf" or "nan")."""
    ppl = study.user_attrs.get(BASE_METRICS_ATTR, {}).get("ppl")
    return ppl if positive(ppl) else 1.0


def ppl_limit(base_ppl: float, max_ppl_ratio: float | None) -> float:
    """The perplexity up to which gains count: the quality floor, or `FLOORLESS_PPL_RATIO` x the base's."""
    return base_ppl * (max_ppl_ratio or FLOORLESS_PPL_RATIO)


def kl_limit(max_ppl_ratio: float | None) -> float:
    """`ppl_limit` as a KL (log perplexity grows by about the KL to the base model)."""
    return math.log(ppl_limit(1.0, max_ppl_ratio))


def predicted_ppl(base_ppl: float, kl: float) -> float:
    """Perplexity from a KL estimate: log perplexity grows by about the KL to the base model."""
    return base_ppl * math.exp(kl)


def measured_front(trials: list[FrozenTrial], quality: str = "ppl") -> list[tuple[float, float]]:
    """(memory bytes, `quality`: perplexity or KL) of the completed trials that no other beats in both, by
    ascending bytes."""
    return pareto([(t.user_attrs["memory_bytes"], t.user_attrs[quality]) for t in trials
                   if t.state == optuna.trial.TrialState.COMPLETE and "memory_bytes" in t.user_attrs
                   and positive(t.user_attrs.get(quality))])


def hypervolume_gain(front: list[tuple[float, float]], memory: float, quality: float,
                     memory_bound: float, quality_bound: float) -> float:
    """The area that the point (memory, quality) adds to what `front` (`pareto`, in the same quality:
    perplexity or KL) dominates, up to (`memory_bound`, `quality_bound`)."""
    if memory >= memory_bound or quality >= quality_bound:
        return 0.0
    height = quality_bound  # where the front's dominated area starts, left of the current step
    for step_memory, step_quality in front:
        if step_memory <= memory:
            height = min(height, step_quality)
    gained, left = 0.0, memory
    for step_memory, step_quality in front:
        if memory < step_memory < memory_bound:
            gained += max(0.0, height - quality) * (step_memory - left)
            left, height = step_memory, min(height, step_quality)
    return gained + max(0.0, height - quality) * (memory_bound - left)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other beats in both, by ascending memory."""
    front: list[tuple[float, float]] = []
    for memory, ppl in sorted(points):
        if not front or ppl < front[-1][1]:
            front.append((memory, ppl))
    return front


def positive(value) -> bool:
    """A finite number above 0 (trial attributes hold non-finite metrics as the strings "nan", "inf")."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0
