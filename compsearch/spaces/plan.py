"""What to do to each Linear layer: `LayerPlan`, and to a whole model: `Plan`.

Both are frozen, validated on construction, and round-trip through JSON exactly.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Mapping

from compsearch.spaces.knobs import KNOBS

if TYPE_CHECKING:
    from compsearch.spaces.layers import LayerInfo

PATTERNS = ("unstructured", "2:4", "4:8")
# Linear roles whose rows (outputs) / columns (inputs) are the MLP's intermediate channels.
MLP_CHANNEL_ROWS = ("gate_proj", "up_proj", "fc1", "w1", "w3")
MLP_CHANNEL_COLS = ("down_proj", "fc2", "w2")
# The projections of an attention whose heads can be removed: rows of q/k/v, columns of o.
ATTENTION_ROWS = ("q_proj", "k_proj", "v_proj")
ATTENTION_COLS = ("o_proj",)
ATTENTION_KINDS = ATTENTION_ROWS + ATTENTION_COLS
# Structured pruning removes units a module's projections share: the fraction kept -> (row kinds, column kinds).
STRUCTURES = {"channel_fraction": (MLP_CHANNEL_ROWS, MLP_CHANNEL_COLS),
              "head_fraction": (ATTENTION_ROWS, ATTENTION_COLS)}
PLAN_VERSION = 1  # new LayerPlan fields have defaults, so version-1 JSON written before them still loads
BLOCK_INDEX = re.compile(r"\.(\d+)\.")  # a decoder block's index in a layer name: model.layers.3.mlp.up_proj
RANK_MULTIPLE = 8  # ranks are rounded to a multiple of 8: friendlier to kernels and N:M patterns
CHANNEL_MULTIPLE = 8  # kept MLP channels likewise


def rank_for(out_features: int, in_features: int, rank_fraction: float) -> int:
    """The kept rank for a fraction of full rank, rounded to a multiple of 8 (at least 8)."""
    full = min(out_features, in_features)
    rank = int(round(rank_fraction * full / RANK_MULTIPLE)) * RANK_MULTIPLE
    return min(full, max(rank, min(full, RANK_MULTIPLE)))


def kept_channels(intermediate: int, channel_fraction: float) -> int:
    """MLP intermediate channels kept for a fraction, rounded to a multiple of 8 (at least 8)."""
    kept = int(round(channel_fraction * intermediate / CHANNEL_MULTIPLE)) * CHANNEL_MULTIPLE
    return min(intermediate, max(kept, min(intermediate, CHANNEL_MULTIPLE)))


def kept_heads(heads: int, kv_heads: int, head_fraction: float) -> tuple[int, int]:
    """(query heads, key/value heads) an attention keeps for a fraction of its query heads.

    With grouped-query attention every key/value head keeps the same number of its query heads
    (at least one), so the groups stay equal; with one query head per key/value head (multi-head
    attention) whole heads go, keys and values with them.
    """
    group = heads // kv_heads
    if group > 1:
        return min(group, max(1, round(head_fraction * group))) * kv_heads, kv_heads
    kept = min(heads, max(1, round(head_fraction * heads)))
    return kept, kept


def structured_shape(layer: "LayerInfo", plan: "LayerPlan") -> tuple[int, int]:
    """(out, in) of a Linear after structured pruning: removed MLP channels (rows of gate/up, columns of
    down) or attention heads (rows of q, and of k/v where whole heads go; columns of o)."""
    out_features, in_features = layer.out_features, layer.in_features
    if plan.channel_fraction < 1.0:
        if layer.kind in MLP_CHANNEL_ROWS:
            out_features = kept_channels(out_features, plan.channel_fraction)
        elif layer.kind in MLP_CHANNEL_COLS:
            in_features = kept_channels(in_features, plan.channel_fraction)
        else:
            raise PlanError(f"channel_fraction={plan.channel_fraction} on {layer.name}: only MLP projections "
                            f"{MLP_CHANNEL_ROWS + MLP_CHANNEL_COLS} have intermediate channels to remove")
    if plan.head_fraction < 1.0:
        if layer.kind not in ATTENTION_KINDS or not layer.heads:
            raise PlanError(f"head_fraction={plan.head_fraction} on {layer.name}: only the {ATTENTION_KINDS} "
                            "projections of an attention with a known head count have heads to remove")
        kept_q, kept_kv = kept_heads(layer.heads, layer.kv_heads, plan.head_fraction)
        if layer.kind == "q_proj":
            out_features = kept_q * layer.head_dim
        elif layer.kind in ATTENTION_ROWS:
            out_features = kept_kv * layer.head_dim
        else:
            in_features = kept_q * layer.head_dim
    return out_features, in_features


def saves_params(out_features: int, in_features: int, rank_fraction: float, share_blocks: int = 1) -> bool:
    """Whether the two factors hold fewer weights than the full matrix; a `down` factor shared by
    `share_blocks` layers counts a `share_blocks`-th of it for each."""
    rank = rank_for(out_features, in_features, rank_fraction)
    return rank * (share_blocks * out_features + in_features) < share_blocks * out_features * in_features


def block_index(name: str) -> int | None:
    """The decoder block a layer belongs to (3 for `model.layers.3.mlp.up_proj`); None outside blocks."""
    match = BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def share_owner(name: str, share_blocks: int) -> str:
    """The layer that stores the basis `name` shares: the same projection in the first block of its run of
    `share_blocks` blocks (blocks 0-1, 2-3, ... for 2): `model.layers.3.mlp.up_proj` -> `model.layers.2.mlp.up_proj`."""
    match = BLOCK_INDEX.search(name)
    if match is None:
        raise PlanError(f"share_blocks={share_blocks} on {name}: only layers of numbered decoder blocks share a "
                        "basis with their neighbours; leave share_blocks 1")
    first = int(match.group(1)) // share_blocks * share_blocks
    return f"{name[:match.start(1)]}{first}{name[match.end(1):]}"


class PlanError(ValueError):
    """A plan or layer plan holds a value outside what the compressors support."""


def nm_sparsity(pattern: str) -> float:
    """Fraction of weights an N:M pattern removes (N kept out of every M)."""
    n, m = (int(part) for part in pattern.split(":"))
    return 1.0 - n / m


@dataclass(frozen=True)
class LayerPlan:
    """Compression of one Linear layer, applied in order: structure, low-rank, sparsity, quantization.

    `channel_fraction` is the fraction of the MLP's intermediate channels kept (structured pruning:
    rows of gate/up, columns of down; 1.0 = all); the MLP's projections must agree on it;
    `head_fraction` is the fraction of the attention's query heads kept (rows of q, and of k/v where
    whole heads go, columns of o; see `kept_heads`); the attention's projections must agree on it;
    `rank_fraction` is the kept rank as a fraction of min(out, in) features (1.0 = no factorization),
    factorized by `lowrank_method` (`svd`, or `whiten`: SVD-LLM's calibration-whitened SVD);
    `sparsity` is the fraction of weights set to zero, by `prune_method` (magnitude, wanda,
    sparsegpt) in `pattern`;
    `bits` is the stored width of every kept weight (16 = half-precision float, no quantization),
    quantized by `quant_method`: `rtn`, `gptq`, `hqq` (groups of `group_size` inputs) or `kmeans`
    (one codebook of 2**bits fp16 values per output row; `group_size` is not used);
    `share_blocks` > 1 makes the low-rank layers of one kind in a run of that many adjacent blocks share
    one `down` factor (the basis, stored once by the run's first layer, `share_owner`) and keep their own
    `up` factors (Basis Sharing, Wang et al., ICLR 2025); every layer of the run has the same plan.
    """

    bits: int = 16
    group_size: int = 128
    sparsity: float = 0.0
    pattern: str = "unstructured"
    prune_method: str = "magnitude"
    quant_method: str = "rtn"
    rank_fraction: float = 1.0
    lowrank_method: str = "svd"
    channel_fraction: float = 1.0
    head_fraction: float = 1.0
    share_blocks: int = 1

    def __post_init__(self) -> None:
        for knob in KNOBS:
            value, allowed = getattr(self, knob.name), knob.supported()
            if allowed is not None and value not in allowed:
                raise PlanError(f"{knob.name}={value!r} is not supported; use one of {allowed}")
        if self.pattern not in PATTERNS:
            raise PlanError(f"pattern={self.pattern!r} is not supported; use one of {PATTERNS}")
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise PlanError(f"sparsity={self.sparsity!r} must be a number in [0, 1)")
        if self.pattern != "unstructured" and not math.isclose(self.sparsity, nm_sparsity(self.pattern)):
            raise PlanError(
                f"pattern={self.pattern!r} removes {nm_sparsity(self.pattern):g} of the weights, "
                f"but sparsity={self.sparsity!r}; set sparsity to {nm_sparsity(self.pattern):g}"
            )
        for name in ("rank_fraction", "channel_fraction", "head_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise PlanError(f"{name}={value!r} must be in (0, 1]")
        if self.share_blocks > 1 and self.rank_fraction == 1.0:
            raise PlanError(f"share_blocks={self.share_blocks} shares a low-rank basis: give a rank_fraction "
                            "below 1.0, or share_blocks 1")
        if self.bits < 16:
            from compsearch.compress.techniques import QUANTIZERS

            quantizer = QUANTIZERS.get(self.quant_method)
            if self.bits not in quantizer.bits:
                raise PlanError(f"quant_method={self.quant_method!r} stores bits {quantizer.bits}, not {self.bits}")

    def techniques(self) -> list[Any]:
        """The registered techniques this plan uses (quantizer, pruner, factorization)."""
        from compsearch.compress.techniques import FACTORIZATIONS, PRUNERS, QUANTIZERS

        used = []
        if self.bits < 16:
            used.append(QUANTIZERS.get(self.quant_method))
        if self.sparsity > 0:
            used.append(PRUNERS.get(self.prune_method))
        if self.rank_fraction < 1.0:
            used.append(FACTORIZATIONS.get(self.lowrank_method))
        return used

    @property
    def needs_norms(self) -> bool:
        """Whether applying this plan uses the calibration inputs' L2 norms (Wanda, k-means)."""
        return any("norms" in technique.needs for technique in self.techniques())

    @property
    def is_structured(self) -> bool:
        """Whether the plan removes MLP channels or attention heads."""
        return self.channel_fraction < 1.0 or self.head_fraction < 1.0

    @property
    def structure_key(self) -> str:
        """Names what structured pruning kept, for caches of statistics that depend on it."""
        return f"channels={self.channel_fraction},heads={self.head_fraction}"

    @property
    def needs_hessian(self) -> bool:
        """Whether applying this plan uses the calibration inputs' second moments (GPTQ, SparseGPT,
        whitened low-rank, structured pruning)."""
        return self.is_structured or any("hessian" in technique.needs for technique in self.techniques())

    @property
    def is_identity(self) -> bool:
        return self.bits == 16 and self.sparsity == 0.0 and self.rank_fraction == 1.0 and not self.is_structured

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
        for fraction_field in STRUCTURES:
            self._check_structure(fraction_field)
        for owner, members in self.shared_bases().items():
            planned = [name for name in members if self.layers[name] != self.layers.get(owner)]
            if planned:
                raise PlanError(f"{planned[0]} shares the basis {owner} stores (share_blocks="
                                f"{self.layers[planned[0]].share_blocks}), but {owner} is planned "
                                f"{'differently' if owner in self.layers else 'not at all'}: the layers of a run "
                                "of blocks that shares a basis have one plan; give them the same one")

    def shared_bases(self) -> dict[str, list[str]]:
        """The owner of each shared basis -> the layers that use it (the owner first), in block order."""
        shared: dict[str, list[str]] = {}
        for name, layer_plan in self.layers.items():
            if layer_plan.share_blocks > 1:
                shared.setdefault(share_owner(name, layer_plan.share_blocks), []).append(name)
        return {owner: sorted(names, key=block_index) for owner, names in shared.items()}

    def _check_structure(self, fraction_field: str) -> None:
        """The projections of one MLP (one attention) must remove the same channels (heads)."""
        row_kinds, col_kinds = STRUCTURES[fraction_field]
        fractions: dict[str, dict[str, float]] = {}
        for name, layer_plan in self.layers.items():
            prefix, _, kind = name.rpartition(".")
            value = getattr(layer_plan, fraction_field)
            if kind in row_kinds + col_kinds:
                fractions.setdefault(prefix, {})[kind] = value
            elif value != 1.0:
                raise PlanError(f"{fraction_field}={value} on {name}: only the projections "
                                f"{row_kinds + col_kinds} have it; leave it 1.0 elsewhere")
        for prefix, by_kind in fractions.items():
            if len(set(by_kind.values())) > 1:
                raise PlanError(f"the projections of {prefix} disagree on {fraction_field} ({by_kind}); "
                                "give them the same value")
            # An MLP has one of several row/column namings; an attention has all four projections.
            complete = (set(by_kind) == set(ATTENTION_KINDS) if fraction_field == "head_fraction"
                        else set(by_kind) & set(row_kinds) and set(by_kind) & set(col_kinds))
            if min(by_kind.values()) < 1.0 and not complete:
                raise PlanError(f"{prefix} plans {fraction_field}={min(by_kind.values())} for {sorted(by_kind)} only; "
                                f"its rows ({row_kinds}) and columns ({col_kinds}) go together: plan them all")

    def structured_fractions(self, fraction_field: str) -> dict[str, float]:
        """Module name -> kept fraction, for the MLPs (`channel_fraction`) or attentions (`head_fraction`)
        that remove some of their channels or heads."""
        result = {}
        for name, layer_plan in self.layers.items():
            if getattr(layer_plan, fraction_field) < 1.0:
                result[name.rpartition(".")[0]] = getattr(layer_plan, fraction_field)
        return result

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

    def __reduce__(self):  # pickling builds it whole instead of filling it item by item
        return _FrozenDict, (dict(self),)
