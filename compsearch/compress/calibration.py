"""Statistics of the layers' inputs on calibration data, gathered in one pass."""
from __future__ import annotations

import torch
from torch import nn

from compsearch.spaces.layers import TIED_PROJECTIONS


@torch.inference_mode()
def input_norms(model: nn.Module, windows: torch.Tensor, layer_names: list[str], batch_size: int = 4) -> dict[str, torch.Tensor]:
    """L2 norm of every input feature of each named Linear over all calibration tokens (Wanda's ||X_j||)."""
    squares: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module, args, _output):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            total = x.square().sum(dim=0)
            squares[name] = squares[name] + total if name in squares else total
        return hook

    forward_with_hooks(model, windows, batch_size, {name: hook_for(name) for name in layer_names})
    return {name: total.sqrt() for name, total in squares.items()}


def forward_with_hooks(model: nn.Module, windows: torch.Tensor, batch_size: int, hooks: dict | None = None) -> None:
    """Run the calibration windows through the model batch by batch with a forward hook per named module."""
    handles = [model.get_submodule(name).register_forward_hook(hook) for name, hook in (hooks or {}).items()]
    try:
        for start in range(0, len(windows), batch_size):
            model(windows[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()


def shared_input_key(name: str) -> str:
    """Layers of one fused set (q/k/v, gate/up) read the same input: they share one statistic."""
    prefix, _, kind = name.rpartition(".")
    for tied in TIED_PROJECTIONS:
        if kind in tied:
            return f"{prefix}.{'+'.join(sorted(tied))}"
    return name


class InputHessians:
    """Forward hooks, on while its `with` block runs, that sum X^T X of named Linears' inputs; q/k/v and
    gate/up read one input, counted once. Memory is the statistics themselves (about in^2 floats per distinct
    input), not the activations."""

    def __init__(self, model: nn.Module, layer_names: list[str]):
        self.model, self.keys = model, {name: shared_input_key(name) for name in layer_names}
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles: list = []
        self._scaled: set[str] = set()

    def __enter__(self) -> InputHessians:
        first_reader = {key: name for name, key in reversed(list(self.keys.items()))}

        def hook_for(key: str):
            def hook(_module, args, _output):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                self.sums[key] = self.sums[key].addmm_(x.T, x) if key in self.sums else x.T @ x
                self.tokens[key] = self.tokens.get(key, 0) + x.shape[0]
            return hook

        self._handles = [self.model.get_submodule(name).register_forward_hook(hook_for(key))
                         for key, name in first_reader.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def hessians(self) -> dict[str, torch.Tensor]:
        """H = X^T X / tokens (in x in, float32) by layer name, of the layers whose inputs were seen (the
        sums are divided in place: no second copy of the statistics)."""
        for key, total in self.sums.items():
            if key not in self._scaled:
                total.div_(self.tokens[key])
                self._scaled.add(key)
        return {name: self.sums[key] for name, key in self.keys.items() if key in self.sums}

    def norms(self) -> dict[str, torch.Tensor]:
        """||X_j||, the L2 norm of every input feature over the tokens seen (Wanda's statistic), by layer name."""
        return {name: (torch.diagonal(hessian) * self.tokens[self.keys[name]]).sqrt()
                for name, hessian in self.hessians().items()}


@torch.inference_mode()
def input_hessians(model: nn.Module, windows: torch.Tensor, layer_names: list[str],
                   batch_size: int = 4) -> dict[str, torch.Tensor]:
    """H = X^T X / tokens (in x in, float32) of every named Linear's inputs over the calibration windows.

    One forward pass per batch with hooks: memory is the model, one batch of activations and the
    statistics themselves, so a 1B model fits a 24 GiB machine. Statistics are of the *base*
    model's inputs: compressing earlier layers would change later inputs, which methods using them
    (GPTQ, SparseGPT, whitened SVD) ignore -- the usual one-shot approximation, chosen so a worker
    measures them once and reuses them for every plan (`compress.sequential` measures them in sequence).
    """
    return input_statistics(model, windows, layer_names, batch_size)[1]


@torch.inference_mode()
def input_statistics(model: nn.Module, windows: torch.Tensor, layer_names: list[str],
                     batch_size: int = 4) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(input norms, input Hessians) by layer name from one pass (`input_hessians`; the norms from the
    Hessians' diagonals, `InputHessians.norms`)."""
    with InputHessians(model, layer_names) as statistics:
        forward_with_hooks(model, windows, batch_size)
    return statistics.norms(), statistics.hessians()
