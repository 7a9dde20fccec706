"""The knobs of a layer plan, written once: `LayerPlan` fields, space choices, CLI and job-spec
overrides, sensitivity factors and seeding are all read from `KNOBS`.

A knob is one `LayerPlan` field a space can search. Its `choices` name is the `Space` / `JobSpec`
field that lists the values offered (`bits` -> `bits`, `group_size` -> `group_sizes`); `factor` is the
technique it belongs to (knobs of one factor are measured together by the sensitivity profile);
`off` is the choice that turns that technique off (None for a knob that picks an algorithm or a
parameter of one). `allowed` gives the supported values: a fixed tuple, or the names registered in a
technique registry (`compsearch.compress.techniques`), looked up when asked so plug-ins count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

QUANT_BITS = (2, 3, 4, 5, 6, 8, 16)  # 16 means "keep at 16-bit float"
GROUP_SIZES = (32, 64, 128)
SHARE_BLOCKS = (1, 2, 3, 4)  # 1: each layer keeps its own low-rank factors
FLOAT_METHOD = "f16"  # a `quant_method` choice of a space: keep the layer at 16 bits (GGUF's F16)


def _registered(registry: str, *extra: str) -> Callable[[], tuple]:
    def names() -> tuple:
        from compsearch.compress import techniques  # the registries live with the code they name

        return (*extra, *getattr(techniques, registry).names())
    return names


@dataclass(frozen=True)
class Knob:
    name: str  # the LayerPlan field
    choices: str  # the Space / JobSpec field listing the values offered
    label: str  # what error messages call one value
    parse: Callable[[str], Any]  # one value as written on the command line
    default: tuple  # what a space offers when it does not search the knob
    factor: str
    flag: str
    help: str
    off: Any = None
    allowed: Callable[[], tuple] | None = None

    def supported(self) -> tuple | None:
        return self.allowed() if self.allowed else None


# In the order trials are asked for them (a different order would change what seeded samplers draw).
KNOBS: tuple[Knob, ...] = (
    Knob("bits", "bits", "bits", int, (16,), "quant", "--bits", "bit widths, e.g. 2,3,4,8,16", off=16,
         allowed=lambda: QUANT_BITS),
    Knob("group_size", "group_sizes", "group size", int, (128,), "quant", "--group-sizes",
         "group sizes, e.g. 64,128", allowed=lambda: GROUP_SIZES),
    Knob("sparsity", "sparsities", "sparsity", str, ("0",), "sparsity", "--sparsity",
         "sparsities: ratios and N:M patterns, e.g. 0,0.5,2:4", off="0"),
    Knob("prune_method", "prune_methods", "prune method", str, ("wanda",), "sparsity", "--prune-methods",
         "pruners to search", allowed=_registered("PRUNERS")),
    Knob("rank_fraction", "rank_fractions", "rank fraction", float, (1.0,), "lowrank", "--ranks",
         "kept fractions of full rank, e.g. 1,0.5", off=1.0),
    Knob("quant_method", "quant_methods", "quant method", str, ("rtn",), "quant", "--quant-methods",
         "quantizers to search (GGUF types such as q4_k set the bits; f16 keeps 16 bits)",
         allowed=_registered("QUANTIZERS", FLOAT_METHOD)),
    Knob("lowrank_method", "lowrank_methods", "low-rank method", str, ("svd",), "lowrank", "--lowrank-methods",
         "factorizations to search", allowed=_registered("FACTORIZATIONS")),
    Knob("channel_fraction", "channel_fractions", "MLP channel fraction", float, (1.0,), "channel_fraction",
         "--mlp-channels", "kept fractions of MLP channels (structured pruning; block granularity), e.g. 1,0.75",
         off=1.0),
    Knob("head_fraction", "head_fractions", "attention head fraction", float, (1.0,), "head_fraction",
         "--attention-heads", "kept fractions of attention heads (structured pruning; block granularity; rounded "
         "to whole heads per key/value group), e.g. 1,0.75", off=1.0),
    Knob("share_blocks", "share_blocks", "blocks sharing a basis", int, (1,), "lowrank", "--share-blocks",
         "adjacent decoder blocks whose low-rank layers of one kind share one basis (Basis Sharing; decisions "
         "then span that many blocks), e.g. 1,2", off=1, allowed=lambda: SHARE_BLOCKS),
)
KNOB_NAMES = tuple(knob.name for knob in KNOBS)
CHOICE_FIELDS = tuple(knob.choices for knob in KNOBS)


def factors() -> dict[str, tuple[str, ...]]:
    """Technique -> its knobs, in knob order (e.g. `quant` -> bits, group_size, quant_method)."""
    result: dict[str, tuple[str, ...]] = {}
    for knob in KNOBS:
        result[knob.factor] = result.get(knob.factor, ()) + (knob.name,)
    return result


def off_values() -> dict[str, Any]:
    """Knob -> the choice that turns its technique off, for the knobs that have one."""
    return {knob.name: knob.off for knob in KNOBS if knob.off is not None}
