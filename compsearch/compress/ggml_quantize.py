"""Rounding a weight matrix into a ggml block type, weighted by how much each weight matters.

Each weight counts with w_ij = imp_j * sqrt(sigma2_i + x_ij^2): `imp_j` is the calibration inputs'
mean square at input j (llama.cpp's importance matrix, the diagonal of X^T X / tokens; 1 without
calibration), sigma2_i twice the row's mean square, as llama.cpp weighs its own search. Per
sub-block, a scale (and for types with a minimum, an offset) is chosen among a few candidate grids
by the least weighted squared error after a least-squares refit, as llama.cpp's make_qx_quants and
make_qkx2_quants do; K-types then round those per sub-block scales to their integer sub-scales under
one fp16 scale per block, chosen among a few candidates (the largest sub-scale to the largest integer,
give or take a few) and refitted by least squares to the codes, as llama.cpp's make_qp_quants does; every
code is rounded again against the scales as stored. The result is exactly representable in the type
(`ggml_blocks.pack`).

`quantize_blocks_gptq` adds error-compensating fill: GPTQ's column-by-column rounding (Frantar et al.
2022) on the type's own grid. The scales are fitted as above; then the columns are rounded one by one,
most active input first (activation order), each to its nearest level under its block's scales, and
each column's error is spread over the columns not yet rounded through the inverse Hessian's Cholesky
factor, which minimizes the error of the layer's outputs on the calibration inputs rather than of its
weights. On SmolLM2-135M this halves the KL of 4-bit types against importance-weighted rounding alone.
"""
from __future__ import annotations

from functools import partial

import torch

from compsearch.compress.ggml_blocks import BlockQuantized, BlockType
from compsearch.compress.gptq import compensated_rounding

SCALE_STEPS = torch.arange(-9, 10, dtype=torch.float32) * 0.1  # symmetric grids: nmax + step
AFFINE_STEPS = torch.arange(0, 21, dtype=torch.float32) * 0.1 - 1.0  # make_qkx2_quants: rmin -1, rdelta 0.1
# K-types: the block scale maps the largest sub-scale to the largest integer + each of these; the best per
# block by weighted error is kept, then refitted (REFIT_ROUNDS least-squares fits). On SmolLM2-135M's
# down_proj (weights on a Q4_1 grid) this halves Q4_K's and Q5_K's output error against max / top alone.
SUB_SCALE_STEPS = (*(float(step) for step in range(-8, 9)), -0.5, -0.25, 0.25, 0.5)
REFIT_ROUNDS = 2


def quantize_blocks(weight: torch.Tensor, block_type: BlockType, importance: torch.Tensor | None = None) -> BlockQuantized:
    """`weight` (rows, cols; cols a multiple of the type's block size) in `block_type`; `importance`
    (cols,) is the calibration inputs' mean square per input feature."""
    rows, cols = weight.shape
    if cols % block_type.block_size:
        raise ValueError(f"{block_type.name} needs rows of a multiple of {block_type.block_size} values, got {cols}")
    x = weight.float()
    sigma2 = 2 * x.square().mean(dim=1, keepdim=True)
    w = (importance.float().clamp(min=1e-12).unsqueeze(0) if importance is not None else 1.0) * (sigma2 + x.square()).sqrt()
    sub = x.reshape(rows, -1, block_type.sub_block)
    sub_w = w.reshape(rows, -1, block_type.sub_block)
    if block_type.has_min:
        scale, offset = _affine_fit(sub, sub_w, block_type.code_levels - 1, block_type.min_subtracted)
    else:
        scale, offset = _symmetric_fit(sub, sub_w, block_type), None
    if block_type.sub_scale_bits:
        first, *others = SUB_SCALE_STEPS
        best = _two_level(x, block_type, scale, offset, first)
        best_error = _block_error(x, w, best)
        for step in others:
            q = _two_level(x, block_type, scale, offset, step)
            error = _block_error(x, w, q)
            better = error < best_error
            best, best_error = _per_block(better, q, best), torch.where(better, error, best_error)
        return _refit_block_scales(x, w, best)
    d = scale.squeeze(2).half()
    dmin = offset.squeeze(2).half() if offset is not None else None
    q = BlockQuantized(block_type, torch.zeros(rows, cols, dtype=torch.uint8), d, dmin)
    q.codes = _codes(x, q)
    return q


def quantize_blocks_gptq(weight: torch.Tensor, block_type: BlockType, hinv_factor: torch.Tensor,
                         order: torch.Tensor, importance: torch.Tensor | None = None,
                         keep: torch.Tensor | None = None) -> BlockQuantized:
    """`weight` in `block_type` with GPTQ's error compensation (`gptq.compensated_rounding`), columns taken
    in `order` (most active input first) and rounded under the scales `quantize_blocks` fits to the
    original weights, so the stored layout is the type's. `hinv_factor`: of H in `order`
    (`MatrixStats.hinv_factor(..., activation_order=True)`)."""
    x = weight.float() if keep is None else weight.float() * keep
    q = quantize_blocks(x, block_type, importance)
    q.codes = compensated_rounding(x, hinv_factor, order, _column_rounder(q), keep)
    return q


def _column_rounder(q: BlockQuantized):
    """round(column, j) -> (codes, values): the nearest level of every row's column j under the scales
    of `q` (values as `dequantize` computes them, up to float rounding)."""
    t = q.type
    if t.grid is not None:
        grid = torch.tensor(t.grid, dtype=torch.float32)
        scale = _element_scale(q).t().contiguous()  # one row per column
        safe = scale.where(scale != 0, torch.ones_like(scale))

        def round_grid(column: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
            index = _nearest_index(grid, column / safe[j])
            return index.to(torch.uint8), grid[index] * scale[j]
        return round_grid
    base, step = (part.t().contiguous() for part in _base_and_step(q))
    safe = step.where(step != 0, torch.ones_like(step))
    low, high = -t.code_offset, t.code_levels - 1 - t.code_offset

    def round_even(column: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        levels = torch.round((column - base[j]) / safe[j]).clamp_(low, high).where(step[j] != 0, 0.0)
        return (levels + t.code_offset).to(torch.uint8), base[j] + levels * step[j]
    return round_even


def _symmetric_fit(x: torch.Tensor, w: torch.Tensor, t: BlockType) -> torch.Tensor:
    """Per sub-block scale of a grid without offset: levels code - offset (or the type's grid)."""
    if t.grid is not None:
        grid = torch.tensor(t.grid, dtype=torch.float32)
        extreme = grid[0]
        steps = torch.arange(-7, 8, dtype=torch.float32)
        nearest = partial(_nearest, grid)
    else:  # levels -offset .. levels - 1 - offset, one apart: rounding finds the nearest
        extreme = -float(t.code_offset)
        steps = SCALE_STEPS
        nearest = partial(_clamped_round, -float(t.code_offset), float(t.code_levels - 1 - t.code_offset))
    signed_max = x.gather(2, x.abs().argmax(dim=2, keepdim=True))  # the value of largest magnitude, signed
    best_scale = signed_max / extreme
    best_error = torch.full_like(best_scale, float("inf"))
    for step in steps:
        inverse = (extreme + step) / signed_max.where(signed_max != 0, torch.ones_like(signed_max))
        levels = nearest(x * inverse)
        scale = (w * x * levels).sum(2, keepdim=True) / (w * levels * levels).sum(2, keepdim=True).clamp(min=1e-30)
        error = (w * (x - scale * levels).square()).sum(2, keepdim=True)
        better = error < best_error
        best_scale, best_error = best_scale.where(~better, scale), best_error.where(~better, error)
    return best_scale.where(signed_max != 0, torch.zeros_like(best_scale))


def _affine_fit(x: torch.Tensor, w: torch.Tensor, top: int, min_subtracted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block (scale, offset) of value = scale * code + offset, code in [0, top]; types that
    subtract a non-negative minimum (K-types) keep the offset <= 0."""
    low, high = x.amin(dim=2, keepdim=True), x.amax(dim=2, keepdim=True)
    if min_subtracted:
        low = low.clamp(max=0.0)
    span = (high - low).clamp(min=1e-30)
    best_scale, best_offset = span / top, low
    best_error = (w * (x - (best_scale * torch.round((x - low) / best_scale).clamp(0, top) + low)).square()).sum(2, keepdim=True)
    sw, swx = w.sum(2, keepdim=True), (w * x).sum(2, keepdim=True)
    for step in AFFINE_STEPS:
        codes = torch.round((x - low) * ((top + step) / span)).clamp(0, top)
        swq, swqq, swxq = (w * codes).sum(2, keepdim=True), (w * codes * codes).sum(2, keepdim=True), (w * x * codes).sum(2, keepdim=True)
        det = (sw * swqq - swq * swq).clamp(min=1e-30)
        scale, offset = (sw * swxq - swq * swx) / det, (swqq * swx - swq * swxq) / det
        if min_subtracted:  # the offset must stay <= 0: refit the scale alone where it would not
            positive = offset > 0
            offset = offset.where(~positive, torch.zeros_like(offset))
            scale = scale.where(~positive, swxq / swqq.clamp(min=1e-30))
        error = (w * (x - (scale * codes + offset)).square()).sum(2, keepdim=True)
        better = (error < best_error) & (scale > 0)
        best_scale, best_offset = best_scale.where(~better, scale), best_offset.where(~better, offset)
        best_error = best_error.where(~better, error)
    return best_scale, best_offset


def _two_level(x: torch.Tensor, t: BlockType, scale: torch.Tensor, offset: torch.Tensor | None,
               step: float = 0.0) -> BlockQuantized:
    """K-types: sub-block scales (and minimums) as integers under one fp16 scale (and min) per block,
    the largest mapped to the largest integer + `step` (clamped)."""
    rows, cols = x.shape
    per_block = scale.reshape(rows, -1, t.subs_per_block)
    if t.sub_scale_signed:  # the largest magnitude maps to the most negative integer, as llama.cpp does
        limit = float(1 << (t.sub_scale_bits - 1))
        signed_max = per_block.gather(2, per_block.abs().argmax(dim=2, keepdim=True))
        d = (signed_max / -(limit + step)).half()
        sub_scales = _integers(per_block, d, -limit, limit - 1)
    else:
        top = float((1 << t.sub_scale_bits) - 1)
        d = (per_block.amax(dim=2, keepdim=True).clamp(min=0) / (top + step)).half()
        sub_scales = _integers(per_block, d, 0, top)
    q = BlockQuantized(t, torch.zeros(rows, cols, dtype=torch.uint8), d.squeeze(2), None,
                       sub_scales.reshape(rows, -1).to(torch.int16))
    if offset is not None:
        minimum = (-offset).reshape(rows, -1, t.subs_per_block).clamp(min=0)
        top = float((1 << t.sub_min_bits) - 1)
        dmin = (minimum.amax(dim=2, keepdim=True) / (top + step)).half()
        q.dmin = dmin.squeeze(2)
        q.sub_mins = _integers(minimum, dmin, 0, top).reshape(rows, -1).to(torch.int16)
    q.codes = _codes(x, q)
    return q


def _refit_block_scales(x: torch.Tensor, w: torch.Tensor, q: BlockQuantized) -> BlockQuantized:
    """K-types: each block's fp16 scale (and min) refitted by weighted least squares to the codes and
    integer sub-scales chosen, the codes rounded again under it; kept per block where the weighted
    error falls. Rounding the sub-scales to integers under max/top leaves the block scale off its best
    value, which llama.cpp's make_qp_quants also corrects by a least-squares fit."""
    t = q.type
    rows = x.shape[0]
    shape = (rows, -1, t.block_size)
    xb, wb = x.reshape(shape), w.expand_as(x).reshape(shape)
    best = _block_error(x, w, q)
    for _ in range(REFIT_ROUNDS):
        a = (q.levels().reshape(rows, -1, t.sub_block) * q.sub_scales.float().unsqueeze(2)).reshape(shape)
        saa, sax = (wb * a * a).sum(2), (wb * a * xb).sum(2)
        if q.sub_mins is None:
            d, dmin = sax / saa.clamp(min=1e-30), None
        else:  # x = d * a - dmin * b
            b = q.sub_mins.float().repeat_interleave(t.sub_block, dim=1).reshape(shape)
            sbb, sab, sbx = (wb * b * b).sum(2), (wb * a * b).sum(2), (wb * b * xb).sum(2)
            det = saa * sbb - sab * sab
            safe = det.where(det.abs() > 1e-30, torch.ones_like(det))
            d, dmin = (sax * sbb - sab * sbx) / safe, (sax * sab - saa * sbx) / safe
            d = d.where(det.abs() > 1e-30, q.d.float())
            dmin = dmin.where(det.abs() > 1e-30, q.dmin.float())
        candidate = BlockQuantized(t, q.codes, d.half(), dmin.half() if dmin is not None else None, q.sub_scales, q.sub_mins)
        candidate.codes = _codes(x, candidate)
        candidate_error = _block_error(x, w, candidate)
        better = candidate_error < best
        if not better.any():
            break
        q, best = _per_block(better, candidate, q), torch.where(better, candidate_error, best)
    return q


def _block_error(x: torch.Tensor, w: torch.Tensor, q: BlockQuantized) -> torch.Tensor:
    """Weighted squared error of every block (rows, blocks)."""
    shape = (x.shape[0], -1, q.type.block_size)
    return (w.expand_as(x).reshape(shape) * (x.reshape(shape) - q.dequantize().reshape(shape)).square()).sum(2)


def _per_block(chosen: torch.Tensor, a: BlockQuantized, b: BlockQuantized) -> BlockQuantized:
    """`a`'s blocks where `chosen` (rows, blocks), `b`'s elsewhere."""
    t = a.type

    def pick(first: torch.Tensor | None, second: torch.Tensor | None, per_block: int) -> torch.Tensor | None:
        return None if first is None else torch.where(chosen.repeat_interleave(per_block, dim=1), first, second)
    return BlockQuantized(t, pick(a.codes, b.codes, t.block_size), pick(a.d, b.d, 1), pick(a.dmin, b.dmin, 1),
                          pick(a.sub_scales, b.sub_scales, t.subs_per_block), pick(a.sub_mins, b.sub_mins, t.subs_per_block))


def _integers(values: torch.Tensor, unit: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """round(values / unit) within [low, high]; 0 where the unit is 0."""
    unit = unit.float()
    safe = unit.where(unit != 0, torch.ones_like(unit))
    return torch.round(values / safe).clamp(low, high).where(unit != 0, torch.zeros_like(values))


def _codes(x: torch.Tensor, q: BlockQuantized) -> torch.Tensor:
    """The nearest code of every weight under the scales (and offsets) as stored."""
    t = q.type
    if t.grid is not None:  # a level table scaled by d
        scale = _element_scale(q)
        safe = scale.where(scale != 0, torch.ones_like(scale))
        return _nearest_index(torch.tensor(t.grid, dtype=torch.float32), x / safe).to(torch.uint8)
    base, step = _base_and_step(q)
    safe = step.where(step != 0, torch.ones_like(step))
    codes = (torch.round((x - base) / safe) + t.code_offset).where(step != 0, torch.full_like(x, float(t.code_offset)))
    return codes.clamp(0, t.code_levels - 1).to(torch.uint8)


def _element_scale(q: BlockQuantized) -> torch.Tensor:
    """The scale every weight's level is multiplied by (rows, cols)."""
    t = q.type
    scale = q.d.float()
    if q.sub_scales is not None:
        scale = scale.repeat_interleave(t.subs_per_block, dim=1) * q.sub_scales.float()
    return scale.repeat_interleave(t.sub_block, dim=1)


def _base_and_step(q: BlockQuantized) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spaced types: every weight's value at the zero level (the offset) and one step above it,
    as dequantized."""
    t = q.type
    at_zero = torch.full(q.codes.shape, t.code_offset, dtype=torch.uint8)
    base = BlockQuantized(t, at_zero, q.d, q.dmin, q.sub_scales, q.sub_mins).dequantize()
    step = BlockQuantized(t, at_zero + 1, q.d, q.dmin, q.sub_scales, q.sub_mins).dequantize() - base
    return base, step


def _clamped_round(low: float, high: float, values: torch.Tensor) -> torch.Tensor:
    return torch.round(values).clamp_(low, high)


def _nearest(grid: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The grid level nearest to each value (grid ascending)."""
    return grid[_nearest_index(grid, values)]


def _nearest_index(grid: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    midpoints = (grid[1:] + grid[:-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), values.contiguous())
