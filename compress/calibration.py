"""Statistics of the layers' inputs on calibration data, gathered in one pass."""
from __future__ import annotations

import torch
from torch import nn


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

    handles = [model.get_submodule(name).register_forward_hook(hook_for(name)) for name in layer_names]
    try:
        for start in range(0, len(windows), batch_size):
            model(windows[start:start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return {name: total.sqrt() for name, total in squares.items()}
