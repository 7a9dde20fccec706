"""Structured pruning of MLP intermediate channels: smaller dense matrices, faster on any hardware.

A gated MLP computes down(act(gate(x)) * up(x)); removing intermediate channel c removes row c of
gate and up and column c of down, and the MLP computes exactly what it did with that channel's
activation forced to 0. Channels are ranked by how much they feed the output on calibration data:
||h_c|| * ||down[:, c]||, where ||h_c|| is the L2 norm of the channel's activation (the down
projection's input norm, Wanda's statistic at channel level, as in FLAP / Wanda-sp). Without
calibration norms, ||gate[c]|| * ||up[c]|| * ||down[:, c]|| stands in for the activation.
"""
from __future__ import annotations

import torch
from torch import nn

from spaces.plan import MLP_CHANNEL_COLS, MLP_CHANNEL_ROWS, Plan, kept_channels


def channel_scores(rows_weights: list[torch.Tensor], down_weight: torch.Tensor,
                   down_input_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of every intermediate channel (higher = keep)."""
    column_norms = down_weight.float().norm(dim=0)
    if down_input_norms is not None:
        return down_input_norms.float() * column_norms
    scores = column_norms
    for weight in rows_weights:
        scores = scores * weight.float().norm(dim=1)
    return scores


def kept_channel_index(scores: torch.Tensor, channel_fraction: float) -> torch.Tensor:
    """Ascending indices of the channels kept: the top `kept_channels` by score."""
    count = kept_channels(scores.numel(), channel_fraction)
    return scores.topk(count).indices.sort().values


def mlp_projections(plan: Plan, mlp: str) -> tuple[list[str], list[str]]:
    """Names of the planned projections of one MLP that lose rows (gate, up) and columns (down)."""
    rows = [f"{mlp}.{kind}" for kind in MLP_CHANNEL_ROWS if f"{mlp}.{kind}" in plan.layers]
    cols = [f"{mlp}.{kind}" for kind in MLP_CHANNEL_COLS if f"{mlp}.{kind}" in plan.layers]
    return rows, cols


def remove_mlp_channels_(model: nn.Module, plan: Plan,
                         input_norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Replace the projections of every MLP the plan thins by smaller Linears, in place.

    Returns the kept channel indices by projection name, so calibration statistics of the
    projections that lose input columns can be sliced to match.
    """
    kept: dict[str, torch.Tensor] = {}
    for mlp, fraction in plan.mlp_channel_fractions().items():
        rows, cols = mlp_projections(plan, mlp)
        modules = {name: model.get_submodule(name) for name in rows + cols}
        norms = (input_norms or {}).get(cols[0])
        scores = channel_scores([modules[name].weight.data for name in rows], modules[cols[0]].weight.data, norms)
        index = kept_channel_index(scores, fraction)
        for name in rows:
            model.set_submodule(name, _sliced_linear(modules[name], index, dim=0))
        for name in cols:
            model.set_submodule(name, _sliced_linear(modules[name], index, dim=1))
        kept.update({name: index for name in rows + cols})
    return kept


def _sliced_linear(module: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A Linear holding only the rows (dim 0) or input columns (dim 1) at `index`."""
    weight = module.weight.data.index_select(dim, index.to(module.weight.device))
    smaller = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                        dtype=weight.dtype, device=weight.device)
    smaller.weight.data.copy_(weight)
    if module.bias is not None:
        bias = module.bias.data.index_select(0, index.to(weight.device)) if dim == 0 else module.bias.data
        smaller.bias.data.copy_(bias)
    return smaller
