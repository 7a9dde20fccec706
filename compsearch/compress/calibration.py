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

    _forward_with_hooks(model, windows, {name: hook_for(name) for name in layer_names}, batch_size)
    return {name: total.sqrt() for name, total in squares.items()}


def _forward_with_hooks(model: nn.Module, windows: torch.Tensor, hooks: dict, batch_size: int) -> None:
    """Run the calibration windows through the model batch by batch with a forward hook per named module."""
    handles = [model.get_submodule(name).register_forward_hook(hook) for name, hook in hooks.items()]
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


@torch.inference_mode()
def input_hessians(model: nn.Module, windows: torch.Tensor, layer_names: list[str],
                   batch_size: int = 4) -> dict[str, torch.Tensor]:
    """H = X^T X / tokens (in x in, float32) of every named Linear's inputs over the calibration windows.

    One forward pass per batch with hooks: memory is the model, one batch of activations and the
    statistics themselves (about in^2 floats per distinct input; q/k/v and gate/up share one), not
    the calibration activations, so a 1B model fits a 24 GiB machine. Statistics are of the *base*
    model's inputs: compressing earlier layers would change later inputs, which methods using them
    (GPTQ, SparseGPT, whitened SVD) ignore -- the usual one-shot approximation, chosen so a worker
    measures them once and reuses them for every plan.
    """
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    keys = {name: shared_input_key(name) for name in layer_names}
    first_reader = {key: name for name, key in reversed(list(keys.items()))}

    def hook_for(name: str):
        key = keys[name]

        def hook(_module, args, _output):
            if first_reader[key] != name:
                return  # another projection of the fused set already counted this input
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[key] = sums[key].addmm_(x.T, x) if key in sums else x.T @ x
            tokens[key] = tokens.get(key, 0) + x.shape[0]
        return hook

    _forward_with_hooks(model, windows, {name: hook_for(name) for name in layer_names}, batch_size)
    scaled = {key: total.div_(tokens[key]) for key, total in sums.items()}
    return {name: scaled[key] for name, key in keys.items() if key in scaled}
