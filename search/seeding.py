"""The first trials of a study: uniform baselines, and the best plans the sensitivity profile predicts per budget."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from compress import layer_nbytes
from search.job import JobContext
from search.sensitivity import Profile, group_plan
from spaces.layers import LayerInfo
from spaces.plan import Plan

log = logging.getLogger(__name__)
SEEDED_ATTR = "seeded"
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


def best_plans_for_budgets(options: dict[str, list[Option]], budgets_bytes: list[int]) -> list[dict[str, dict]]:
    """Per budget (bytes of the compressible layers), the choices minimizing the summed estimate.

    A multiple-choice knapsack solved by dynamic programming over bytes rounded to 1/4096 of the
    largest plan; each returned plan is checked in exact bytes and never exceeds its budget. Budgets
    no plan meets are skipped.
    """
    groups = list(options)
    unit = max(1.0, sum(max(o.nbytes for o in options[g]) for g in groups) / DP_UNITS)
    capacity = DP_UNITS
    best = np.zeros(capacity + 1)
    picks = []
    for group in groups:
        candidates = np.full((len(options[group]), capacity + 1), np.inf)
        for index, option in enumerate(options[group]):
            weight = int(round(option.nbytes / unit))
            candidates[index, weight:] = best[: capacity + 1 - weight] + option.estimate
        picks.append(candidates.argmin(axis=0))
        best = candidates.min(axis=0)
    plans = []
    for budget in budgets_bytes:
        # rounding moves a plan's table size by up to half a unit per group: search the rooms around
        # the budget, from the top, for the first plan whose exact size fits
        for room in range(min(capacity, int(round(budget / unit)) + len(groups)), -1, -1):
            if not np.isfinite(best[room]):
                continue
            choices, size = _backtrack(options, groups, picks, room, unit)
            if size <= budget:
                plans.append(choices)
                break
    return plans


def _backtrack(options: dict[str, list[Option]], groups: list[str], picks: list[np.ndarray], room: int,
               unit: float) -> tuple[dict[str, dict], int]:
    choices, size = {}, 0
    for group, pick in zip(reversed(groups), reversed(picks)):
        option = options[group][pick[room]]
        choices[group] = option.choice
        size += option.nbytes
        room -= int(round(option.nbytes / unit))
    return choices, size


def seed_study(ctx: JobContext, study: optuna.Study, profile: Profile | None, trials: int) -> int:
    """Enqueue the first trials once per study: profile-optimal plans across the budget range, then
    uniform plans; returns how many were enqueued."""
    if study.user_attrs.get(SEEDED_ATTR):
        return 0
    seeds: list[tuple[str, dict[str, dict]]] = []  # (kind, per-group choices)
    if profile is not None:
        seeds += [("profile", choices) for choices in budget_seeds(ctx, profile, max(2, trials // 4))]
    if ctx.spec.uniform_seeds:
        groups = list(ctx.space.groups(ctx.layers))
        seeds += [("uniform", {group: choice for group in groups})
                  for choice in uniform_seed_choices(ctx, max(1, trials // 8))]
    unique = {json.dumps(params_of(choices), sort_keys=True, default=str): kind for kind, choices in seeds}
    chosen = list(unique.items())[:max(1, trials // 2)]
    for params_json, kind in chosen:
        study.enqueue_trial(json.loads(params_json), user_attrs={"seed": kind})
    study.set_user_attr(SEEDED_ATTR, True)
    return len(chosen)


def budget_seeds(ctx: JobContext, profile: Profile, count: int) -> list[dict[str, dict]]:
    """Profile-optimal plans for `count` budgets spread from the smallest plan to the budget (or largest)."""
    options = group_options(ctx, profile)
    kept_bytes = ctx.plan_bytes(Plan()) - sum(layer.num_params for layer in ctx.layers) * 2  # outside the layers
    top = min(ctx.memory_budget_bytes or ctx.largest_plan_bytes, ctx.largest_plan_bytes)
    targets = np.linspace(ctx.smallest_plan_bytes, top, count + 1)[1:]
    return best_plans_for_budgets(options, [int(t - kept_bytes) for t in targets])


def params_of(choices: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Optuna parameters for per-group choices (the names `Space.suggest_plan` asks for)."""
    return {f"{group}:{knob}": value for group, choice in choices.items() for knob, value in choice.items()}


def uniform_seed_choices(ctx: JobContext, count: int) -> list[dict]:
    """Choices for up to `count` plans where every layer uses one technique alike, spread over feasible sizes.

    These are the baselines users start from (uniform 4-bit, uniform 50% sparsity, ...). The
    uncompressed plan is left out: it is measured anyway.
    """
    sized = []
    for choice in ctx.space.uniform_choices():
        plan = group_plan(ctx.space, ctx.layers, choice)
        techniques = {(lp.bits < 16, lp.sparsity > 0, lp.rank_fraction < 1) for lp in plan.layers.values()}
        if any(sum(used) > 1 for used in techniques) or not any(any(used) for used in techniques):
            continue
        size = ctx.plan_bytes(plan)
        if ctx.memory_budget_bytes is None or size <= ctx.memory_budget_bytes:
            sized.append((size, choice))
    sized.sort(key=lambda item: item[0])
    if count <= 0 or not sized:
        return []
    if count >= len(sized):
        return [choice for _, choice in sized]
    step = (len(sized) - 1) / max(1, count - 1)
    picks = sorted({round(len(sized) - 1 - i * step) for i in range(count)})
    return [sized[i][1] for i in picks]
