"""Which weights to remove: magnitude or Wanda scores, unstructured per row or N:M."""
from __future__ import annotations

import torch


def pruned_per_row(cols: int, sparsity: float) -> int:
    """How many weights of each row unstructured pruning removes."""
    return int(round(sparsity * cols))


def kept_count(rows: int, cols: int, sparsity: float, pattern: str) -> int:
    """How many weights of a rows x cols matrix survive pruning; matches `keep_mask` exactly."""
    if pattern == "unstructured":
        return rows * (cols - pruned_per_row(cols, sparsity))
    n, m = (int(part) for part in pattern.split(":"))
    return rows * (cols // m) * n


def keep_mask(
    weight: torch.Tensor,
    sparsity: float,
    pattern: str = "unstructured",
    method: str = "magnitude",
    input_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask of the weights to keep.

    Scores are |W| (magnitude) or |W| * ||X_j||_2 over calibration inputs (Wanda); weights compete
    within their output row (unstructured) or within each group of M consecutive inputs (N:M).
    """
    scores = weight.abs().float()
    if method == "wanda":
        if input_norms is None:
            raise ValueError("Wanda pruning needs the layer's calibration input norms; none were given")
        scores = scores * input_norms.float().unsqueeze(0)
    elif method != "magnitude":
        raise ValueError(f"prune method {method!r} is unknown; use 'magnitude' or 'wanda'")
    rows, cols = weight.shape
    if pattern == "unstructured":
        drop = pruned_per_row(cols, sparsity)
        mask = torch.ones_like(scores, dtype=torch.bool)
        if drop:
            lowest = scores.topk(drop, dim=1, largest=False).indices
            mask.scatter_(1, lowest, False)
        return mask
    n, m = (int(part) for part in pattern.split(":"))
    if cols % m:
        raise ValueError(f"pattern {pattern} needs the input size ({cols}) to be a multiple of {m}")
    blocks = scores.reshape(rows, cols // m, m)
    kept = blocks.topk(n, dim=2).indices
    mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, kept, True)
    return mask.reshape(rows, cols)
