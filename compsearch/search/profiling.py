"""Cheap sensitivity measurements: skip the decoder blocks a plan leaves untouched before its first change,
and stop after its last.

A decoder block's output depends only on the blocks before it. When a plan changes nothing before
block i, blocks 0..i-1 compute exactly what they computed for the base model, so they are replaced,
for the measurement, by a module that returns the base model's cached output of block i-1. On
average this halves the cost of profiling a model one block at a time. `output_error` also stops
after the last changed block: the relative error of its output costs the changed blocks alone, no
later block and no output head.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from compsearch.compress.blocks import block_output, decoder_blocks, hidden, replaying
from compsearch.spaces.layers import head_is_tied


class BlockReplay:
    """The base model's block outputs on one batch, and a way to skip the unchanged leading blocks."""

    def __init__(self, model: nn.Module, batch: torch.Tensor):
        self.blocks: nn.ModuleList | None = decoder_blocks(model)
        self.prefixes: list[str] = []
        self.before_blocks: set[str] = set()
        self.unseen_by_blocks: set[str] = set()  # layers whose change also reaches past the blocks
        self.outputs: list = []
        if self.blocks is None:  # an architecture without a plain block list: always run everything
            return
        names = {id(module): name for name, module in model.named_modules()}
        self.prefixes = [names[id(block)] + "." for block in self.blocks]
        ordered = [name for name, _ in model.named_modules()]
        self.before_blocks = set(ordered[:ordered.index(self.prefixes[0][:-1])]) if self.prefixes else set()
        if head_is_tied(model):  # a changed embedding changes the output head too
            self.unseen_by_blocks = {names[id(model.get_input_embeddings())]}
        handles = [block.register_forward_hook(lambda _m, _a, out: self.outputs.append(out)) for block in self.blocks]
        try:
            with torch.inference_mode():
                model.get_decoder()(input_ids=batch)
        finally:
            for handle in handles:
                handle.remove()

    def first_changed(self, layer_names) -> int:
        """Index of the first block holding one of the layers: 0 for a layer before the blocks (the token
        embedding), the block count if all lie after them (the output head)."""
        if any(name in self.before_blocks for name in layer_names):
            return 0
        indices = [block for block in map(self._block_of, layer_names) if block is not None]
        return min(indices, default=len(self.prefixes))

    def _block_of(self, layer_name: str) -> int | None:
        """Index of the block holding the layer; None for a layer outside the blocks."""
        return next((i for i, prefix in enumerate(self.prefixes) if layer_name.startswith(prefix)), None)

    def skipping(self, layer_names) -> contextlib.AbstractContextManager:
        """Within the block, blocks before the first changed one replay the base model's output."""
        first = self.first_changed(layer_names) if self.blocks is not None else 0
        if not first:
            return contextlib.nullcontext()
        return replaying(self.blocks, first, self.outputs[first - 1])

    def last_changed(self, layer_names) -> int | None:
        """Index of the last block holding one of the layers (0 for the token embedding: block 0 is the first
        to see its change); None when a block's output cannot show the whole change: a layer after the
        blocks (the output head), an embedding the head shares, a model without a plain block list."""
        if self.blocks is None:
            return None
        indices = []
        for name in layer_names:
            block = self._block_of(name)
            if name in self.unseen_by_blocks or (block is None and name not in self.before_blocks):
                return None
            indices.append(0 if block is None else block)
        return max(indices, default=None)

    def output_error(self, model: nn.Module, batch: torch.Tensor, layer_names) -> float | None:
        """||out - base||^2 / ||base||^2 of the last block the changed `layer_names` reach, `model` being the
        base model with them changed and `batch` the one this replay was made from; None where no block
        output shows the change (then only the full forward pass can measure it)."""
        last = self.last_changed(layer_names)
        if last is None:
            return None
        first = self.first_changed(layer_names)
        with torch.inference_mode():
            out = block_output(model, self.blocks, batch, last, first, self.outputs[first - 1] if first else None)
        out, base = (hidden(out).float(), hidden(self.outputs[last]).float())
        error = float((out - base).square().sum() / base.square().sum().clamp(min=1e-30))
        return error if math.isfinite(error) else None  # an overflow: only the full pass can say what it does
