"""OWL: non-uniform per-block sparsity from outlier statistics, as a seed plan for the search.

Yin et al., "Outlier Weighed Layerwise Sparsity (OWL)" (2023). A block whose Wanda scores
|W_ij| * ||X_j|| hold more outliers (scores above `threshold` x the block's mean score) is pruned
less: the outlier ratios are min-max scaled to [0, 2 * lam], centred, and added to the target
density, so every block's sparsity lies within `lam` of the target and the parameter-weighted
average sparsity is the target.
"""
from __future__ import annotations

import torch
from torch import nn

from compsearch.spaces.layers import LayerInfo
from compsearch.spaces.plan import LayerPlan, Plan, PlanError

OUTLIER_THRESHOLD = 5.0  # OWL's M
SPARSITY_SPREAD = 0.08  # OWL's lambda: the largest deviation from the target sparsity
SPARSITY_DECIMALS = 3


@torch.no_grad()
def outlier_ratios(model: nn.Module, layers: list[LayerInfo], input_norms: dict[str, torch.Tensor],
                   threshold: float = OUTLIER_THRESHOLD) -> dict[str, float]:
    """Per decoder block: the fraction of its Wanda scores above `threshold` x their mean."""
    by_block: dict[str, list[torch.Tensor]] = {}
    for layer in layers:
        if layer.name not in input_norms:
            raise PlanError(f"OWL needs the calibration input norms of {layer.name}; compute them first")
        weight = model.get_submodule(layer.name).weight.detach().float()
        by_block.setdefault(layer.block, []).append((weight.abs() * input_norms[layer.name].float()).reshape(-1))
    ratios = {}
    for block, scores in by_block.items():
        flat = torch.cat(scores)
        ratios[block] = (flat > threshold * flat.mean()).float().mean().item()
    return ratios


def owl_sparsities(ratios: dict[str, float], block_params: dict[str, int], target_sparsity: float,
                   spread: float = SPARSITY_SPREAD) -> dict[str, float]:
    """Sparsity per block: more outliers, less sparsity; the parameter-weighted mean is the target."""
    if not 0.0 <= target_sparsity < 1.0:
        raise PlanError(f"target sparsity {target_sparsity!r} must be in [0, 1)")
    values = torch.tensor([ratios[block] for block in ratios], dtype=torch.float64)
    params = torch.tensor([block_params[block] for block in ratios], dtype=torch.float64)
    span = values.max() - values.min()
    scaled = (values - values.min()) / span * 2 * spread if span > 0 else torch.zeros_like(values)
    density = scaled - (scaled * params).sum() / params.sum() + (1.0 - target_sparsity)
    sparsity = (1.0 - density).clamp(0.0, 0.99)
    return {block: round(float(value), SPARSITY_DECIMALS) for block, value in zip(ratios, sparsity)}


def owl_plan(model: nn.Module, layers: list[LayerInfo], input_norms: dict[str, torch.Tensor],
             target_sparsity: float, prune_method: str = "wanda", base: LayerPlan | None = None,
             spread: float = SPARSITY_SPREAD, threshold: float = OUTLIER_THRESHOLD) -> Plan:
    """A plan pruning every layer of a block to its OWL sparsity (unstructured, by `prune_method`).

    `base` carries the layers' other choices (bits, quantizer, ...). Sparsities are rounded to
    three decimals, so they are exact plan values rather than the space's discrete choices: a
    search seeds from the plan itself (or snaps each block to its nearest choice).
    """
    ratios = outlier_ratios(model, layers, input_norms, threshold)
    block_params: dict[str, int] = {}
    for layer in layers:
        block_params[layer.block] = block_params.get(layer.block, 0) + layer.num_params
    sparsities = owl_sparsities(ratios, block_params, target_sparsity, spread)
    base = base or LayerPlan()
    fields = base.to_dict()
    plans = {}
    for layer in layers:
        fields.update(sparsity=sparsities[layer.block], pattern="unstructured",
                      prune_method=prune_method if sparsities[layer.block] > 0 else base.prune_method)
        plans[layer.name] = LayerPlan(**fields)
    return Plan(plans)
