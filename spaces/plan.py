"""What to do to each Linear layer: `LayerPlan`, and to a whole model: `Plan`.

Both are frozen, validated on construction, and round-trip through JSON exactly.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

QUANT_BITS = (2, 3, 4, 5, 6, 8, 16)  # 16 means "keep at 16-bit float"
GROUP_SIZES = (32, 64, 128)
PATTERNS = ("unstructured", "2:4", "4:8")
PRUNE_METHODS = ("magnitude", "wanda")
QUANT_METHODS = ("rtn",)
PLAN_VERSION = 1
RANK_MULTIPLE = 8  # ranks are rounded to a multiple of 8: friendlier to kernels and N:M patterns


def rank_for(out_features: int, in_features: int, rank_fraction: float) -> int:
    """The kept rank for a fraction of full rank, rounded to a multiple of 8 (at least 8)."""
    full = min(out_features, in_features)
    rank = int(round(rank_fraction * full / RANK_MULTIPLE)) * RANK_MULTIPLE
    return min(full, max(rank, min(full, RANK_MULTIPLE)))


def saves_params(out_features: int, in_features: int, rank_fraction: float) -> bool:
    """Whether the two factors hold fewer weights than the full matrix."""
    rank = rank_for(out_features, in_features, rank_fraction)
    return rank * (out_features + in_features) < out_features * in_features


class PlanError(ValueError):
    """A plan or layer plan holds a value outside what the compressors support."""


def nm_sparsity(pattern: str) -> float:
    """Fraction of weights an N:M pattern removes (N kept out of every M)."""
    n, m = (int(part) for part in pattern.split(":"))
    return 1.0 - n / m


@dataclass(frozen=True)
class LayerPlan:
    """Compression of one Linear layer, applied in order: low-rank, then sparsity, then quantization.

    `rank_fraction` is the kept rank as a fraction of min(out, in) features (1.0 = no factorization);
    `sparsity` is the fraction of weights set to zero, by `prune_method` in `pattern`;
    `bits` is the stored width of every kept weight (16 = half-precision float, no quantization).
    """

    bits: int = 16
    group_size: int = 128
    sparsity: float = 0.0
    pattern: str = "unstructured"
    prune_method: str = "magnitude"
    quant_method: str = "rtn"
    rank_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS:
            raise PlanError(f"bits={self.bits!r} is not supported; use one of {QUANT_BITS}")
        if self.group_size not in GROUP_SIZES:
            raise PlanError(f"group_size={self.group_size!r} is not supported; use one of {GROUP_SIZES}")
        if self.pattern not in PATTERNS:
            raise PlanError(f"pattern={self.pattern!r} is not supported; use one of {PATTERNS}")
        if self.prune_method not in PRUNE_METHODS:
            raise PlanError(f"prune_method={self.prune_method!r} is unknown; use one of {PRUNE_METHODS}")
        if self.quant_method not in QUANT_METHODS:
            raise PlanError(f"quant_method={self.quant_method!r} is unknown; use one of {QUANT_METHODS}")
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise PlanError(f"sparsity={self.sparsity!r} must be a number in [0, 1)")
        if self.pattern != "unstructured" and not math.isclose(self.sparsity, nm_sparsity(self.pattern)):
            raise PlanError(
                f"pattern={self.pattern!r} removes {nm_sparsity(self.pattern):g} of the weights, "
                f"but sparsity={self.sparsity!r}; set sparsity to {nm_sparsity(self.pattern):g}"
            )
        if not (isinstance(self.rank_fraction, (int, float)) and 0.0 < self.rank_fraction <= 1.0):
            raise PlanError(f"rank_fraction={self.rank_fraction!r} must be in (0, 1]")

    @property
    def is_identity(self) -> bool:
        return self.bits == 16 and self.sparsity == 0.0 and self.rank_fraction == 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerPlan":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PlanError(f"unknown layer plan keys {sorted(unknown)}; known keys are {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class Plan:
    """A `LayerPlan` per Linear layer, keyed by fully-qualified module name; unnamed layers are kept."""

    layers: Mapping[str, LayerPlan] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Sorted, immutable copy: equal plans compare, hash and serialize identically.
        object.__setattr__(self, "layers", _FrozenDict(sorted(self.layers.items())))

    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers.get(name, LayerPlan())

    def to_json(self) -> str:
        payload = {"version": PLAN_VERSION, "layers": {k: v.to_dict() for k, v in self.layers.items()}}
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        payload = json.loads(text)
        if payload.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {payload.get('version')!r} is not {PLAN_VERSION}; re-export the plan")
        return cls({name: LayerPlan.from_dict(lp) for name, lp in payload["layers"].items()})

    @classmethod
    def uniform(cls, layer_names: list[str], layer_plan: LayerPlan) -> "Plan":
        return cls({name: layer_plan for name in layer_names})


class _FrozenDict(dict):
    """A dict that refuses mutation, so a frozen `Plan` stays frozen."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("Plan layers are immutable; build a new Plan instead")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self.items()))
