"""Statistics of the layers' inputs on calibration data, gathered in one pass."""
from __future__ import annotations

from dataclasses import dataclass

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


class _AllRead(Exception):
    """Raised inside a forward pass once every module a statistics pass reads has run."""


def forward_with_hooks(model: nn.Module, windows: torch.Tensor, batch_size: int, hooks: dict | None = None,
                       readers: list[str] | None = None) -> None:
    """Run the calibration windows through the model batch by batch with a forward hook per named module.

    Each batch's pass stops once every module of `readers` (default: the hooked ones) has run, so what
    comes after them (the final norm, the output head and its logits: a fifth of a small model's
    compute, vocabulary x tokens floats of memory) is not computed. Hooks registered before this call
    on those modules run first."""
    hooks = hooks or {}
    readers = set(hooks if readers is None else readers)
    ran: set[str] = set()

    def stop_after(name: str):
        def hook(_module, _args, _output):
            ran.add(name)
            if len(ran) == len(readers):
                raise _AllRead
        return hook

    handles = [model.get_submodule(name).register_forward_hook(hook) for name, hook in hooks.items()]
    handles += [model.get_submodule(name).register_forward_hook(stop_after(name)) for name in readers]
    try:
        for start in range(0, len(windows), batch_size):
            ran.clear()
            try:
                model(windows[start:start + batch_size])
            except _AllRead:
                pass
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

        self.readers = list(first_reader.values())
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
        forward_with_hooks(model, windows, batch_size, readers=statistics.readers)
    return statistics.norms(), statistics.hessians()


@dataclass
class InputStatistics:
    """Input norms, and Hessians where asked, of named Linears over `tokens` calibration tokens.

    Statistics of disjoint shares of the windows (measured apart, one share per worker) merge (`merged_with`)
    into those of all of them: squared norms add, Hessians (means of X^T X) average weighted by tokens;
    equal to one pass over all windows up to float round-off."""

    tokens: int
    norms: dict[str, torch.Tensor]
    hessians: dict[str, torch.Tensor] | None = None

    @classmethod
    def measure(cls, model: nn.Module, windows: torch.Tensor, layer_names: list[str], batch_size: int,
                with_hessians: bool) -> "InputStatistics":
        """One pass over `windows`: norms only (cheap), or norms and Hessians."""
        if with_hessians:
            norms, hessians = input_statistics(model, windows, layer_names, batch_size)
        else:
            norms, hessians = input_norms(model, windows, layer_names, batch_size), None
        return cls(windows.numel(), norms, hessians)

    def merged_with(self, other: "InputStatistics") -> "InputStatistics":
        """The statistics of these windows and `other`'s together (a Hessian layers share stays one)."""
        total = self.tokens + other.tokens
        norms = {name: torch.sqrt(norm.square() + other.norms[name].square()) for name, norm in self.norms.items()}
        return InputStatistics(total, norms, _each_distinct(self.hessians, lambda name, hessian: (
            hessian * (self.tokens / total) + other.hessians[name] * (other.tokens / total))))

    def to(self, device: str | torch.device) -> "InputStatistics":
        return InputStatistics(self.tokens, {name: norm.to(device) for name, norm in self.norms.items()},
                               _each_distinct(self.hessians, lambda _name, hessian: hessian.to(device)))


def _each_distinct(hessians: dict[str, torch.Tensor] | None, change) -> dict[str, torch.Tensor] | None:
    """`change(name, hessian)` by layer name, computed once per distinct tensor (q/k/v share one)."""
    if hessians is None:
        return None
    changed: dict[int, torch.Tensor] = {}
    for name, hessian in hessians.items():
        if id(hessian) not in changed:
            changed[id(hessian)] = change(name, hessian)
    return {name: changed[id(hessian)] for name, hessian in hessians.items()}
