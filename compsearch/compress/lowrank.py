"""Low-rank factorization of a Linear layer: truncated SVD, plain or whitened by calibration statistics."""
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


WHITEN_DAMPING = 1e-4  # relative to the mean Hessian diagonal: keeps the Cholesky factor finite


def whitened_svd(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD-LLM's truncation-aware whitening: (u, s, vh') with weight = u diag(s) vh' exactly.

    With H = X^T X = L L^T (Cholesky), the output error of a replacement W' is
    ||X (W - W')^T|| = ||(W - W') L||, so the best rank-r W' is the truncated SVD of W L mapped back
    by L^-1: u, s, vh = svd(W L) and vh' = vh L^-1. Passing the result to `factorize` as `svd` gives
    factors whose discarded singular values are exactly the output error they cause (on the
    calibration inputs), instead of the weight error plain SVD minimizes (Wang et al., 2024).
    """
    h = hessian.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    damping = WHITEN_DAMPING * torch.diagonal(h).mean()
    for _ in range(6):
        h.diagonal().add_(damping)
        lower, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            break
        damping *= 10
    else:
        raise ValueError("the calibration Hessian is not positive definite even after damping")
    u, s, vh = torch.linalg.svd(weight.double() @ lower, full_matrices=False)
    vh = torch.linalg.solve_triangular(lower, vh, upper=False, left=False)  # vh @ L^-1
    return u.float(), s.float(), vh.float()


class LowRankLinear(nn.Module):
    """x -> up(down(x)): a Linear replaced by two thinner ones."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))
