"""Guided NSGA-II children: local moves along the front, budget-preserving, ranked by the profile.

NSGA-II keeps selecting parents on measured objectives; this only changes how a child is made:
1. start from one parent; sometimes cross it with the parent nearest in size, taking each group's
   whole choice from either (crossing very different sizes yields plans bad in both objectives);
2. one or two level switches: one group up to its next more accurate option, another down to a
   cheaper one, the total size not above the child's (a mutation that preserves the budget, as in
   EvoPress); among a few random switches the profile's best wins, even when it is a little worse
   than the parent: the estimate is only additive, the measurement decides;
3. a child over the memory budget is repaired by the cheapest downgrades per byte saved;
4. a child that repeats a plan the study already holds (measured, running or queued), or whose
   estimate, corrected by the study's own measurements (`Calibration`), is past the quality floor, is
   drawn again, a few times at most: such a trial costs as much as any and teaches nothing. The first
   redraws stay local (other parents, other random switches); later ones take one more switch each,
   for when a parent's near neighbourhood is used up;
5. besides these children, the profile's best plan (the seeds' knapsack) at the middle of every gap
   between the sizes on the measured front is a candidate: children keep about their parents' size,
   so a gap between two seeds would otherwise stay open (a quant study spent 6 of its first 6 children
   on sizes its seeds already covered while the knee of the front had one point in 7% of the size);
6. of the candidates that pass, the one whose predicted point (its bytes, its corrected KL
   estimate, corrected again by what the estimate missed on the trials nearest in size:
   `SizeCorrection`) adds the most hypervolume to the measured (bytes, KL) front, up to the budget and the
   quality floor, is run: the trial goes where the front has a gap or can move, not to a size the
   front already covers well. KL, not perplexity: a measured point's perplexity carries its own luck,
   which no predicted point can match (children near measured points then looked worthless). The KL is taken
   optimistically, lowered by the corrected estimate's typical error on the study's own trials
   (`Calibration.spread`): a child predicted a little worse than the front where estimates are off by
   tens of percent may well beat it, while a near-lossless child's certain but tiny gain is worth
   little (without this a quant study spent 10 of 32 trials on children of its 8-bit plan). A gain is
   shared with the trials already run or running at about the same size (within `CROWD_WINDOW` of the
   16-bit size), and gains count only up to `FRONT_HEADROOM` times the front's largest KL: a child a
   few kilobytes below the smallest plan adds a sliver of width times the whole height up to the bound
   (a per-tensor GGUF study spent 18 of 32 trials within 0.2 MB of its smallest plan). Both temper that.
   A plan's bytes are what it deploys as (`JobContext.unsearched_bytes`): in a GGUF study the file's
   header, vocabulary and 32-bit norms, 1.5 MB on SmolLM2-135M that children were once predicted
   without, so that every child looked like a new smallest plan.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial

from compsearch.search.calibration import Calibration, SizeCorrection
from compsearch.search.front import hypervolume_gain, kl_limit, measured_front
from compsearch.search.job import JobContext
from compsearch.search.seeding import Knapsack, group_nbytes, group_options
from compsearch.search.sensitivity import Profile

SWITCH_CANDIDATES = 12  # random level switches proposed per child; the profile picks among them
CROSSOVER_PROB = 0.3
REDRAWS = 8  # children that repeat a known plan or pass the floor, at most, before a repeat is accepted
LOCAL_REDRAWS = 2  # of which the first ones keep the usual step size
# Children that pass, of which the one of largest (optimistic) predicted hypervolume gain runs. 8, not 4:
# NSGA-II's population keeps the front's extremes (near-lossless plans), whose children add nothing, so
# the ranking needs children of other parents to choose from (benchmarks/search.py; README).
CANDIDATES = 8
CROWD_WINDOW = 0.005  # trials closer in bytes than this share of the 16-bit size share a candidate's gain
FRONT_HEADROOM = 1.5  # gains count up to this times the measured front's largest KL (or the floor, if lower)


class GuidedChildren:
    """A `child_generation_strategy` for `optuna.samplers.NSGAIISampler`."""

    def __init__(self, ctx: JobContext, profile: Profile, seed: int | None = None):
        self.ctx, self.members = ctx, ctx.space.groups(ctx.layers)
        self.options = group_options(ctx, profile)
        self.knapsack = Knapsack(self.options)
        self.crowd_window_bytes = CROWD_WINDOW * ctx.base_bytes
        self.kept_bytes = ctx.unsearched_bytes()
        self.layer_budget = None
        if ctx.memory_budget_bytes is not None:
            self.layer_budget = ctx.memory_budget_bytes - self.kept_bytes
        self.knobs = list(ctx.space.knobs())
        self.rng = np.random.default_rng(seed)

    def __call__(self, study: optuna.Study, search_space: dict[str, BaseDistribution],
                 parents: list[FrozenTrial]) -> dict[str, Any]:
        trials = study.get_trials(deepcopy=False)
        known = {_plan_key(trial.params, search_space) for trial in trials}
        max_kl, corrected = self.ctx.spec.max_kl, Calibration.from_trials(trials)
        at_size = SizeCorrection(trials, corrected)
        new = None  # the first child that is no repeat, should none keep within the floor
        front = measured_front(trials, "kl")
        wanted = CANDIDATES if front else 1  # with nothing measured to compare with: the first that passes
        passed: list[tuple[tuple[int, float], dict[str, Any]]] = []  # (predicted bytes and KL, child)

        def admit(levels: dict[str, int], child: dict[str, Any]) -> bool:
            """Whether the child's corrected estimate keeps within the floor; if so it joins `passed`."""
            memory = self.kept_bytes + self._size(levels)
            predicted_kl = corrected(self._estimate(levels)) * at_size(memory)
            if max_kl is not None and predicted_kl > max_kl:
                return False
            passed.append(((memory, predicted_kl * math.exp(-corrected.spread)), child))
            return True

        failures = 0
        while len(passed) < wanted and failures < REDRAWS:
            levels = self._child(parents, extra_switches=max(0, failures - LOCAL_REDRAWS + 1))
            child = self._params(levels, search_space)
            key = _plan_key(child, search_space)
            if key in known:
                failures += 1
                continue
            known.add(key)
            failures += not admit(levels, child)
            new = new or child
        for levels in self._gap_fillers(front):
            child = self._params(levels, search_space)
            key = _plan_key(child, search_space)
            if key not in known:
                known.add(key)
                admit(levels, child)
        if passed:
            kl_bound = kl_limit(self.ctx.spec.max_ppl_ratio)  # the floor's KL, where there is one
            if front:
                kl_bound = min(kl_bound, FRONT_HEADROOM * max(kl for _, kl in front))
            limit = ((self.ctx.memory_budget_bytes or self.ctx.base_bytes) * 1.01, kl_bound)
            sizes = np.array([t.user_attrs["memory_bytes"] for t in trials if "memory_bytes" in t.user_attrs
                              and t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)])

            def shared_gain(candidate: tuple[tuple[int, float], dict[str, Any]]) -> float:
                (memory, kl), _ = candidate
                neighbours = int((np.abs(sizes - memory) <= self.crowd_window_bytes).sum())
                return hypervolume_gain(front, memory, kl, *limit) / (1 + neighbours)
            return max(passed, key=shared_gain)[1]
        return new or child

    def _gap_fillers(self, front: list[tuple[float, float]]) -> list[dict[str, int]]:
        """The profile's best plan (the knapsack's) at the middle of every gap between the sizes of the
        measured front wider than two `CROWD_WINDOW`s."""
        sizes = [memory for memory, _ in front]
        middles = [(low + high) / 2 for low, high in zip(sizes, sizes[1:]) if high - low > 2 * self.crowd_window_bytes]
        return [levels for levels in (self.knapsack.levels(middle - self.kept_bytes) for middle in middles)
                if levels is not None]

    def _params(self, levels: dict[str, int], search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        params = self.ctx.space.params_for({group: self.options[group][level].choice for group, level in levels.items()})
        return {name: value for name, value in params.items() if name in search_space}

    def _child(self, parents: list[FrozenTrial], extra_switches: int = 0) -> dict[str, int]:
        """The levels of a child of `parents` (see the module docstring, steps 1-3)."""
        parent = parents[int(self.rng.integers(len(parents)))]
        levels = self._levels(parent.params)
        others = [p for p in parents if p is not parent]
        if others and self.rng.random() < CROSSOVER_PROB:
            size = self._size(levels)
            nearest = self._levels(min(others, key=lambda p: abs(self._size(self._levels(p.params)) - size)).params)
            levels = {group: levels[group] if self.rng.random() < 0.5 else nearest[group] for group in levels}
        for _ in range(int(self.rng.integers(1, 3)) + extra_switches):
            levels = self._switch(levels)
        if self.layer_budget is not None:
            levels = self._repair(levels, self.layer_budget)
        return levels

    def _levels(self, params: dict[str, Any]) -> dict[str, int]:
        return {group: self._level(group, params) for group in self.options}

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
        """The best (by the profile) of a few random up/down pairs that do not grow the plan; if none
        fits, the cheapest single step down (the child moves down the front instead)."""
        groups, size = list(levels), self._size(levels)
        best, best_estimate = None, np.inf
        for _ in range(SWITCH_CANDIDATES):
            up, down = (groups[i] for i in self.rng.choice(len(groups), size=2, replace=len(groups) < 2))
            moved = dict(levels)
            moved[up] = min(moved[up] + 1, len(self.options[up]) - 1)
            moved[down] = max(moved[down] - 1, 0)
            if moved != levels and self._size(moved) <= size and self._estimate(moved) < best_estimate:
                best, best_estimate = moved, self._estimate(moved)
        return best if best is not None else self._step_down(levels)

    def _step_down(self, levels: dict[str, int]) -> dict[str, int]:
        moves = []
        for group, level in levels.items():
            if level > 0:
                now, cheaper = self.options[group][level], self.options[group][level - 1]
                moves.append(((cheaper.estimate - now.estimate) / max(1, now.nbytes - cheaper.nbytes), group))
        if not moves:
            return levels
        return {**levels, min(moves)[1]: levels[min(moves)[1]] - 1}

    def _repair(self, levels: dict[str, int], budget: int) -> dict[str, int]:
        while self._size(levels) > budget:
            lower = self._step_down(levels)
            if lower == levels:
                break
            levels = lower
        return levels

    def _size(self, levels: dict[str, int]) -> int:
        return sum(self.options[group][level].nbytes for group, level in levels.items())

    def _estimate(self, levels: dict[str, int]) -> float:
        return sum(self.options[group][level].estimate for group, level in levels.items())


def _plan_key(params: dict[str, Any], search_space: dict[str, BaseDistribution]) -> tuple:
    """The searched parameters of a trial, comparable across trials."""
    return tuple(sorted((name, value) for name, value in params.items() if name in search_space))
