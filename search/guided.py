"""Guided NSGA-II children: group-wise crossover, then budget-preserving level switches ranked by the profile.

NSGA-II keeps selecting parents on measured objectives; this only changes how a child is made:
1. crossover takes each group's whole choice from one of two parents (a group's knobs stay coherent);
2. a level switch moves one group up to its next more accurate option and another down to a cheaper
   one, so the total size stays at or below the child's (a mutation that preserves the budget, as in
   EvoPress); among a few random switches, the one the profile estimates best wins;
3. a child over the memory budget is repaired by the cheapest downgrades per byte saved.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial

from search.job import JobContext
from search.seeding import group_nbytes, group_options, params_of
from search.sensitivity import Profile

SWITCH_CANDIDATES = 6  # random level switches proposed per child; the profile picks among them


class GuidedChildren:
    """A `child_generation_strategy` for `optuna.samplers.NSGAIISampler`."""

    def __init__(self, ctx: JobContext, profile: Profile, seed: int | None = None):
        self.ctx, self.members = ctx, ctx.space.groups(ctx.layers)
        self.options = group_options(ctx, profile)
        self.layer_budget = None
        if ctx.memory_budget_bytes is not None:
            kept = ctx.base_bytes - sum(layer.num_params for layer in ctx.layers) * 2
            self.layer_budget = ctx.memory_budget_bytes - kept
        self.knobs = list(ctx.space.knobs())
        self.rng = np.random.default_rng(seed)

    def __call__(self, study: optuna.Study, search_space: dict[str, BaseDistribution],
                 parents: list[FrozenTrial]) -> dict[str, Any]:
        first, second = (parents[i] for i in self.rng.choice(len(parents), size=2, replace=len(parents) < 2))
        levels = {group: self._level(group, first.params if self.rng.random() < 0.5 else second.params)
                  for group in self.options}
        levels = self._switch(levels)
        if self.layer_budget is not None:
            levels = self._repair(levels, self.layer_budget)
        params = params_of({group: self.options[group][level].choice for group, level in levels.items()})
        return {name: value for name, value in params.items() if name in search_space}

    def _level(self, group: str, params: dict[str, Any]) -> int:
        """The efficient option of `group` closest in size to the parent's choice for it."""
        choice = {knob: params.get(f"{group}:{knob}") for knob in self.knobs}
        options = self.options[group]
        for index, option in enumerate(options):
            if option.choice == choice:
                return index
        target = group_nbytes(self.ctx, self.members[group], choice)
        return int(np.argmin([abs(o.nbytes - target) for o in options]))

    def _switch(self, levels: dict[str, int]) -> dict[str, int]:
        groups = list(levels)
        size = self._size(levels)
        best, best_estimate = levels, self._estimate(levels)
        for _ in range(SWITCH_CANDIDATES):
            up, down = self.rng.choice(len(groups), size=2, replace=False) if len(groups) > 1 else (0, 0)
            moved = dict(levels)
            moved[groups[up]] = min(moved[groups[up]] + 1, len(self.options[groups[up]]) - 1)
            moved[groups[down]] = max(moved[groups[down]] - 1, 0)
            if self._size(moved) <= size and self._estimate(moved) < best_estimate:
                best, best_estimate = moved, self._estimate(moved)
        return best

    def _repair(self, levels: dict[str, int], budget: int) -> dict[str, int]:
        levels = dict(levels)
        while self._size(levels) > budget:
            moves = []
            for group, level in levels.items():
                if level > 0:
                    now, cheaper = self.options[group][level], self.options[group][level - 1]
                    moves.append(((cheaper.estimate - now.estimate) / max(1, now.nbytes - cheaper.nbytes), group))
            if not moves:
                break
            levels[min(moves)[1]] -= 1
        return levels

    def _size(self, levels: dict[str, int]) -> int:
        return sum(self.options[group][level].nbytes for group, level in levels.items())

    def _estimate(self, levels: dict[str, int]) -> float:
        return sum(self.options[group][level].estimate for group, level in levels.items())
