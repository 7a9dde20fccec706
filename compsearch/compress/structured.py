"""Structured pruning: MLP channels and attention heads go, the matrices get smaller and dense, and
the model is faster on any hardware.

Both remove *units* that one projection reads as input columns and others write as output rows:
- an MLP's intermediate channel c: row c of gate and up, column c of down (units of width 1);
- an attention's query head h: rows h*d..(h+1)*d of q, the same columns of o (units of width d,
  the head width); with grouped-query attention each key/value head keeps its best `kept_heads`
  query heads, so groups stay equal and k/v are untouched; where every query head has its own
  key/value head, whole heads go, their k and v rows too, and the attention module's
  `num_key_value_groups` follows.
Removing a unit gives exactly the model with that unit's output forced to 0, so:
1. units are ranked by the energy they add to the column projection's output on calibration data,
   tr(W_u H_uu W_u^T), with W_u the unit's columns and H = X^T X / tokens the second moments of the
   projection's input (for a channel: ||W[:, c]||^2 H_cc, Wanda's statistic at channel level, as in
   FLAP / Wanda-sp);
2. the kept columns then absorb what the removed units carried, by least squares on the calibration
   inputs: W_k += W_r H_rk (H_kk + damping)^-1. On SmolLM2-135M this takes a third of the heads from
   perplexity 54 to 15.1, and half the MLP channels from 31.1 to 21.7 (benchmarks/methods.py);
   10% damping suits both (1% overfits MLP channels: 1536 correlated inputs on 4096 tokens).
"""
from __future__ import annotations

import torch
from torch import nn

from compsearch.compress.edits import ModelEdits
from compsearch.spaces.layers import attention_geometry
from compsearch.spaces.plan import ATTENTION_KINDS, MLP_CHANNEL_COLS, MLP_CHANNEL_ROWS, Plan, PlanError, kept_channels, kept_heads

DAMPING = 0.1  # of the mean diagonal of H_kk, added to it before the least-squares correction


def unit_energy(weight: torch.Tensor, hessian: torch.Tensor, unit_width: int) -> torch.Tensor:
    """Energy of each unit (`unit_width` consecutive input columns) in the output on inputs with
    second moments `hessian`: tr(W_u H_uu W_u^T). Higher = keep."""
    weight = weight.double()
    hessian = hessian.to(weight.device, torch.float64)
    units = weight.shape[1] // unit_width
    if unit_width == 1:
        return weight.square().sum(dim=0) * torch.diagonal(hessian)
    blocks = hessian.view(units, unit_width, units, unit_width).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    grouped = weight.view(weight.shape[0], units, unit_width).transpose(0, 1)  # units x rows x width
    return ((grouped @ blocks) * grouped).sum(dim=(1, 2))


def compensated_columns(weight: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor,
                        damping: float = DAMPING) -> torch.Tensor:
    """The kept columns of `weight`, corrected by least squares for the removed ones on inputs with
    second moments `hessian`: W_k + W_r H_rk (H_kk + damping * mean(diag H_kk) I)^-1."""
    device = weight.device
    hessian = hessian.to(device, torch.float64)
    kept = kept.to(device)
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=device)
    removed[kept] = False
    kept_hessian = hessian[kept][:, kept]
    kept_hessian += damping * torch.diagonal(kept_hessian).mean() * torch.eye(len(kept), dtype=torch.float64, device=device)
    correction = torch.linalg.solve(kept_hessian, hessian[kept][:, removed] @ weight.double()[:, removed].T).T
    return (weight.double()[:, kept] + correction).to(weight.dtype)


def kept_channel_index(scores: torch.Tensor, channel_fraction: float) -> torch.Tensor:
    """Ascending indices of the channels kept: the top `kept_channels` by score."""
    count = kept_channels(scores.numel(), channel_fraction)
    return scores.topk(count).indices.sort().values


def kept_head_index(scores: torch.Tensor, kv_heads: int, head_fraction: float) -> torch.Tensor:
    """Ascending indices of the query heads kept: the best of each key/value group (see `kept_heads`)."""
    heads = scores.numel()
    kept_q, kept_kv = kept_heads(heads, kv_heads, head_fraction)
    if kept_kv < kv_heads:  # one query head per key/value head: whole heads compete
        return scores.topk(kept_q).indices.sort().values
    group, per_group = heads // kv_heads, kept_q // kv_heads
    best = scores.view(kv_heads, group).topk(per_group, dim=1).indices.sort(dim=1).values
    return (best + torch.arange(kv_heads, device=scores.device).unsqueeze(1) * group).flatten()


def remove_structure_(model: nn.Module, plan: Plan, hessians: dict[str, torch.Tensor],
                      edits: ModelEdits | None = None) -> dict[str, torch.Tensor]:
    """Remove the MLP channels and attention heads the plan names, in place (smaller Linears).

    `hessians` (by layer name) of the projections that lose input columns (down, o) rank the units
    and correct the kept columns. Returns the kept row or column indices by projection name, so
    calibration statistics of those projections can be sliced to match. `edits` records what changes.
    """
    edits = edits or ModelEdits()
    kept: dict[str, torch.Tensor] = {}
    for mlp, fraction in plan.structured_fractions("channel_fraction").items():
        rows = [f"{mlp}.{kind}" for kind in MLP_CHANNEL_ROWS if f"{mlp}.{kind}" in plan.layers]
        cols = [f"{mlp}.{kind}" for kind in MLP_CHANNEL_COLS if f"{mlp}.{kind}" in plan.layers]
        hessian = _hessian(hessians, cols[0])
        scores = unit_energy(model.get_submodule(cols[0]).weight.data, hessian, 1)
        for name in rows + cols[:1]:
            edits.before_change(model, name)
        kept.update(_remove_units_(model, rows, cols[0], kept_channel_index(scores, fraction), hessian))
    for attention_name, fraction in plan.structured_fractions("head_fraction").items():
        heads, kv_heads, head_dim = _geometry(model, attention_name)
        q, k, v, o = (f"{attention_name}.{kind}" for kind in ATTENTION_KINDS)
        hessian = _hessian(hessians, o)
        scores = unit_energy(model.get_submodule(o).weight.data, hessian, head_dim)
        index = _head_rows(kept_head_index(scores, kv_heads, fraction), head_dim)
        rows = [q, k, v] if heads == kv_heads else [q]  # multi-head attention: keys and values go too
        edits.before_change(model, attention_name)  # its projections and its head grouping change
        kept.update(_remove_units_(model, rows, o, index, hessian))
        regroup_heads_(model.get_submodule(attention_name), heads, kv_heads, fraction)
    return kept


def regroup_heads_(attention: nn.Module, heads: int, kv_heads: int, head_fraction: float) -> None:
    """Tell the attention module how many query heads share each key/value head after pruning."""
    kept_q, kept_kv = kept_heads(heads, kv_heads, head_fraction)
    attention.num_key_value_groups = kept_q // kept_kv


def _remove_units_(model: nn.Module, rows: list[str], cols: str, index: torch.Tensor,
                   hessian: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keep rows `index` of the `rows` projections and columns `index` of `cols`, corrected."""
    for name in rows:
        model.set_submodule(name, _sliced_linear(model.get_submodule(name), index, dim=0))
    full = model.get_submodule(cols)
    thinner = _sliced_linear(full, index, dim=1)
    thinner.weight.data.copy_(compensated_columns(full.weight.data, hessian, index))
    model.set_submodule(cols, thinner)
    return {name: index for name in rows + [cols]}


def _hessian(hessians: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in hessians:
        raise PlanError(f"structured pruning of {name.rpartition('.')[0]} needs the calibration Hessian of {name} "
                        "(compress.input_hessians); compute it first")
    return hessians[name]


def _geometry(model: nn.Module, attention_name: str) -> tuple[int, int, int]:
    geometry = attention_geometry(model, attention_name)
    if geometry is None:
        raise PlanError(f"{attention_name} does not expose its head layout (q/k/v/o_proj Linears, head_dim and "
                        "num_key_value_groups, as Llama-family attention does); its heads cannot be removed")
    return geometry


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The row (or column) indices of whole heads."""
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim, device=heads.device)).flatten()


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
