"""Uniform presets written as text (`rtn:4:g128`, `gptq:3:g128`, `wanda:2:4`, `q4_k`, `svd:0.5`, joined
by `+`): one choice for every layer, as users name the configurations they already run."""
from __future__ import annotations

from compsearch.spaces.knobs import FLOAT_METHOD
from compsearch.spaces.layers import LayerInfo
from compsearch.spaces.plan import Plan
from compsearch.spaces.space import Space, SpaceError

EXAMPLES = "rtn:4:g128, gptq:3:g64, q4_k, wanda:0.5, sparsegpt:2:4, whiten:0.5, wanda:2:4+rtn:8:g128"


class PresetError(ValueError):
    """A preset that cannot be read; the message names it and shows how to write one."""


def preset_choices(text: str) -> dict[str, tuple]:
    """The `Space` choices (one value per knob) a preset names, e.g. `gptq:3:g128` ->
    {"quant_methods": ("gptq",), "bits": (3,), "group_sizes": (128,)}."""
    from compsearch.compress.techniques import FACTORIZATIONS, PRUNERS, QUANTIZERS

    choices: dict[str, tuple] = {}
    for part in filter(None, (part.strip() for part in text.lower().split("+"))):
        method, *args = part.split(":")
        if method in QUANTIZERS.names() or method == FLOAT_METHOD:
            update = _quantization(method, args, part)
        elif method in PRUNERS.names():
            if len(args) not in (1, 2):
                raise PresetError(f"preset part {part!r}: give a sparsity after the pruner, e.g. {method}:0.5 or {method}:2:4")
            update = {"prune_methods": (method,), "sparsities": (":".join(args),)}
        elif method in FACTORIZATIONS.names():
            if len(args) != 1:
                raise PresetError(f"preset part {part!r}: give the kept rank fraction, e.g. {method}:0.5")
            update = {"lowrank_methods": (method,), "rank_fractions": (_number(args[0], part, float),)}
        else:
            raise PresetError(f"preset {text!r}: {method!r} is not a quantizer ({', '.join(QUANTIZERS.names())}, f16), "
                              f"pruner ({', '.join(PRUNERS.names())}) or factorization ({', '.join(FACTORIZATIONS.names())})"
                              f"; write e.g. {EXAMPLES}")
        if set(update) & set(choices):
            raise PresetError(f"preset {text!r} names {part!r}'s technique twice; give one per technique")
        choices.update(update)
    if not choices:
        raise PresetError(f"preset {text!r} is empty; write e.g. {EXAMPLES}")
    return choices


def uniform_plan(text: str, layers: list[LayerInfo]) -> Plan:
    """The plan that gives every layer the preset `text` (formats that cannot hold a layer's rows give
    way to their fallbacks, as in a study)."""
    try:
        space = Space("uniform", granularity="model", **preset_choices(text))
        return space.plan(layers, {})
    except SpaceError as err:
        raise PresetError(f"preset {text!r}: {err}") from None


def _quantization(method: str, args: list[str], part: str) -> dict[str, tuple]:
    from compsearch.compress.techniques import QUANTIZERS

    update: dict[str, tuple] = {"quant_methods": (method,)}
    if method == FLOAT_METHOD or len(QUANTIZERS.get(method).bits) == 1:  # the format is the width (GGUF types)
        if args:
            raise PresetError(f"preset part {part!r}: {method} sets its own bits and blocks; write just {method}")
        return update
    for arg in args:
        key, value = ("group_sizes", arg[1:]) if arg.startswith("g") else ("bits", arg)
        update[key] = (_number(value, part, int),)
    if "bits" not in update:
        raise PresetError(f"preset part {part!r}: give the bits (and a group size), e.g. {method}:4:g128")
    return update


def _number(text: str, part: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise PresetError(f"preset part {part!r}: {text!r} is not a number; write e.g. {EXAMPLES}") from None
