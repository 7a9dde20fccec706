"""The first trials of a study: uniform baselines, and the best plans the sensitivity profile predicts per budget."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from compsearch.compress import layer_nbytes
from compsearch.search.calibration import Calibration
from compsearch.search.front import base_ppl_of, hypervolume_gain, measured_front, pareto, ppl_limit, predicted_ppl
from compsearch.search.job import JobContext
from compsearch.search.sensitivity import Profile
from compsearch.spaces.knobs import FLOAT_METHOD, KNOBS
from compsearch.spaces.layers import LayerInfo
from compsearch.spaces.plan import LayerPlan

log = logging.getLogger(__name__)
SEEDED_ATTR = "seeded"  # the profile's seeds are enqueued (and, in studies from before them, the uniform ones)
UNIFORM_SEEDED_ATTR = "seeded_uniform"
PRESET_SEED = "preset:"  # a seed that is llama.cpp's mix for a preset: its `seed` is e.g. preset:Q4_K_M
# Uniform seeds of a guided study: the first answers, while the profile is measured. More cost trials the
# profile's seeds use better: in a 32-trial quant study the third and fourth added 0.00 and 0.04 to the
# hypervolume, each profile seed 0.03-0.8 (benchmarks/search.py, seed 0).
GUIDED_UNIFORM_SEEDS = 2
DP_UNITS = 4096  # byte resolution of the knapsack: 1/4096 of the compressible layers' largest size


@dataclass(frozen=True)
class Option:
    """One choice for one group: the bytes its layers take and the profile's KL estimate."""

    choice: dict[str, Any]
    nbytes: int
    estimate: float


def group_options(ctx: JobContext, profile: Profile) -> dict[str, list[Option]]:
    """Every choice of every group, with exact bytes and estimated damage; dominated choices dropped.

    A choice is dominated when another takes no more bytes and is estimated to do no more damage.
    """
    options = {}
    for group, members in ctx.space.groups(ctx.layers).items():
        every = [Option(choice, group_nbytes(ctx, members, choice), profile.group_estimate(group, choice))
                 for choice in ctx.space.uniform_choices()]
        every.sort(key=lambda o: (o.nbytes, o.estimate))
        kept: list[Option] = []
        for option in every:  # ascending bytes: keep only strict improvements in the estimate
            if not kept or option.estimate < kept[-1].estimate:
                kept.append(option)
        options[group] = kept
    return options


def group_nbytes(ctx: JobContext, members: list[LayerInfo], choice: dict[str, Any]) -> int:
    """Bytes of a group's layers under one choice."""
    return sum(layer_nbytes(layer, ctx.space.layer_plan(layer, choice)) for layer in members)


class Knapsack:
    """Least summed estimate per layer budget: a multiple-choice knapsack solved once by dynamic
    programming over bytes rounded to 1/4096 of the largest plan, then read for any budget."""

    def __init__(self, options: dict[str, list[Option]]):
        self.options, self.groups = options, list(options)
        self.unit = max(1.0, sum(max(o.nbytes for o in options[g]) for g in self.groups) / DP_UNITS)
        self.best = np.zeros(DP_UNITS + 1)  # least estimate with a table size of at most `room` units
        self.picks = []
        for group in self.groups:
            candidates = np.full((len(options[group]), DP_UNITS + 1), np.inf)
            for index, option in enumerate(options[group]):
                weight = int(round(option.nbytes / self.unit))
                candidates[index, weight:] = self.best[: DP_UNITS + 1 - weight] + option.estimate
            self.picks.append(candidates.argmin(axis=0))
            self.best = candidates.min(axis=0)

    def plan(self, budget_bytes: int) -> dict[str, dict] | None:
        """The best choices within `budget_bytes` (checked in exact bytes), or None if nothing fits."""
        levels = self.levels(budget_bytes)
        return None if levels is None else {group: self.options[group][level].choice for group, level in levels.items()}

    def levels(self, budget_bytes: float) -> dict[str, int] | None:
        """The best option (its index in `options`) of every group within `budget_bytes`, or None."""
        # rounding moves a plan's table size by up to half a unit per group: search the rooms around
        # the budget, from the top, for the first plan whose exact size fits
        for room in range(min(DP_UNITS, int(round(budget_bytes / self.unit)) + len(self.groups)), -1, -1):
            if np.isfinite(self.best[room]):
                levels, size = self._backtrack(room)
                if size <= budget_bytes:
                    return levels
        return None

    def steps(self, low_bytes: float, high_bytes: float) -> list[tuple[int, float]]:
        """(table bytes, least estimate) of every budget in [low, high] where spending more bytes lowers
        the estimate."""
        steps: list[tuple[int, float]] = []
        for room in range(max(0, int(low_bytes / self.unit)), min(DP_UNITS, int(high_bytes / self.unit)) + 1):
            estimate = self.best[room]
            if np.isfinite(estimate) and (not steps or estimate < steps[-1][1]):
                steps.append((int(room * self.unit), float(estimate)))
        return steps

    def _backtrack(self, room: int) -> tuple[dict[str, int], int]:
        levels, size = {}, 0
        for group, pick in zip(reversed(self.groups), reversed(self.picks)):
            option = self.options[group][pick[room]]
            levels[group] = int(pick[room])
            size += option.nbytes
            room -= int(round(option.nbytes / self.unit))
        return levels, size


def seed_uniform(ctx: JobContext, study: optuna.Study, trials: int) -> list[str]:
    """Enqueue the uniform seed plans once per study; they need no profile, so they are a study's first
    trials and its first answers. Returns the kinds of those enqueued (see `_enqueue`).

    A study of GGUF types starts from llama.cpp's presets instead (`preset_seed_choices`): the mixes
    users already run, each measured with the study's rounding at the preset's own size."""
    if not ctx.spec.uniform_seeds or any(study.user_attrs.get(a) for a in (UNIFORM_SEEDED_ATTR, SEEDED_ATTR)):
        return []
    seeds = [(PRESET_SEED + name, choices) for name, choices in
             preset_seed_choices(ctx, max(GUIDED_UNIFORM_SEEDS, trials // 4))]
    if not seeds:
        groups = list(ctx.space.groups(ctx.layers))
        wanted = min(max(1, trials // 8), trials, GUIDED_UNIFORM_SEEDS if ctx.spec.guided else trials)
        seeds = [("uniform", {group: choice for group in groups})
                 for choice in uniform_seed_choices(ctx, wanted, ctx.spec.guided)]
    enqueued = _enqueue(study, ctx, seeds)
    study.set_user_attr(UNIFORM_SEEDED_ATTR, True)
    return enqueued


def preset_seed_choices(ctx: JobContext, count: int) -> list[tuple[str, dict[str, dict]]]:
    """(preset, per-group choices) for up to `count` of llama.cpp's presets (`gguf_presets`), the largest
    within the memory budget, smallest first; empty unless the space searches GGUF types alone. A preset
    is left out where the space cannot hold its mix (a type not offered; a group whose tensors it types
    apart, e.g. one type per block) or where it repeats the mix of a preset named before it."""
    from compsearch.compress.gguf_formats import GGUF_TYPES, gguf_type
    from compsearch.compress.gguf_presets import PRESETS, preset_types

    offered = ctx.space.knobs()
    if list(offered) != ["quant_method"] or not set(offered["quant_method"]) <= {*GGUF_TYPES, FLOAT_METHOD}:
        return []
    groups = ctx.space.groups(ctx.layers)
    sized: dict[str, tuple[int, str, dict]] = {}
    for preset in PRESETS:
        types = preset_types(preset, ctx.layers, ctx.tied_embeddings)
        choices = {group: {"quant_method": types[members[0].name]} for group, members in groups.items()}
        plan = ctx.space.plan_for(choices, ctx.layers)
        expressible = all(choice["quant_method"] in offered["quant_method"] for choice in choices.values()) and all(
            gguf_type(layer, plan[layer.name]) == types[layer.name] for layer in ctx.layers)
        size = ctx.plan_bytes(plan)
        if expressible and (ctx.memory_budget_bytes is None or size <= ctx.memory_budget_bytes):
            sized.setdefault(json.dumps(choices, sort_keys=True), (size, preset, choices))
    largest = sorted(sized.values(), key=lambda item: item[0])[-count:] if count > 0 else []
    return [(preset, choices) for _, preset, choices in largest]


def seed_profile(ctx: JobContext, study: optuna.Study, profile: Profile | None, trials: int,
                 workers: int) -> None:
    """Enqueue the profile-optimal plans across the budget range once per study, each predicted within
    the quality floor (`budget_seeds`): with the uniform seeds, half the study's trials, and at least
    enough that every trial asked before the sampler's first generation is complete is a seed (where the
    floor leaves that many distinct plans): no random plan. Half, not a quarter: on the quant space
    (benchmarks/search.py, 3 seeds) the profile's plans added more hypervolume per trial than children of
    them, and a front seeded more densely also ends higher after 32 trials. The estimate is corrected by
    how far off it was on the trials already measured (the uniform seeds; `Calibration`): on `sota` it is
    2-3x low, and uncorrected, 5 of 14 seeds landed past the quality floor (3 of them collapsed).

    The first generation (NSGA-II's population, TPE's start-up trials) counts *completed* trials, so
    with `workers` trials in flight the sampler's own random draws would begin at trial
    population + workers - 1."""
    if study.user_attrs.get(SEEDED_ATTR):
        return
    if profile is not None:
        held = study.get_trials(deepcopy=False)
        seeded = sum(1 for trial in held if "seed" in trial.user_attrs)
        first_generation = ctx.spec.population_size + workers - 1
        count = max(trials // 2, min(first_generation, trials)) - seeded
        if count > 0:
            measured = [trial for trial in held if trial.state == optuna.trial.TrialState.COMPLETE]
            corrected = Calibration.fit([(profile.estimate(ctx.space.choices_of(trial.params, ctx.layers)),
                                          trial.user_attrs.get("kl")) for trial in measured])
            plans = budget_seeds(ctx, profile, count, measured_front(measured), base_ppl_of(study), corrected)
            _enqueue(study, ctx, [("profile", plan) for plan in plans])
    study.set_user_attr(SEEDED_ATTR, True)


def _enqueue(study: optuna.Study, ctx: JobContext, seeds: list[tuple[str, dict[str, dict]]]) -> list[str]:
    """Enqueue the seeds ((kind, per-group choices)) the study holds no trial of yet, in order; returns
    the kinds of those enqueued. The kind is the trial's `seed` (`uniform`, `profile`, `preset:Q4_K_M`)."""
    known = {json.dumps(trial.params, sort_keys=True, default=str) for trial in study.get_trials(deepcopy=False)}
    enqueued = []
    for kind, choices in seeds:
        params = ctx.space.params_for(choices)
        key = json.dumps(params, sort_keys=True, default=str)
        if key not in known:
            study.enqueue_trial(params, user_attrs={"seed": kind})
            known.add(key)
            enqueued.append(kind)
    return enqueued


def budget_seeds(ctx: JobContext, profile: Profile, count: int, front: list[tuple[float, float]] = (),
                 base_ppl: float = 1.0, corrected: Calibration = Calibration()) -> list[dict[str, dict]]:
    """Profile-optimal plans for up to `count` budgets between the smallest plan and the memory budget (or
    the largest plan), predicted within the quality floor, chosen one at a time for the most hypervolume
    their predicted points (bytes, `base_ppl` x e^KL) add to `front` (the measured (bytes, perplexity)
    front) and to the seeds chosen before them: seeds go where perplexity changes fastest with size, not
    where every plan is already near lossless.

    A seed's KL is the larger of its estimate and the estimate `corrected` by the study's measurements:
    a seed that lands past the floor is a wasted trial, one placed a little cautiously is not. (On
    `quant` the uniform seeds measured 0.78x their estimate while the smallest plans measured 1.0-1.15x:
    seeds placed by 0.78x went past the floor, and the hypervolume after 16 trials fell from 14.524 to
    14.462.)"""
    kept_bytes = ctx.unsearched_bytes()
    top = min(ctx.memory_budget_bytes or ctx.largest_plan_bytes, ctx.largest_plan_bytes)
    knapsack = Knapsack(group_options(ctx, profile))
    predicted = [(kept_bytes + table_bytes, max(estimate, corrected(estimate)))
                 for table_bytes, estimate in knapsack.steps(ctx.smallest_plan_bytes - kept_bytes, top - kept_bytes)]
    candidates = [(memory, predicted_ppl(base_ppl, kl)) for memory, kl in predicted
                  if ctx.spec.max_kl is None or kl <= ctx.spec.max_kl]
    bounds = (top * 1.01, ppl_limit(base_ppl, ctx.spec.max_ppl_ratio))
    front, plans = pareto(list(front)), {}
    while len(plans) < count and candidates:
        gains = [hypervolume_gain(front, memory, ppl, *bounds) for memory, ppl in candidates]
        best = int(np.argmax(gains))
        if gains[best] <= 0:
            break
        memory, ppl = candidates.pop(best)
        plan = knapsack.plan(memory - kept_bytes)
        if plan is not None:
            plans.setdefault(json.dumps(plan, sort_keys=True, default=str), (memory, plan))
        front = pareto(front + [(memory, ppl)])
    return [plan for _, plan in sorted(plans.values(), key=lambda item: item[0])]


def uniform_seed_choices(ctx: JobContext, count: int, upper_half: bool = False) -> list[dict]:
    """Choices for up to `count` plans where every layer uses one technique alike, spread over the sizes
    within the budget (with `upper_half`, over the upper half of them).

    These are the baselines users start from (uniform 4-bit, uniform 50% sparsity, ...). The lower half
    holds the settings that break a model (2 bits, 90% sparsity everywhere): a guided study leaves it
    to the profile's seeds, which place aggressive choices only where they do little damage. The
    uncompressed plan is left out: it is measured anyway.
    """
    sized = []
    for choice in ctx.space.uniform_choices():
        plan = ctx.space.plan(ctx.layers, choice)
        techniques = {techniques_used(lp) for lp in plan.layers.values()}
        if any(sum(used) > 1 for used in techniques) or not any(any(used) for used in techniques):
            continue
        size = ctx.plan_bytes(plan)
        if ctx.memory_budget_bytes is None or size <= ctx.memory_budget_bytes:
            sized.append((size, choice))
    sized.sort(key=lambda item: item[0])
    sized = sized[len(sized) // 2:] if upper_half else sized
    if count <= 0 or not sized:
        return []
    if count >= len(sized):
        return [choice for _, choice in sized]
    step = (len(sized) - 1) / max(1, count - 1)
    picks = sorted({round(len(sized) - 1 - i * step) for i in range(count)})
    return [sized[i][1] for i in picks]


def techniques_used(layer_plan: LayerPlan) -> tuple[bool, ...]:
    """For each technique that can be off (quantization, sparsity, low-rank, MLP channels, attention
    heads): whether the layer plan uses it."""
    return tuple(getattr(layer_plan, knob.name) != getattr(LayerPlan(), knob.name) for knob in KNOBS
                 if knob.off is not None)
