"""Weight clustering (palettization): each row's weights take one of 2**bits shared fp16 values.

One codebook per output row (a "per-channel palette"): at 3 bits a 576-wide row pays 8 x 16 bits of
codebook, 0.22 bits per weight, about what RTN's g128 scales and zeros cost. The centroids are fitted
by weighted 1-D Lloyd iterations (assignment by binary search between sorted centroids, so memory is
O(rows x cols) whatever the codebook size), started from weighted quantiles. With calibration input
norms each weight counts with ||X_j||^2 -- the diagonal of the Hessian, as SqueezeLLM weighs its
clusters (it uses the Fisher diagonal) -- otherwise all weights count alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LLOYD_ITERATIONS = 25


@dataclass
class PalettizedMatrix:
    """Codes (indices into the row's codebook) and one fp16 codebook of 2**bits values per row."""

    codes: torch.Tensor  # uint8, (rows, cols)
    codebook: torch.Tensor  # float16, (rows, 2**bits), ascending
    bits: int

    def dequantize(self) -> torch.Tensor:
        return self.codebook.float().gather(1, self.codes.long())


def palettize(weight: torch.Tensor, bits: int, importance: torch.Tensor | None = None,
              iterations: int = LLOYD_ITERATIONS) -> PalettizedMatrix:
    """Cluster each row of `weight` into 2**bits values; `importance` (cols,) weighs the inputs."""
    rows, cols = weight.shape
    values = weight.float()
    weights = (importance.float().clamp(min=1e-12) if importance is not None else torch.ones(cols)).expand(rows, cols)
    centroids = _weighted_quantiles(values, weights, 1 << bits)
    for _ in range(iterations):
        codes = _assign(values, centroids)
        totals = torch.zeros_like(centroids).scatter_add_(1, codes, values * weights)
        counts = torch.zeros_like(centroids).scatter_add_(1, codes, weights)
        # an empty cluster keeps its centroid; sorting keeps the binary search valid
        centroids = torch.where(counts > 0, totals / counts.clamp(min=1e-30), centroids).sort(dim=1).values
    codebook = centroids.half().sort(dim=1).values
    codes = _assign(values, codebook.float())
    return PalettizedMatrix(codes.to(torch.uint8), codebook, bits)


def _assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (ascending per row) for every value."""
    midpoints = (centroids[:, 1:] + centroids[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), values.contiguous())


def _weighted_quantiles(values: torch.Tensor, weights: torch.Tensor, count: int) -> torch.Tensor:
    """`count` weighted quantiles of every row, at the centres of equal-weight bins."""
    order = values.sort(dim=1)
    cumulative = weights.gather(1, order.indices).cumsum(dim=1)
    cumulative = cumulative / cumulative[:, -1:]
    levels = (torch.arange(count, dtype=torch.float32) + 0.5) / count
    index = torch.searchsorted(cumulative.contiguous(), levels.expand(values.shape[0], count).contiguous())
    return order.values.gather(1, index.clamp(max=values.shape[1] - 1))
