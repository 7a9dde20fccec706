"""Measure-once sensitivity: the damage each group of layers takes from each option, with nothing else changed.

The damage is the mean per-token KL divergence of the final logits to the base model's on a few
calibration windows. Options are measured per *factor* (quantization, sparsity, low-rank), each with
the other factors off; a choice that combines factors is estimated as the sum (an approximation:
errors do not simply add up, which is why every estimate is shown next to the measured value).
Measurements are cached on disk keyed by model, data and the exact per-layer plan, so studies,
budgets and resumes reuse them.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError

from compsearch.compress import COMPRESS_VERSION
from compsearch.search.job import JobContext
from compsearch.paths import default_cache_dir
from compsearch.search.models import model_fingerprint
from compsearch.spaces.knobs import factors, off_values
from compsearch.spaces.space import Space

log = logging.getLogger(__name__)
# Knobs of one technique only make sense together: they are measured together (`Knob.factor`).
FACTORS = factors()
OFF = off_values()  # the value of a knob that turns its technique off
PROFILE_ATTR = "profile"  # the study attribute holding its measured `Profile.kl`


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
    """A JSON file of measured KLs keyed by a hash of the exact plan, one file per model and data."""

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
    def key(plan_json: str) -> str:
        return hashlib.sha256(plan_json.encode()).hexdigest()[:24]

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
                    on_progress: Callable[[int, int], None] | None = None,
                    spawn: Callable[[int], list] | None = None) -> tuple[Profile, float]:
    """The study's profile: cached entries are read, missing ones measured on the Ray workers in parallel.
    A worker that dies is replaced in `pool` by `spawn(1)` and its batch measured again.

    Returns the profile and the seconds spent measuring (0 when everything was cached).
    """
    groups = ctx.space.groups(ctx.layers)
    off = off_choice(ctx.space)
    items = []  # (group, factor, option key, plan json)
    for (factor, options), (group, members) in itertools.product(factor_options(ctx.space).items(), groups.items()):
        for option in options:
            plan = ctx.space.plan(members, {**off, **option})
            if any(not lp.is_identity for lp in plan.layers.values()):
                items.append((group, factor, option_key(option), plan.to_json()))
    cache = SensitivityCache(cache_path(ctx, cache_dir))
    missing = sorted({plan_json for *_, plan_json in items if cache.key(plan_json) not in cache.values})
    started = time.perf_counter()
    if missing:
        _measure_(cache, missing, pool, (ctx.spec.profile_windows, ctx.spec.profile_seq_len), on_progress, spawn)
    profile: dict[str, dict[str, dict[str, float]]] = {group: {} for group in groups}
    for group, factor, key, plan_json in items:
        profile[group].setdefault(factor, {})[key] = cache.values[cache.key(plan_json)]
    return Profile(profile), time.perf_counter() - started if missing else 0.0


def _measure_(cache: SensitivityCache, plans: list[str], pool: list, window_shape: tuple[int, int],
              on_progress: Callable[[int, int], None] | None, spawn: Callable[[int], list] | None) -> None:
    """Spread the plans over the workers in small batches; save after every batch (a crash loses little)."""
    batches = [plans[i:i + 8] for i in range(0, len(plans), 8)]
    pending: dict = {}
    idle = list(pool)
    done = 0
    while batches or pending:
        while idle and batches:
            worker, batch = idle.pop(), batches.pop(0)
            pending[worker.profile_kl.remote(batch, *window_shape)] = (worker, batch)
        ready, _ = ray.wait(list(pending), num_returns=1)
        worker, batch = pending.pop(ready[0])
        try:
            measured = ray.get(ready[0])
        except RayActorError:  # the worker died (killed, node lost): a new one measures its batch again
            if spawn is None:
                raise
            pool[pool.index(worker)] = replacement = spawn(1)[0]
            idle.append(replacement)
            batches.insert(0, batch)
            continue
        for plan_json, kl in zip(batch, measured):
            cache.values[cache.key(plan_json)] = kl
        cache.save()
        idle.append(worker)
        done += len(batch)
        if on_progress:
            on_progress(done, len(plans))
