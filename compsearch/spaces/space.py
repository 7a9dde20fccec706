"""Search spaces: which choices each group of layers has, and how an Optuna trial becomes a `Plan`."""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Iterator, Protocol

from compsearch.spaces.layers import LayerInfo, group_layers
from compsearch.spaces.knobs import CHOICE_FIELDS, FLOAT_METHOD, KNOBS
from compsearch.spaces.plan import (ATTENTION_KINDS, MLP_CHANNEL_COLS, MLP_CHANNEL_ROWS, PATTERNS, LayerPlan, Plan,
                                    block_index, kept_heads, nm_sparsity, rank_for, saves_params, structured_shape)


MLP_KINDS = MLP_CHANNEL_ROWS + MLP_CHANNEL_COLS
KNOB_BY_NAME = {knob.name: knob for knob in KNOBS}


class SuggestsCategorical(Protocol):
    """The part of `optuna.Trial` a space needs."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


class SpaceError(ValueError):
    """A space or one of its choices is not valid for this model."""


class Space:
    """The choices every decision group picks from; a knob with one choice is fixed, not searched.

    Built as `Space(name, bits=(2, 4, 16), sparsities=("0", "2:4"), granularity="block")`: one keyword per
    knob, named by its `choices` field in `KNOBS` (an omitted knob keeps its default). `sparsities`
    holds fractions ("0.5") or N:M patterns ("2:4"); `rank_fractions` are fractions of full rank, offered
    to a layer only where they save weights. `quant_methods`, `prune_methods` and `lowrank_methods` pick
    the algorithm behind each technique; `channel_fractions` are the kept fractions of each MLP's
    intermediate channels and `head_fractions` of each attention's query heads (structured pruning),
    which the module's projections must share, so they are searched only at `block` or `model`
    granularity. `share_blocks` above 1 lets the low-rank layers of one kind in that many adjacent blocks
    share their basis; `layer` and `block` decision groups then span that many blocks.
    """

    def __init__(self, name: str, granularity: str = "block", tie_fused: bool = True, embeddings: bool = False,
                 **choices: Any):
        unknown = set(choices) - set(CHOICE_FIELDS)
        if unknown:
            raise SpaceError(f"space options {sorted(unknown)} are unknown; use {list(CHOICE_FIELDS)}")
        self.name, self.granularity, self.tie_fused = name, granularity, tie_fused
        self.embeddings = embeddings  # the token embedding is a layer of the plans too (its own group)
        # knob name -> the values offered, e.g. {"bits": (4, 16), "group_size": (128,), ...}
        self.choices = {knob.name: tuple(choices.get(knob.choices, knob.default)) for knob in KNOBS}
        self._validate()

    def __repr__(self) -> str:
        offered = ", ".join(f"{knob.choices}={self.choices[knob.name]}" for knob in KNOBS)
        return (f"Space({self.name!r}, {offered}, granularity={self.granularity!r}, tie_fused={self.tie_fused}, "
                f"embeddings={self.embeddings})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Space) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))

    def _validate(self) -> None:
        for knob in KNOBS:
            _check_choices(knob.label, self.choices[knob.name], knob.supported())
        for knob in (KNOB_BY_NAME["channel_fraction"], KNOB_BY_NAME["head_fraction"]):
            values = self.choices[knob.name]
            for value in values:
                if not 0.0 < float(value) <= 1.0:
                    raise SpaceError(f"{knob.label} {value!r} must be in (0, 1]; e.g. 0.75 keeps 3/4 of them")
            if len(values) > 1 and self.granularity not in ("block", "model"):
                raise SpaceError(f"{knob.label}s are shared by a module's projections; granularity "
                                 f"{self.granularity!r} splits them: use granularity 'block' or fix one fraction")
        for value in self.choices["sparsity"]:
            _layer_plan_fields_for_sparsity(value)  # raises on a bad value
        for value in self.choices["rank_fraction"]:
            if not 0.0 < float(value) <= 1.0:
                raise SpaceError(f"rank fraction {value!r} must be in (0, 1]; e.g. 0.5 keeps half the rank")

    def knobs(self) -> dict[str, tuple]:
        """The searched knobs (more than one choice) and their choices."""
        return {knob: choices for knob, choices in self.choices.items() if len(choices) > 1}

    def groups(self, layers: list[LayerInfo]) -> dict[str, list[LayerInfo]]:
        by_name = {layer.name: layer for layer in layers}
        block_span = math.lcm(*(int(value) for value in self.choices["share_blocks"]))
        grouped = group_layers(layers, self.granularity, self.tie_fused, block_span)
        return {group: [by_name[name] for name in names] for group, names in grouped.items()}

    def suggest_plan(self, trial: SuggestsCategorical, layers: list[LayerInfo]) -> Plan:
        """Ask the trial for every searched knob of every group and build the plan."""
        knobs = self.knobs()
        return self.plan_for({group: {knob: trial.suggest_categorical(f"{group}:{knob}", list(choices))
                                      for knob, choices in knobs.items()} for group in self.groups(layers)}, layers)

    def plan_for(self, choices: dict[str, dict[str, Any]], layers: list[LayerInfo]) -> Plan:
        """The plan of per-group choices (`{group: choice}`, every group of `layers`)."""
        return Plan({layer.name: self.layer_plan(layer, choices[group])
                     for group, members in self.groups(layers).items() for layer in members})

    def plan(self, layers: list[LayerInfo], choice: dict[str, Any]) -> Plan:
        """The plan that gives every one of `layers` the same `choice` (see `layer_plan`)."""
        return Plan({layer.name: self.layer_plan(layer, choice) for layer in layers})

    def layer_plan(self, layer: LayerInfo, choice: dict[str, Any]) -> LayerPlan:
        """The layer plan for one group choice; unsearched knobs take their single value.

        A rank fraction that would store more weights than the dense layer leaves the layer full rank,
        a head fraction becomes the fraction of heads the attention's groups really keep, and a method
        whose technique is off takes the default: plans that do the same compare equal. A quantizer
        that stores one width (a GGUF type) sets the bits, and one whose format cannot hold the layer's
        rows gives way to its fallback (as llama-quantize does); `f16` keeps the layer in 16 bits. A
        format that needs whole groups (compressed-tensors) takes the largest offered group size, no
        larger than the one chosen, that divides the layer's inputs. Rows that structured pruning left
        too short for any of these keep 16 bits (llama-quantize's last fallback, F16); a rank whose
        factor rows the format cannot hold leaves the layer full rank, and so does one that saves no
        weights even with its basis shared; a full-rank layer or one outside the numbered blocks shares
        nothing. (`check_layers` refuses choices the unpruned layers cannot take at all.)
        """
        values = {**{knob: choices[0] for knob, choices in self.choices.items()}, **choice}
        channel_fraction = float(values["channel_fraction"]) if layer.kind in MLP_KINDS else 1.0
        head_fraction = float(values["head_fraction"]) if layer.kind in ATTENTION_KINDS else 1.0
        if head_fraction < 1.0 and layer.heads:  # the fraction the head groups allow: 0.5 of 3 per group is 2/3
            head_fraction = kept_heads(layer.heads, layer.kv_heads, head_fraction)[0] / layer.heads
        structure = LayerPlan(channel_fraction=channel_fraction, head_fraction=head_fraction)
        out_features, in_features = structured_shape(layer, structure)
        sparsity, pattern = _layer_plan_fields_for_sparsity(values["sparsity"])
        bits, quant_method = _quantization(int(values["bits"]), values["quant_method"], in_features)
        group_size = _whole_group(int(values["group_size"]), bits, quant_method, in_features, self.choices["group_size"])
        if group_size is None:
            bits, quant_method, group_size = 16, "rtn", int(values["group_size"])
        rank_fraction = float(values["rank_fraction"])
        share_blocks = int(values["share_blocks"]) if block_index(layer.name) is not None else 1
        if rank_fraction < 1.0 and not (saves_params(out_features, in_features, rank_fraction, share_blocks) and
                                        _holds_rows(rank_for(out_features, in_features, rank_fraction),
                                                    bits, quant_method, group_size)):
            rank_fraction = 1.0
        return LayerPlan(bits=bits, group_size=group_size, sparsity=sparsity,
                         pattern=pattern, prune_method=values["prune_method"] if sparsity else "magnitude",
                         quant_method=quant_method, rank_fraction=rank_fraction,
                         lowrank_method=values["lowrank_method"] if rank_fraction < 1.0 else "svd",
                         channel_fraction=channel_fraction, head_fraction=head_fraction,
                         share_blocks=share_blocks if rank_fraction < 1.0 else 1)

    def params_for(self, choices: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Optuna parameters for per-group choices: the names `suggest_plan` asks for (to enqueue a plan)."""
        return {f"{group}:{knob}": value for group, choice in choices.items() for knob, value in choice.items()}

    def choices_of(self, params: dict[str, Any], layers: list[LayerInfo]) -> dict[str, dict[str, Any]]:
        """Per-group choices from a trial's Optuna parameters (the inverse of `params_for`)."""
        knobs = self.knobs()
        return {group: {knob: params[f"{group}:{knob}"] for knob in knobs} for group in self.groups(layers)}

    def uniform_choices(self) -> Iterator[dict[str, Any]]:
        """Every combination of knob values: the plans where all groups choose alike."""
        knobs = self.knobs()
        for values in itertools.product(*knobs.values()):
            yield dict(zip(knobs, values))

    def with_choices(self, granularity: str | None = None, tie_fused: bool | None = None, **overrides: Any) -> "Space":
        """A copy with some choice lists (by their `choices` field, e.g. `bits`) replaced; None leaves one as it is."""
        offered = {knob.choices: self.choices[knob.name] for knob in KNOBS}
        offered.update({key: tuple(value) for key, value in overrides.items() if value is not None})
        return Space(self.name, self.granularity if granularity is None else granularity,
                     self.tie_fused if tie_fused is None else tie_fused, self.embeddings, **offered)

    def check_layers(self, layers: list[LayerInfo]) -> None:
        """Refuse N:M patterns that do not divide a layer's input size, head fractions for a model whose
        attention heads cannot be removed, and quant methods or group sizes a layer cannot take at all."""
        if any(value < 1.0 for value in self.choices["head_fraction"]):
            attention = [layer for layer in layers if layer.kind in ATTENTION_KINDS]
            if not attention or not all(layer.heads for layer in attention):
                raise SpaceError(f"head fractions {self.choices['head_fraction']} need attention with q/k/v/o_proj Linears and a "
                                 "known head layout (Llama-family models); this model's attention has none: "
                                 "pass --attention-heads 1")
        for value in self.choices["sparsity"]:
            if ":" in value:
                m = int(value.split(":")[1])
                bad = [layer.name for layer in layers if layer.in_features % m]
                if bad:
                    raise SpaceError(f"sparsity pattern {value} needs input sizes divisible by {m}; {bad[0]} has "
                                     f"{next(layer.in_features for layer in layers if layer.name == bad[0])}")
        self.fallbacks(layers)  # refuses a quant method or group size some layer cannot take at all

    def fallbacks(self, layers: list[LayerInfo]) -> dict[str, dict[str, str]]:
        """For each layer role (q_proj, down_proj, ...): choice -> what the layer really gets, where they
        differ: a GGUF K-type on rows it cannot hold falls back as llama-quantize does (`q4_k` -> `q5_0`,
        `f16` where the fallback cannot hold them either),
        a group size that does not divide the rows of a whole-group format to a smaller one
        (`group 128` -> `group 64`)."""
        found: dict[str, dict[str, str]] = {}
        for layer, method, actual, group_size, fitted in self._realized(layers):
            role = found.setdefault(f"{layer.kind} ({layer.in_features} inputs)", {})
            if method != FLOAT_METHOD and actual != method and len(self.choices["quant_method"]) > 1:
                role[method] = actual
            if fitted != group_size:
                role[f"group {group_size}"] = f"group {fitted}"
        return {role: changes for role, changes in found.items() if changes}

    def _realized(self, layers: list[LayerInfo]) -> Iterator[tuple[LayerInfo, str, str, int, int]]:
        """(layer, quant method offered, the one it gets, group size offered, the one it gets) for every
        layer; a choice a layer cannot take at all is a SpaceError naming the layer and the fix."""
        from compsearch.compress.techniques import QUANTIZERS

        offered = self.choices["group_size"]
        for layer in layers:
            for method in self.choices["quant_method"]:
                bits, actual = _quantization(4, method, layer.in_features)
                if method != FLOAT_METHOD and bits >= 16 and QUANTIZERS.get(method).fallback is None:
                    raise SpaceError(f"{layer.name}: quant_method={method!r} stores rows of a multiple of "
                                     f"{QUANTIZERS.get(method).storage.row_multiple} values; this layer has "
                                     f"{layer.in_features}; leave {method} out of --quant-methods")
                for group_size in offered:
                    fitted = _whole_group(group_size, bits, actual, layer.in_features, offered)
                    if fitted is None:
                        raise SpaceError(f"{layer.name}: {actual} needs whole groups, and no offered group size up "
                                         f"to {group_size} divides {layer.in_features} inputs; offer a smaller "
                                         "--group-sizes value (e.g. 32)")
                    yield layer, method, FLOAT_METHOD if bits >= 16 else actual, group_size, fitted


def _quantization(bits: int, quant_method: str, in_features: int) -> tuple[int, str]:
    """(bits, quant_method) of a layer for a choice: see `Space.layer_plan`."""
    from compsearch.compress.techniques import QUANTIZERS, quantizer_for

    if quant_method == FLOAT_METHOD:
        return 16, "rtn"
    if len(QUANTIZERS.get(quant_method).bits) == 1:  # the method is the format: it sets the width
        quantizer = quantizer_for(quant_method, in_features)
        return (quantizer.bits[0], quantizer.name) if quantizer else (16, "rtn")
    return bits, quant_method if bits < 16 else "rtn"


def _whole_group(group_size: int, bits: int, quant_method: str, in_features: int, offered: tuple) -> int | None:
    """The group size of a layer (see `Space.layer_plan`); None when no offered size gives whole groups."""
    from compsearch.compress.techniques import quantizer_format

    if bits >= 16 or in_features % group_size == 0 or not quantizer_format(quant_method).whole_groups:
        return group_size
    return max((int(g) for g in offered if int(g) <= group_size and in_features % int(g) == 0), default=None)


def _holds_rows(row_length: int, bits: int, quant_method: str, group_size: int) -> bool:
    """Whether a layer's format stores matrices with rows of `row_length` values (a low-rank factor's)."""
    from compsearch.compress.techniques import quantizer_format

    if bits >= 16:
        return True
    storage = quantizer_format(quant_method)
    return row_length % storage.row_multiple == 0 and not (storage.whole_groups and row_length % group_size)


def _layer_plan_fields_for_sparsity(value: str) -> tuple[float, str]:
    text = str(value)
    if ":" in text:
        if text not in PATTERNS:
            raise SpaceError(f"sparsity pattern {text!r} is not supported; use one of {PATTERNS[1:]}")
        return nm_sparsity(text), text
    try:
        ratio = float(text)
    except ValueError:
        raise SpaceError(f"sparsity {text!r} is neither a ratio like 0.5 nor an N:M pattern like 2:4") from None
    if not 0.0 <= ratio < 1.0:
        raise SpaceError(f"sparsity {text!r} must be in [0, 1); e.g. 0.5 removes half the weights")
    return ratio, "unstructured"


def _check_choices(what: str, values: tuple, allowed: tuple | None) -> None:
    if not values:
        raise SpaceError(f"the space offers no {what} choice; give at least one{f' of {allowed}' if allowed else ''}")
    bad = [value for value in values if allowed is not None and value not in allowed]
    if bad:
        raise SpaceError(f"{what} {bad[0]!r} is not supported; use values from {allowed}")


# The named spaces, as `Space` keywords; `get_space` builds one (checking its methods against the technique
# registries, which import torch: naming the spaces does not).
SPACE_KEYWORDS: dict[str, dict[str, Any]] = {
    "quant": dict(bits=(2, 3, 4, 5, 6, 8, 16), group_sizes=(32, 64, 128)),
    "sparse": dict(sparsities=("0", "0.25", "0.5", "0.75", "0.9", "2:4", "4:8"),
                   prune_methods=("magnitude", "wanda")),
    "lowrank": dict(rank_fractions=(1.0, 0.75, 0.5, 0.375, 0.25)),
    "joint": dict(bits=(2, 3, 4, 5, 6, 8, 16), group_sizes=(64, 128),
                  sparsities=("0", "0.25", "0.5", "2:4"), rank_fractions=(1.0, 0.5, 0.25)),
    # The default: `joint` without its plain SVD ranks, which destroy SmolLM2-135M at every rank offered
    # (methods benchmark) and were never chosen on a front, while their profile cells took a fifth of the
    # profile's time (benchmarks/results/search.csv compares the two).
    "quant-sparse": dict(bits=(2, 3, 4, 5, 6, 8, 16), group_sizes=(64, 128), sparsities=("0", "0.25", "0.5", "2:4")),
    # The same techniques with the algorithm behind each searched too (GPTQ, HQQ, k-means; SparseGPT;
    # whitened SVD), and structured pruning of MLP channels and attention heads: calibration Hessians are
    # measured once per worker.
    "quant-methods": dict(bits=(2, 3, 4, 8, 16), group_sizes=(64, 128), quant_methods=("rtn", "gptq", "hqq", "kmeans")),
    "sparse-methods": dict(sparsities=("0", "0.25", "0.5", "0.75", "2:4", "4:8"),
                           prune_methods=("magnitude", "wanda", "sparsegpt")),
    "lowrank-methods": dict(rank_fractions=(1.0, 0.75, 0.5, 0.375, 0.25),
                            lowrank_methods=("svd", "whiten")),
    # Head fractions are rounded to whole heads per key/value group: 0.67 keeps 2 of SmolLM2's 3, 3 of Llama-3's 4.
    "structured": dict(bits=(4, 8, 16), quant_methods=("gptq",),
                       channel_fractions=(1.0, 0.875, 0.75, 0.625, 0.5), head_fractions=(1.0, 0.67)),
    # GGUF tensor types (llama.cpp), per tensor (q/k/v and gate/up apart: llama.cpp's own mixes give attn_v
    # more bits than attn_q) and for the token embedding. f16 first: it is the "off" choice.
    "gguf": dict(granularity="layer", tie_fused=False, embeddings=True, quant_methods=(
        "f16", "q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "iq4_nl", "q5_1", "q5_0", "q4_1", "q4_0")),
    # What vLLM serves fast from compressed-tensors checkpoints: symmetric integer weights at 4 and 8 bits
    # (W4A16, W8A16), grouped, GPTQ or round-to-nearest; q/k/v and gate/up tied as vLLM fuses them.
    "vllm": dict(granularity="layer", bits=(4, 8, 16), group_sizes=(32, 64, 128),
                 quant_methods=("gptq-sym", "rtn-sym")),
    "sota": dict(bits=(2, 3, 4, 8, 16), group_sizes=(64, 128), quant_methods=("gptq", "hqq"),
                 sparsities=("0", "0.5", "2:4"), prune_methods=("sparsegpt",), rank_fractions=(1.0, 0.5),
                 lowrank_methods=("whiten",), channel_fractions=(1.0, 0.75), head_fractions=(1.0, 0.67)),
}


DEFAULT_SPACE = "quant-sparse"


@functools.cache
def get_space(name: str) -> Space:
    """The named space (see `SPACE_KEYWORDS`)."""
    if name not in SPACE_KEYWORDS:
        raise SpaceError(f"space {name!r} is unknown; choose one of {sorted(SPACE_KEYWORDS)}")
    return Space(name, **SPACE_KEYWORDS[name])
