"""Measure-once sensitivity: the damage each group of layers takes from each option, with nothing else changed.

The damage is the mean per-token KL divergence of the final logits to the base model's on a few
calibration windows. Options are measured per *factor* (quantization, sparsity, low-rank), each with
the other factors off; a choice that combines factors is estimated as the sum (an approximation:
errors do not simply add up, which is why every estimate is shown next to the measured value).
Measurements are cached on disk keyed by model, data and the exact per-layer plan, so studies,
budgets and resumes reuse them.

Most options are predicted rather than measured. A KL needs the whole model's forward pass; the
relative error of the output of the last decoder block an option changes needs only the changed
blocks (`BlockReplay.output_error`), about a fifth of the cost. Within one group and factor the KL is
close to proportional to that error (on SmolLM2-135M's joint space a least-squares fit of log KL on log
error within each group gives exponents 0.94-1.0; damage linear in the layer's relative output error,
as HIGGS found), so one option per group and factor is measured, the one of median error (an anchor),
and the others are scaled from it: KL = KL_anchor * error / error_anchor. Where the anchor's KL is
mostly noise (below `NOISE_KL`) and the largest error is far above the anchor's, that option is measured
too, and each option scales from the anchor nearest to it in log error. Options no block's output shows
in full (the output head, an embedding the head shares) are measured. On SmolLM2-135M's joint space
this measures 90 of 510 options; the predicted profile's rank correlation with the fully measured one
is 0.996, made in 89 s instead of 201 s (`python benchmarks/sensitivity_profile.py`).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray

from compsearch.compress import COMPRESS_VERSION
from compsearch.search.interrupts import POLL_S, raise_if_interrupted
from compsearch.search.worker_lost import WORKER_LOST
from compsearch.search.job import JobContext
from compsearch.paths import default_cache_dir
from compsearch.search.models import model_fingerprint
from compsearch.spaces.knobs import factors, off_values
from compsearch.spaces.space import Space

log = logging.getLogger(__name__)
# Knobs of one technique only make sense together: they are measured together (`Knob.factor`).
FACTORS = factors()
OFF = off_values()  # the value of a knob that turns its technique off
PROFILE_ATTR = "profile"  # the study attribute holding its `Profile.kl` (measured or predicted)
KL, OUTPUT_ERROR = "kl", "output-error"  # the two measurements, each cached under its own key
NOISE_KL = 1e-4  # below this a measured KL is mostly noise, a poor anchor to scale far from
FAR_ERROR_RATIO = 10.0  # with a noisy anchor, the largest error is measured too when this far above it
UNSEEN = -1.0  # the cached output error of an option no decoder block's output shows (measured in full)


def factor_options(space: Space) -> dict[str, list[dict[str, Any]]]:
    """For each factor with a searched knob: every combination of its searched knobs' values."""
    knobs = space.knobs()
    searched = {name: [k for k in members if k in knobs] for name, members in FACTORS.items()}
    return {name: [dict(zip(members, values)) for values in itertools.product(*(knobs[k] for k in members))]
            for name, members in searched.items() if members}


def off_choice(space: Space) -> dict[str, Any]:
    """A choice that leaves a layer uncompressed, for every searched knob."""
    return {knob: OFF.get(knob, choices[0]) for knob, choices in space.knobs().items()}


def option_key(option: dict[str, Any]) -> str:
    return json.dumps(option, sort_keys=True)


@dataclass
class Profile:
    """kl[group][factor][option key]: the measured damage of one factor option on one group alone."""

    kl: dict[str, dict[str, dict[str, float]]]

    def options(self) -> dict[tuple[str, str, str], float]:
        """(group, factor, option key) -> KL, flat."""
        return {(group, factor, option): value for group, factors in self.kl.items()
                for factor, options in factors.items() for option, value in options.items()}

    def group_estimate(self, group: str, choice: dict[str, Any]) -> float:
        total = 0.0
        for factor, options in self.kl[group].items():
            members = [k for k in FACTORS[factor] if k in choice]
            total += options.get(option_key({k: choice[k] for k in members}), 0.0)
        return total

    def estimate(self, choices: dict[str, dict[str, Any]]) -> float:
        """Additive estimate of a plan's KL from its per-group choices."""
        return sum(self.group_estimate(group, choice) for group, choice in choices.items())


class SensitivityCache:
    """A JSON file of measured KLs and output errors keyed by a hash of the exact plan (and of which
    measurement), one file per model and data."""

    def __init__(self, path: Path):
        self.path = path
        self.values: dict[str, float] = self._read(path) if path.exists() else {}

    @staticmethod
    def _read(path: Path) -> dict[str, float]:
        """The cached measurements; a damaged file (truncated, garbled, not a mapping of numbers) is
        reported once and its measurements are made again."""
        try:
            values = json.loads(path.read_text())
            if isinstance(values, dict) and all(isinstance(v, (int, float)) for v in values.values()):
                return values
            problem = "not a mapping of plan keys to numbers"
        except (ValueError, UnicodeDecodeError) as err:
            problem = str(err).splitlines()[0]
        log.warning("sensitivity cache %s is damaged (%s): measuring its entries again", path, problem)
        return {}

    @staticmethod
    def key(plan_json: str, what: str = KL) -> str:
        """The entry of a plan's KL, or (`what=OUTPUT_ERROR`) of its relative block output error."""
        return hashlib.sha256((plan_json if what == KL else f"{what}:{plan_json}").encode()).hexdigest()[:24]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        with os.fdopen(handle, "w") as out:
            json.dump(self.values, out, sort_keys=True)
        os.replace(tmp, self.path)


def cache_path(ctx: JobContext, cache_dir: Path | None) -> Path:
    calib = ctx.windows.calib_ids[: ctx.spec.profile_windows, : ctx.spec.profile_seq_len]
    data_key = hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16]
    folder = Path(cache_dir or default_cache_dir()) / "sensitivity"
    return folder / f"{model_fingerprint(ctx.model_ref)}-{data_key}-v{COMPRESS_VERSION}.json"


def measure_profile(ctx: JobContext, pool: list, cache_dir: Path | None = None,
                    on_progress: Callable[[str, int, int], None] | None = None,
                    spawn: Callable[[int], list] | None = None, predict: bool = True) -> tuple[Profile, float]:
    """The study's profile: cached entries are read, missing ones measured on the Ray workers in parallel
    (`predict`: most options scaled from their output errors, see the module's docstring; else every
    option's KL measured). A worker that dies is replaced in `pool` by `spawn(1)` and its batch measured
    again. `on_progress(what, done, total)`.

    Returns the profile and the seconds spent measuring (0 when everything was cached).
    """
    groups = ctx.space.groups(ctx.layers)
    cells = profile_cells(ctx.space, groups)
    cache = SensitivityCache(cache_path(ctx, cache_dir))
    window_shape = (ctx.spec.profile_windows, ctx.spec.profile_seq_len)
    started, measured_any = time.perf_counter(), False

    def measure(what: str, plans: set[str]) -> None:
        nonlocal measured_any
        missing = sorted(plan for plan in plans if cache.key(plan, what) not in cache.values)
        if missing:
            measured_any = True
            label = "KL measurements" if what == KL else "output errors"
            _measure_(cache, missing, what, pool, window_shape,
                      on_progress and (lambda done, total: on_progress(label, done, total)), spawn)

    unmeasured = {cell: plans for cell, plans in cells.items()
                  if not all(cache.key(plan) in cache.values for plan in plans.values())}
    if not predict:
        measure(KL, {plan for plans in unmeasured.values() for plan in plans.values()})
    else:
        measure(OUTPUT_ERROR, {plan for plans in unmeasured.values() for plan in plans.values()})
        measure(KL, {plan for plans in unmeasured.values() for plan in _anchors(plans, cache)})
        measure(KL, {plan for plans in unmeasured.values() for plan in _anchors(plans, cache, again=True)})
    profile: dict[str, dict[str, dict[str, float]]] = {group: {} for group in groups}
    for (group, factor), plans in cells.items():
        profile[group][factor] = _scaled(plans, cache)
    return Profile(profile), time.perf_counter() - started if measured_any else 0.0


def profile_cells(space: Space, groups: dict[str, list]) -> dict[tuple[str, str], dict[str, str]]:
    """(group, factor) -> option key -> the plan json of that option alone on that group, for every option
    that changes something."""
    off = off_choice(space)
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for (factor, options), (group, members) in itertools.product(factor_options(space).items(), groups.items()):
        for option in options:
            plan = space.plan(members, {**off, **option})
            if any(not lp.is_identity for lp in plan.layers.values()):
                cells.setdefault((group, factor), {})[option_key(option)] = plan.to_json()
    return cells


def _anchors(plans: dict[str, str], cache: SensitivityCache, again: bool = False) -> set[str]:
    """The plans of one group and factor whose KL must be measured: those no block output shows, and of
    those with a nonzero error the one of median error (unless one is measured already); `again` (once
    those are measured): the one of largest error too, when every measured KL is below `NOISE_KL` and
    that error is over `FAR_ERROR_RATIO` times the largest measured one's."""
    error = {plan: cache.values[cache.key(plan, OUTPUT_ERROR)] for plan in plans.values()}
    unseen = {plan for plan, e in error.items() if e == UNSEEN}
    seen = sorted((plan for plan, e in error.items() if e > 0), key=error.get)
    measured = [plan for plan in seen if cache.key(plan) in cache.values]
    if not again:
        return unseen | ({seen[len(seen) // 2]} if seen and not measured else set())
    if not measured or seen[-1] in measured or max(cache.values[cache.key(p)] for p in measured) >= NOISE_KL:
        return set()
    return {seen[-1]} if error[seen[-1]] > FAR_ERROR_RATIO * max(error[p] for p in measured) else set()


def _scaled(plans: dict[str, str], cache: SensitivityCache) -> dict[str, float]:
    """option key -> KL of one group and factor: measured where measured, else scaled from the measured
    option nearest in log output error (KL proportional to the error; 0 where the error is 0: the block's
    output, hence the logits, are the base model's)."""
    kl = {key: cache.values.get(cache.key(plan)) for key, plan in plans.items()}
    predicted = [key for key, value in kl.items() if value is None]
    if not predicted:
        return kl
    error = {key: cache.values[cache.key(plans[key], OUTPUT_ERROR)] for key in kl}
    anchors = [(error[key], kl[key]) for key in kl if key not in predicted and error[key] > 0]
    for key in predicted:  # an UNSEEN option is always measured, so error[key] >= 0 here
        if error[key] == 0:
            kl[key] = 0.0
            continue
        anchor_error, anchor_kl = min(anchors, key=lambda anchor: abs(math.log(error[key] / anchor[0])))
        kl[key] = anchor_kl * error[key] / anchor_error
    return kl


def _measure_(cache: SensitivityCache, plans: list[str], what: str, pool: list, window_shape: tuple[int, int],
              on_progress: Callable[[int, int], None] | None, spawn: Callable[[int], list] | None) -> None:
    """Spread the plans over the workers in small batches, each worker measuring `what` (`KL`, or
    `OUTPUT_ERROR`: `UNSEEN` where no block's output shows the change); save after every batch (a crash
    loses little)."""
    batches = [plans[i:i + 8] for i in range(0, len(plans), 8)]
    pending: dict = {}
    idle = list(pool)
    done = 0
    while batches or pending:
        while idle and batches:
            worker, batch = idle.pop(), batches.pop(0)
            method = worker.profile_kl if what == KL else worker.profile_error
            pending[method.remote(batch, *window_shape)] = (worker, batch)
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
        raise_if_interrupted()
        if not ready:
            continue
        worker, batch = pending.pop(ready[0])
        try:
            measured = ray.get(ready[0])
        except WORKER_LOST:  # the worker died (killed, node lost, out of memory): a new one measures its batch again
            if spawn is None:
                raise
            pool[pool.index(worker)] = replacement = spawn(1)[0]
            idle.append(replacement)
            batches.insert(0, batch)
            continue
        for plan_json, value in zip(batch, measured):
            cache.values[cache.key(plan_json, what)] = UNSEEN if value is None else value
        cache.save()
        idle.append(worker)
        done += len(batch)
        if on_progress:
            on_progress(done, len(plans))
