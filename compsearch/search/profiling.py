"""Cheap sensitivity measurements: skip the decoder blocks a plan leaves untouched before its first change.

A decoder block's output depends only on the blocks before it. When a plan changes nothing before
block i, blocks 0..i-1 compute exactly what they computed for the base model, so they are replaced,
for the measurement, by a module that returns the base model's cached output of block i-1. On
average this halves the cost of profiling a model one block at a time.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class _Replay(nn.Module):
    """Stands in for a decoder block: returns a cached output whatever it is given."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


class BlockReplay:
    """The base model's block outputs on one batch, and a way to skip the unchanged leading blocks."""

    def __init__(self, model: nn.Module, batch: torch.Tensor):
        decoder = model.get_decoder()
        self.blocks: nn.ModuleList | None = getattr(decoder, "layers", None)
        self.prefixes: list[str] = []
        self.before_blocks: set[str] = set()
        self.outputs: list = []
        if not isinstance(self.blocks, nn.ModuleList):
            self.blocks = None  # an architecture without a plain block list: always run everything
            return
        names = {id(module): name for name, module in model.named_modules()}
        self.prefixes = [names[id(block)] + "." for block in self.blocks]
        ordered = [name for name, _ in model.named_modules()]
        self.before_blocks = set(ordered[:ordered.index(self.prefixes[0][:-1])]) if self.prefixes else set()
        handles = [block.register_forward_hook(lambda _m, _a, out: self.outputs.append(out)) for block in self.blocks]
        try:
            with torch.inference_mode():
                decoder(input_ids=batch)
        finally:
            for handle in handles:
                handle.remove()

    def first_changed(self, layer_names) -> int:
        """Index of the first block holding one of the layers: 0 for a layer before the blocks (the token
        embedding), the block count if all lie after them (the output head)."""
        if any(name in self.before_blocks for name in layer_names):
            return 0
        indices = [i for name in layer_names for i, prefix in enumerate(self.prefixes) if name.startswith(prefix)]
        return min(indices, default=len(self.prefixes))

    @contextlib.contextmanager
    def skipping(self, layer_names) -> Iterator[None]:
        """Within the block, blocks before the first changed one replay the base model's output."""
        first = self.first_changed(layer_names) if self.blocks is not None else 0
        originals = [self.blocks[i] for i in range(first)] if first else []
        try:
            for i in range(first):
                self.blocks[i] = _Replay(self.outputs[first - 1])
            yield
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block
