"""The profile's additive KL estimate corrected by a study's own measurements."""
from __future__ import annotations

import math

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from compsearch.search.front import positive


class Calibration:
    """The profile's additive estimate corrected by the study's measurements: measured KL fitted as
    a * estimate^b (least squares in log-log, b kept within [0.5, 2]) over the completed trials that
    have both; with fewer than four, the scale a alone (b = 1); the estimate itself before any. `spread`:
    the fit's median |log(measured / corrected)| over those trials (`DEFAULT_SPREAD` until four do).

    The scale alone is what a study knows when its profile is ready: its first trials (the uniform
    seeds) measured plans the profile can estimate; the profile's seeds are placed with it
    (`seeding.budget_seeds`). On SmolLM2's `sota` space the uniform seeds measured 2.0-2.5x their
    estimate and the profile's seeds then 2.3-3.7x theirs."""

    MIN_TRIALS = 4
    DEFAULT_SPREAD = 0.2  # the raw estimate's median error on SmolLM2's quant studies (benchmarks/results/search.csv)

    def __init__(self, scale: float = 1.0, power: float = 1.0, spread: float = DEFAULT_SPREAD):
        self.scale, self.power, self.spread = scale, power, spread

    def __call__(self, estimate: float) -> float:
        return self.scale * max(estimate, 0.0) ** self.power

    @classmethod
    def from_trials(cls, trials: list[FrozenTrial]) -> "Calibration":
        return cls.fit([(t.user_attrs.get("estimated_kl"), t.user_attrs.get("kl")) for t in trials
                        if t.state == optuna.trial.TrialState.COMPLETE])

    @classmethod
    def fit(cls, pairs: list[tuple[float | None, float | None]]) -> "Calibration":
        """From (estimated, measured) KL pairs; pairs missing either, or not positive, are skipped."""
        pairs = np.array([(e, m) for e, m in pairs if positive(e) and positive(m)])
        if len(pairs) == 0:
            return cls()
        x, y = np.log(pairs[:, 0]), np.log(pairs[:, 1])
        if len(pairs) < cls.MIN_TRIALS:
            return cls(float(np.exp(np.mean(y - x))))
        power = float(np.clip(np.polyfit(x, y, 1)[0], 0.5, 2.0)) if np.ptp(x) > 0 else 1.0
        offset = float(np.mean(y - power * x))
        return cls(float(np.exp(offset)), power, float(np.median(np.abs(y - power * x - offset))))


class SizeCorrection:
    """What the calibrated estimate still misses at a size: e^(mean log(measured / calibrated KL)) over
    the `NEAREST` measured trials nearest in bytes (1 with none). One calibration curve for the whole
    front misses damage that plans of one size share: on `quant`, children kept going to one step of the
    front (0.40-0.41 of the 16-bit size, perplexity 21 against 16 a few kB up) where one group's damage
    is underestimated, each predicted a little better than the last one measured (22 of 48 children in 3
    seeds). Corrected by size, 9 went there, and the 32-trial hypervolume rose from 14.572 to 14.583
    (`sota`: 15.915 and 15.913)."""

    NEAREST = 3

    def __init__(self, trials: list[FrozenTrial], calibration: Calibration):
        errors = [(t.user_attrs["memory_bytes"], math.log(t.user_attrs["kl"] / calibration(t.user_attrs["estimated_kl"])))
                  for t in trials if t.state == optuna.trial.TrialState.COMPLETE and "memory_bytes" in t.user_attrs
                  and positive(t.user_attrs.get("kl")) and positive(t.user_attrs.get("estimated_kl"))]
        self.sizes = np.array([size for size, _ in errors], dtype=float)
        self.errors = np.array([error for _, error in errors])

    def __call__(self, memory_bytes: float) -> float:
        if not len(self.sizes):
            return 1.0
        nearest = np.argsort(np.abs(self.sizes - memory_bytes), kind="stable")[: self.NEAREST]
        return float(np.exp(self.errors[nearest].mean()))
