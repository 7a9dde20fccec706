"""The compressible layers of a model and how they group into search decisions."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from compsearch.spaces.plan import ATTENTION_KINDS, BLOCK_INDEX, block_index, share_owner

GRANULARITIES = ("layer", "block", "type", "model")
# Projections that read the same input and are usually fused in inference kernels.
TIED_PROJECTIONS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"query", "key", "value"})

if TYPE_CHECKING:  # torch is imported where a model is read, so the command line parses without it
    from torch import nn


@dataclass(frozen=True)
class LayerInfo:
    """Name and shape of one Linear layer; for an attention projection, the attention's head geometry.

    `heads`, `kv_heads` and `head_dim` are the attention's query heads, key/value heads and head width
    (0 outside attention, or where the attention does not expose them: its heads cannot be pruned).
    """

    name: str
    out_features: int
    in_features: int
    has_bias: bool = False
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0

    @property
    def num_params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.has_bias else 0)

    @property
    def kind(self) -> str:
        """The layer's role, e.g. `q_proj`: the last component of its name."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def block(self) -> str:
        """The decoder block holding the layer, e.g. `model.layers.3`, or the name itself outside blocks."""
        match = BLOCK_INDEX.search(self.name)
        return self.name[: match.end() - 1] if match else self.name

    def to_dict(self) -> dict:
        return asdict(self)


def linear_layers(model: nn.Module, include_lm_head: bool = False) -> list[LayerInfo]:
    """Every nn.Linear of the model, in module order; the output head only when asked for."""
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [layer_info(model, name) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (module is not head or include_lm_head)]


def embedding_layers(model: nn.Module) -> list[LayerInfo]:
    """The input token embedding as a layer a plan can quantize (rows: tokens; columns: hidden features).
    A tied output head shares it, and changes with it."""
    from torch import nn

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    names = {id(module): name for name, module in model.named_modules()}
    return [layer_info(model, names[id(embeddings)])] if isinstance(embeddings, nn.Embedding) else []


def layer_info(model: nn.Module, name: str) -> LayerInfo:
    """The `LayerInfo` of the Linear (or token embedding) at `name`, with its attention's head geometry
    where it has one."""
    from torch import nn

    module = model.get_submodule(name)
    if isinstance(module, nn.Embedding):
        return LayerInfo(name, module.num_embeddings, module.embedding_dim)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{name!r} is a {type(module).__name__}, not a Linear layer")
    geometry = attention_geometry(model, name.rpartition(".")[0]) if name.rsplit(".", 1)[-1] in ATTENTION_KINDS else None
    return LayerInfo(name, module.out_features, module.in_features, module.bias is not None, *(geometry or ()))


def attention_geometry(model: nn.Module, attention: str) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head width) of an attention module with q/k/v/o projections
    that reads its head count from the projections' shapes (`head_dim` and `num_key_value_groups`
    attributes, as the Llama family has); None for any other module."""
    from torch import nn

    module = model.get_submodule(attention) if attention else model
    head_dim = getattr(module, "head_dim", None)
    groups = getattr(module, "num_key_value_groups", None)
    projections = [getattr(module, kind, None) for kind in ATTENTION_KINDS]
    if not (isinstance(head_dim, int) and isinstance(groups, int) and head_dim > 0 and groups > 0
            and all(isinstance(p, nn.Linear) for p in projections)):
        return None
    heads = projections[0].out_features // head_dim
    return heads, heads // groups, head_dim


def head_is_tied(model: nn.Module) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def count_params(model: nn.Module) -> int:
    """Parameters of the model, shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def group_layers(layers: list[LayerInfo], granularity: str, tie_fused: bool = True,
                 block_span: int = 1) -> dict[str, list[str]]:
    """Map each decision group's name to the layer names that share its choices.

    `layer`: one group per layer (fused projections share one when `tie_fused`);
    `block`: one group per decoder block; `type`: one group per role (all `v_proj`, ...);
    `model`: one group for everything (uniform plans only: the baseline users start from).
    With `block_span` > 1, a `layer` or `block` group takes in that many adjacent blocks (blocks 0-1, 2-3, ...
    for 2: `model.layers.2-3`), so that layers sharing a basis across them choose together.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is unknown; use one of {GRANULARITIES}")
    groups: dict[str, list[str]] = {}
    for layer in layers:
        groups.setdefault(_group_key(layer, granularity, tie_fused, block_span), []).append(layer.name)
    return groups


def _group_key(layer: LayerInfo, granularity: str, tie_fused: bool, block_span: int) -> str:
    if granularity == "model":
        return "model"
    if granularity == "type":
        return layer.kind
    key = layer.block if granularity == "block" else _layer_key(layer, tie_fused)
    match = BLOCK_INDEX.search(layer.name)
    if block_span == 1 or match is None:
        return key
    first = block_index(share_owner(layer.name, block_span))  # the run's first block, whose layers own its bases
    # the key begins with the layer's name up to the block index
    return f"{key[:match.start(1)]}{first}-{first + block_span - 1}{key[match.end(1):]}"


def _layer_key(layer: LayerInfo, tie_fused: bool) -> str:
    if tie_fused:
        for tied in TIED_PROJECTIONS:
            if layer.kind in tied:
                prefix = layer.name.rsplit(".", 1)[0]
                return f"{prefix}.{'+'.join(sorted(tied))}"
    return layer.name


def meta_model(config, trust_remote_code: bool = False) -> nn.Module:
    """The model's module tree without allocating weights: enough to read names and shapes."""
    import torch

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
