"""A decoder's blocks run one at a time: block i's output on given inputs without running blocks 0..i-1.

Block i's output depends only on the output of block i-1. Blocks 0..i-1 are replaced, for the pass,
by a module that returns a cached output of block i-1 whatever it is given, and a hook ends the pass
after block i: the embedding and block i run, nothing else. Whatever each block needs besides the
hidden states (position embeddings, its own attention mask) the decoder still computes itself.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


class Stop(Exception):
    """Raised by a forward hook to end a forward pass once the wanted output is seen."""


class Replay(nn.Module):
    """Stands in for a decoder block: returns a cached output whatever it is given."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


def decoder_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The decoder's list of blocks; None for an architecture without a plain block list."""
    blocks = getattr(model.get_decoder(), "layers", None)
    return blocks if isinstance(blocks, nn.ModuleList) else None


def hidden(block_output):
    """The hidden states of a decoder block's output (a tensor, or a tuple that starts with them)."""
    return block_output[0] if isinstance(block_output, (tuple, list)) else block_output


@contextlib.contextmanager
def replaying(blocks: nn.ModuleList, count: int, output) -> Iterator[None]:
    """Within the block, the first `count` blocks return `output` (block count-1's output) unrun."""
    originals = [blocks[i] for i in range(count)]
    try:
        for i in range(count):
            blocks[i] = Replay(output)
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


def block_output(model: nn.Module, blocks: nn.ModuleList, batch, last: int, replayed: int = 0, replay=None):
    """Block `last`'s output on `batch` (token ids), the first `replayed` blocks returning `replay` (block
    replayed-1's output on it) unrun and the pass stopping after block `last`."""
    seen = {}

    def stop(_module, _args, out):
        seen["out"] = out
        raise Stop

    handle = blocks[last].register_forward_hook(stop)
    try:
        with replaying(blocks, replayed, replay), contextlib.suppress(Stop):
            model.get_decoder()(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return seen["out"]
