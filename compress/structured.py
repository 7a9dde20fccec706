"""Structured pruning: MLP channels and attention heads go, the matrices get smaller and dense, and
the model is faster on any hardware.

MLP channels. A gated MLP computes down(act(gate(x)) * up(x)); removing intermediate channel c
removes row c of gate and up and column c of down, and the MLP computes exactly what it did with
that channel's activation forced to 0. Channels are ranked by how much they feed the output on
calibration data: ||h_c|| * ||down[:, c]||, where ||h_c|| is the L2 norm of the channel's activation
(the down projection's input norm, Wanda's statistic at channel level, as in FLAP / Wanda-sp).
Without calibration norms, ||gate[c]|| * ||up[c]|| * ||down[:, c]|| stands in for the activation.

Attention heads. Head h owns rows h*d..(h+1)*d of q (d = head width) and the same columns of o;
removing them gives exactly the attention with that head's output forced to 0. Heads are ranked by
the energy their output adds on calibration data, tr(O_h H_hh O_h^T), with O_h the head's columns of
o and H = X^T X / tokens the second moments of o's input (the attention output). Heads are more
correlated than MLP channels, so the kept columns of o then absorb what the removed heads carried,
by least squares on the calibration inputs: O_k += O_r H_rk (H_kk + damping)^-1 (without it, a
third of SmolLM2's heads cost 4x the perplexity; see benchmarks/methods.py).
With grouped-query attention each key/value head keeps its best `kept_heads` query heads, so
groups stay equal and k/v are untouched; where every query head has its own key/value head, whole
heads go, their k and v rows too. The attention module's `num_key_value_groups` follows.
"""
from __future__ import annotations

import torch
from torch import nn

from spaces.layers import attention_geometry
from spaces.plan import ATTENTION_KINDS, MLP_CHANNEL_COLS, MLP_CHANNEL_ROWS, Plan, PlanError, kept_channels, kept_heads


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


def head_scores(o_weight: torch.Tensor, o_input_hessian: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Importance of every query head (higher = keep): the energy of its share of o's output."""
    weight, hessian = o_weight.double(), o_input_hessian.to(o_weight.device, torch.float64)
    heads = weight.shape[1] // head_dim
    return torch.stack([(weight[:, h * head_dim:(h + 1) * head_dim] @ hessian[h * head_dim:(h + 1) * head_dim,
                         h * head_dim:(h + 1) * head_dim] * weight[:, h * head_dim:(h + 1) * head_dim]).sum()
                        for h in range(heads)])


def compensated_columns(weight: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor,
                        damping: float = 0.01) -> torch.Tensor:
    """The kept columns of `weight`, corrected by least squares for the removed ones on inputs with
    second moments `hessian`: W_k + W_r H_rk (H_kk + damping * mean(diag H) I)^-1."""
    device = weight.device
    hessian = hessian.to(device, torch.float64)
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=device)
    removed[kept.to(device)] = False
    kept_hessian = hessian[kept][:, kept]
    kept_hessian += damping * torch.diagonal(kept_hessian).mean() * torch.eye(len(kept), dtype=torch.float64, device=device)
    correction = torch.linalg.solve(kept_hessian, hessian[kept][:, removed] @ weight.double()[:, removed].T).T
    return (weight.double()[:, kept] + correction).to(weight.dtype)


def kept_head_index(scores: torch.Tensor, kv_heads: int, head_fraction: float) -> torch.Tensor:
    """Ascending indices of the query heads kept: the best of each key/value group (see `kept_heads`)."""
    heads = scores.numel()
    kept_q, kept_kv = kept_heads(heads, kv_heads, head_fraction)
    if kept_kv < kv_heads:  # one query head per key/value head: whole heads compete
        return scores.topk(kept_q).indices.sort().values
    group, per_group = heads // kv_heads, kept_q // kv_heads
    best = scores.view(kv_heads, group).topk(per_group, dim=1).indices.sort(dim=1).values
    return (best + torch.arange(kv_heads, device=scores.device).unsqueeze(1) * group).flatten()


def remove_structure_(model: nn.Module, plan: Plan, input_norms: dict[str, torch.Tensor] | None = None,
                      hessians: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Remove the MLP channels and attention heads the plan names, in place (smaller Linears).

    MLP channels are ranked with `input_norms` of the down projection, heads with `hessians` of the
    o projection (by layer name). Returns the kept row or column indices by projection name, so
    calibration statistics of the projections that lose input columns (down, o) can be sliced to match.
    """
    return {**_remove_mlp_channels_(model, plan, input_norms or {}),
            **_remove_attention_heads_(model, plan, hessians or {})}


def _remove_mlp_channels_(model: nn.Module, plan: Plan, input_norms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    kept: dict[str, torch.Tensor] = {}
    for mlp, fraction in plan.structured_fractions("channel_fraction").items():
        rows = [f"{mlp}.{kind}" for kind in MLP_CHANNEL_ROWS if f"{mlp}.{kind}" in plan.layers]
        cols = [f"{mlp}.{kind}" for kind in MLP_CHANNEL_COLS if f"{mlp}.{kind}" in plan.layers]
        modules = {name: model.get_submodule(name) for name in rows + cols}
        scores = channel_scores([modules[name].weight.data for name in rows], modules[cols[0]].weight.data,
                                input_norms.get(cols[0]))
        index = kept_channel_index(scores, fraction)
        for name in rows:
            model.set_submodule(name, _sliced_linear(modules[name], index, dim=0))
        for name in cols:
            model.set_submodule(name, _sliced_linear(modules[name], index, dim=1))
        kept.update({name: index for name in rows + cols})
    return kept


def _remove_attention_heads_(model: nn.Module, plan: Plan, hessians: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    kept: dict[str, torch.Tensor] = {}
    for attention_name, fraction in plan.structured_fractions("head_fraction").items():
        heads, kv_heads, head_dim = _geometry(model, attention_name)
        attention = model.get_submodule(attention_name)
        q, k, v, o = (f"{attention_name}.{kind}" for kind in ATTENTION_KINDS)
        if o not in hessians:
            raise PlanError(f"removing heads of {attention_name} needs the calibration Hessian of {o} "
                            "(compress.input_hessians); compute it first")
        o_weight = attention.o_proj.weight.data
        index = _head_rows(kept_head_index(head_scores(o_weight, hessians[o], head_dim), kv_heads, fraction), head_dim)
        kept[q] = kept[o] = index
        model.set_submodule(q, _sliced_linear(attention.q_proj, index, dim=0))
        model.set_submodule(o, _sliced_linear(attention.o_proj, index, dim=1))
        model.get_submodule(o).weight.data.copy_(compensated_columns(o_weight, hessians[o], index))
        if heads == kv_heads:  # multi-head attention: the removed heads' keys and values go too
            kept[k] = kept[v] = index
            model.set_submodule(k, _sliced_linear(attention.k_proj, index, dim=0))
            model.set_submodule(v, _sliced_linear(attention.v_proj, index, dim=0))
        regroup_heads_(attention, heads, kv_heads, fraction)
    return kept


def regroup_heads_(attention: nn.Module, heads: int, kv_heads: int, head_fraction: float) -> None:
    """Tell the attention module how many query heads share each key/value head after pruning."""
    kept_q, kept_kv = kept_heads(heads, kv_heads, head_fraction)
    attention.num_key_value_groups = kept_q // kept_kv


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
