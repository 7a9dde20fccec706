"""Applying a `Plan` to a model: structure (MLP channels, attention heads), low-rank, sparsity, quantization."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from compsearch.compress.edits import ModelEdits
from compsearch.compress.formats import StorageFormat
from compsearch.compress.lowrank import LowRankLinear, factorize
from compsearch.compress.matrix import MatrixLayout, MatrixStats, StoredMatrix, compress_matrix
from compsearch.compress.prune import kept_count
from compsearch.compress.storage import FLOAT_BITS
from compsearch.compress.structured import regroup_heads_, remove_structure_
from compsearch.compress.techniques import FACTORIZATIONS, HESSIAN, NORMS, quantizer_format
from compsearch.compress.variants import VariantCache
from compsearch.spaces.layers import LayerInfo, layer_info
from compsearch.spaces.plan import (STRUCTURES, LayerPlan, Plan, PlanError, rank_for, saves_params, share_owner,
                                    structured_shape)

__all__ = ["AppliedPlan", "MatrixLayout", "StoredMatrix", "apply_plan_", "compress_matrix", "layer_layout", "layer_nbytes",
           "plan_bits_per_weight", "plan_nbytes", "shape_like_plan_", "stored_layouts"]

log = logging.getLogger(__name__)
_COLUMN_KINDS = {kind for _, cols in STRUCTURES.values() for kind in cols}  # lose input columns to structure


def layer_layout(layer: LayerInfo, plan: LayerPlan) -> list[MatrixLayout]:
    """The matrices a layer computes with under its plan: its weight, or two low-rank factors (the `down`
    one under its owner's name where the layer shares it, `share_owner`).

    `layer` has the base model's shape; structured pruning shrinks it first.
    """
    out_features, in_features = structured_shape(layer, plan)
    if plan.rank_fraction < 1.0:
        if not saves_params(out_features, in_features, plan.rank_fraction, plan.share_blocks):
            raise PlanError(
                f"rank_fraction={plan.rank_fraction} on {layer.name} ({out_features}x{in_features}"
                f"{f', basis shared by {plan.share_blocks} blocks' if plan.share_blocks > 1 else ''}) "
                "stores more weights than the dense matrix; use a smaller rank_fraction or 1.0"
            )
        rank = rank_for(out_features, in_features, plan.rank_fraction)
        down = share_owner(layer.name, plan.share_blocks) if plan.share_blocks > 1 else layer.name
        shapes = [(f"{down}.down.weight", rank, in_features),
                  (f"{layer.name}.up.weight", out_features, rank)]
    else:
        shapes = [(f"{layer.name}.weight", out_features, in_features)]
    return [
        MatrixLayout(key, rows, cols, kept_count(rows, cols, plan.sparsity, plan.pattern), plan.bits,
                     plan.group_size, plan.quant_method)
        for key, rows, cols in shapes
    ]


def stored_layouts(layer: LayerInfo, plan: LayerPlan) -> list[MatrixLayout]:
    """The matrices a layer stores: those of `layer_layout` under its own name (a shared basis is stored
    once, by its owner)."""
    return [layout for layout in layer_layout(layer, plan) if layout.key.startswith(f"{layer.name}.")]


def layer_nbytes(layer: LayerInfo, plan: LayerPlan) -> int:
    """Bytes of one layer under its plan, bias (kept at 16 bits) included; a shared basis counts once, with
    its owner (`plan_nbytes` of a plan whose runs are whole is exact)."""
    out_features, _ = structured_shape(layer, plan)
    bias_bytes = out_features * FLOAT_BITS // 8 if layer.has_bias else 0
    return sum(m.nbytes for m in stored_layouts(layer, plan)) + bias_bytes


def plan_nbytes(layers: list[LayerInfo], plan: Plan, total_params: int) -> int:
    """Bytes of the whole model under a plan; everything outside `layers` is kept at 16 bits."""
    layer_params = sum(layer.num_params for layer in layers)
    other_bytes = (total_params - layer_params) * FLOAT_BITS // 8
    return other_bytes + sum(layer_nbytes(layer, plan[layer.name]) for layer in layers)


def plan_bits_per_weight(layers: list[LayerInfo], plan: Plan) -> float:
    """Average stored bits per original weight of the planned layers, metadata included."""
    total_bits = 8 * sum(layer_nbytes(layer, plan[layer.name]) for layer in layers)
    return total_bits / sum(layer.num_params for layer in layers)


@dataclass
class AppliedPlan:
    """What `apply_plan_` did: the stored matrices by state-dict key (when asked for), and the modules it
    changed (`edits.undo_(model)` puts them back when it was asked to be undoable)."""

    stored: dict[str, StoredMatrix]
    edits: ModelEdits


def apply_plan_(
    model: nn.Module,
    plan: Plan,
    input_norms: dict[str, torch.Tensor] | None = None,
    keep_stored: bool = False,
    svd_cache: dict[str, tuple[torch.Tensor, ...]] | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
    undoable: bool = False,
    variants: VariantCache | None = None,
) -> AppliedPlan:
    """Compress the planned layers of `model` in place.

    Techniques that use calibration statistics (`LayerPlan.needs_norms`, `needs_hessian`) read
    `input_norms[layer name]` (calibration input L2 norms per input feature) and `hessians[layer name]`
    (X^T X / tokens of the base model's inputs, `calibration.input_hessians`). The `up` factor of a
    low-rank layer reads the `down` factor's output: its Hessian is D H D^T, and it has no norms.
    `svd_cache` (a per-process dict) is read and filled with what depends only on the base model --
    each layer's SVD (plain or whitened) and inverse-Hessian factor -- so a worker that compresses
    the same base model many times computes each once.
    Returns the stored matrices by state-dict key when `keep_stored` (needed to write a checkpoint), and
    the modules changed, with copies of their originals when `undoable` (then a failure part-way
    restores them before it is raised). `variants` (a worker's cache) supplies and keeps compressed
    matrices by layer plan, so each variant of a layer is computed once.
    """
    applied = AppliedPlan({}, ModelEdits(undoable))
    try:
        _apply_(model, plan, input_norms or {}, hessians or {}, keep_stored, svd_cache, variants, applied)
    except BaseException:
        if undoable:  # nothing is left half-applied
            applied.edits.undo_(model)
        raise
    return applied


def _apply_(model: nn.Module, plan: Plan, input_norms: dict, hessians: dict, keep_stored: bool,
            svd_cache: dict | None, variants: VariantCache | None, applied: AppliedPlan) -> None:
    _check_statistics(plan, input_norms, hessians, model)
    infos = {name: _planned_layer(model, name) for name, lp in plan.layers.items() if not lp.is_identity}
    kept_index = remove_structure_(model, plan, hessians, applied.edits)
    stats = {name: _matrix_stats(name, plan[name], input_norms, hessians, kept_index.get(name), svd_cache)
             for name in infos}
    bases = {owner: _shared_basis(model, owner, members, plan[owner], stats, svd_cache)
             for owner, members in plan.shared_bases().items()}
    for name, info in infos.items():
        layer_plan = plan[name]
        applied.edits.before_change(model, name)
        module = model.get_submodule(name)
        layouts = layer_layout(info, layer_plan)
        if layer_plan.share_blocks > 1:
            owner = share_owner(name, layer_plan.share_blocks)
            targets, all_stats = _use_shared_basis_(model, module, info, bases[owner])
            if name != owner:
                layouts, targets, all_stats = layouts[1:], targets[1:], all_stats[1:]  # the owner compresses the basis
        elif len(layouts) == 2:
            targets, all_stats = _factorize_(model, module, info, layer_plan, layouts, stats[name], svd_cache)
        else:
            targets, all_stats = [module], [stats[name]]
        cache = variants if layer_plan.share_blocks == 1 else None  # a shared basis depends on the run's layers
        for layout, linear, matrix_stats in zip(layouts, targets, all_stats):
            matrix = cache.get(layout.key, layer_plan) if cache is not None else None
            if matrix is None:
                matrix = compress_matrix(linear.weight.data, layout, layer_plan, matrix_stats)
                if cache is not None:
                    cache.put(layout.key, layer_plan, matrix)
            linear.weight.data.copy_(matrix.weight)
            if keep_stored:
                applied.stored[layout.key] = matrix
        storage = quantizer_format(layer_plan.quant_method) if layer_plan.bits < FLOAT_BITS else None
        if storage is not None and storage.rounds_inputs:
            _round_inputs_(model, name, targets, storage, applied.edits)
        bias = getattr(targets[-1], "bias", None)  # an embedding has none
        if bias is not None:
            bias.data.copy_(bias.data.half().float())


def _round_inputs_(model: nn.Module, name: str, targets: list[nn.Module], storage: StorageFormat,
                   edits: ModelEdits) -> None:
    """Make the matrices of layer `name` round their inputs as the runtime of their format does (a
    token embedding's rows are looked up, not multiplied: the output head that shares its weight)."""
    if isinstance(targets[0], nn.Embedding):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or head.weight is not targets[0].weight:
            return
        edits.before_change(model, next(key for key, module in model.named_modules() if module is head))
        targets = [head]
    for linear in targets:
        linear.register_forward_pre_hook(lambda _, args: (storage.round_inputs(args[0]), *args[1:]))


def _planned_layer(model: nn.Module, name: str) -> LayerInfo:
    try:
        return layer_info(model, name)
    except ValueError as error:
        raise PlanError(f"the plan names {error}") from None


def _check_statistics(plan: Plan, input_norms: dict, hessians: dict, model: nn.Module) -> None:
    for name, layer_plan in plan.layers.items():
        if isinstance(model.get_submodule(name), nn.Embedding):
            continue  # rows are looked up, not multiplied with inputs: there are no input statistics
        users = {need: [t.name for t in layer_plan.techniques() if need in t.needs] for need in (NORMS, HESSIAN)}
        if layer_plan.needs_norms and name not in input_norms:
            raise PlanError(f"{name} uses {', '.join(users[NORMS])}, which need calibration input "
                            "norms (compress.input_norms); compute them first")
        if layer_plan.needs_hessian and name not in hessians:
            what = ", ".join(users[HESSIAN] + (["structured pruning"] if layer_plan.is_structured else []))
            raise PlanError(f"{name} uses {what}, which need calibration Hessians (compress.input_hessians); "
                            "compute them first")


def _matrix_stats(name: str, plan: LayerPlan, input_norms: dict, hessians: dict, index: torch.Tensor | None,
                  cache: dict | None) -> MatrixStats:
    """The layer's input statistics, restricted to the input columns structured pruning kept."""
    # Only what the plan needs: a layer's result never depends on which statistics the caller had at hand.
    norms = input_norms.get(name) if plan.needs_norms else None
    hessian = hessians.get(name) if plan.needs_hessian else None
    if index is not None and name.rsplit(".", 1)[-1] in _COLUMN_KINDS:
        norms = norms[index] if norms is not None else None
        hessian = hessian[index][:, index] if hessian is not None else None
    return MatrixStats(norms, hessian, cache, f"{name}#hinv@{plan.structure_key}")


def _factorize_(model: nn.Module, module: nn.Linear, layer: LayerInfo, plan: LayerPlan,
                layouts: list[MatrixLayout], stats: MatrixStats,
                svd_cache: dict | None) -> tuple[list[nn.Linear], list[MatrixStats]]:
    svd = _cached_svd(svd_cache, f"{layer.name}#{plan.lowrank_method}@{plan.structure_key}", plan.lowrank_method,
                      module.weight.data.float(), stats, layer.name)
    down, up = factorize(module.weight.data, layouts[0].rows, svd)
    low_rank = _low_rank_(model, layer.name, module, down, up)
    up_hessian = down @ stats.hessian @ down.T if stats.hessian is not None else None
    return [low_rank.down, low_rank.up], [stats, MatrixStats(None, up_hessian)]


def _cached_svd(svd_cache: dict | None, key: str, lowrank_method: str, weight: torch.Tensor, stats: MatrixStats,
                name: str) -> tuple[torch.Tensor, ...]:
    """The SVD `lowrank_method` makes of `weight`, from the worker's `svd_cache` when it holds `key`."""
    svd = svd_cache.get(key) if svd_cache is not None else None
    if svd is None:
        svd = FACTORIZATIONS.get(lowrank_method).svd(weight, stats, name)
        if svd_cache is not None:
            svd_cache[key] = svd
    return svd


def _low_rank_(model: nn.Module, name: str, module: nn.Linear, down: torch.Tensor | nn.Linear,
               up: torch.Tensor) -> LowRankLinear:
    """Put a LowRankLinear in place of `module` at `name`: `up` and the module's bias, and `down` as a weight,
    or as the basis module it shares with other layers."""
    low_rank = LowRankLinear(module.in_features, module.out_features, up.shape[1], module.bias is not None,
                             dtype=module.weight.dtype, device=module.weight.device)
    if isinstance(down, nn.Linear):
        low_rank.down = down
    else:
        low_rank.down.weight.data.copy_(down)
    low_rank.up.weight.data.copy_(up)
    if module.bias is not None:
        low_rank.up.bias.data.copy_(module.bias.data)
    model.set_submodule(name, low_rank)
    return low_rank


@dataclass
class SharedBasis:
    """The `down` factor the layers of a run of blocks share (one module, in every member's LowRankLinear),
    the statistics of its inputs (the members' mean), and each member's own `up` factor and its Hessian."""

    down: nn.Linear
    stats: MatrixStats
    ups: dict[str, torch.Tensor]
    up_hessians: dict[str, torch.Tensor | None]


def _shared_basis(model: nn.Module, owner: str, members: list[str], layer_plan: LayerPlan,
                  stats: dict[str, MatrixStats], svd_cache: dict | None) -> SharedBasis:
    """Basis Sharing (Wang et al., ICLR 2025): the members' weights stacked by rows, [W_1; ...; W_k] = U S V^T
    (whitened by the members' summed input Hessians with `whiten`), give one basis V_r^T for all and each
    member its rows of U_r S_r: W_i ~ up_i @ down, the best rank-r fit of the stack."""
    weights = [model.get_submodule(name).weight.data.float() for name in members]
    member_stats = [stats[name] for name in members]
    hessian = (sum(s.hessian for s in member_stats) / len(members)
               if all(s.hessian is not None for s in member_stats) else None)
    norms = (torch.stack([s.norms.square() for s in member_stats]).mean(0).sqrt()
             if all(s.norms is not None for s in member_stats) else None)
    structure = f"{layer_plan.structure_key},shared-by={len(members)}"
    basis_stats = MatrixStats(norms, hessian, svd_cache, f"{owner}#shared-hinv@{structure}")
    stacked = torch.cat(weights)
    svd = _cached_svd(svd_cache, f"{owner}#shared-{layer_plan.lowrank_method}@{structure}", layer_plan.lowrank_method,
                      stacked, basis_stats, owner)
    out_features, in_features = weights[0].shape
    rank = rank_for(out_features, in_features, layer_plan.rank_fraction)
    down, ups = factorize(stacked, rank, svd)
    owner_weight = model.get_submodule(owner).weight
    module = nn.Linear(in_features, rank, bias=False, dtype=owner_weight.dtype, device=owner_weight.device)
    module.weight.data.copy_(down)
    up_hessians = {name: down @ s.hessian @ down.T if s.hessian is not None else None
                   for name, s in zip(members, member_stats)}
    return SharedBasis(module, basis_stats, dict(zip(members, ups.split(out_features))), up_hessians)


def _use_shared_basis_(model: nn.Module, module: nn.Linear, layer: LayerInfo,
                       basis: SharedBasis) -> tuple[list[nn.Linear], list[MatrixStats]]:
    low_rank = _low_rank_(model, layer.name, module, basis.down, basis.ups[layer.name])
    return [low_rank.down, low_rank.up], [basis.stats, MatrixStats(None, basis.up_hessians[layer.name])]


def shape_like_plan_(model: nn.Module, layers: list[LayerInfo], plan: Plan) -> None:
    """Give `model` the module structure of a compressed one (thinned MLPs and attentions, low-rank
    layers), weights left as they are: the shell a checkpoint loads into."""
    for layer in layers:
        layer_plan = plan[layer.name]
        layouts = layer_layout(layer, layer_plan)
        module = model.get_submodule(layer.name)
        kwargs = {"dtype": module.weight.dtype, "device": module.weight.device}
        if len(layouts) == 2:
            model.set_submodule(layer.name, LowRankLinear(
                layouts[0].cols, layouts[1].rows, layouts[0].rows, layer.has_bias, **kwargs))
        elif layer_plan.is_structured:
            model.set_submodule(layer.name, nn.Linear(layouts[0].cols, layouts[0].rows, bias=layer.has_bias, **kwargs))
    for owner, members in plan.shared_bases().items():  # one basis module, shared
        for name in members[1:]:
            model.get_submodule(name).down = model.get_submodule(owner).down
    by_name = {layer.name: layer for layer in layers}
    for attention, fraction in plan.structured_fractions("head_fraction").items():
        q_proj = by_name[f"{attention}.q_proj"]
        regroup_heads_(model.get_submodule(attention), q_proj.heads, q_proj.kv_heads, fraction)
