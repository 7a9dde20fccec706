"""Low-rank factorization of a Linear layer by truncated SVD."""
from __future__ import annotations

import torch
from torch import nn


def factorize(weight: torch.Tensor, rank: int,
              svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with up @ down the best rank-`rank` approximation of `weight` (Eckart-Young).

    `svd` is `weight`'s thin SVD (u, s, vh) when the caller has it already. The singular values are
    split evenly (sqrt on each side) so both factors have similar ranges, which keeps their later
    quantization error balanced.
    """
    u, s, vh = svd if svd is not None else torch.linalg.svd(weight.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return root.unsqueeze(1) * vh[:rank], u[:, :rank] * root.unsqueeze(0)


class LowRankLinear(nn.Module):
    """x -> up(down(x)): a Linear replaced by two thinner ones."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))
