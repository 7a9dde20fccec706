"""Sequential calibration: each decoder block compressed with statistics of the inputs that the blocks
before it, already compressed, give it.

One-shot calibration (`calibration.input_hessians`) measures every layer's inputs on the base model,
so a layer is fitted to inputs the compressed model never shows it: the error of the blocks before it
is not compensated. In sequence (as GPTQ's reference code and llm-compressor calibrate), block i's
Hessians and input norms are measured on the outputs of compressed blocks 0..i-1, then block i is
compressed and run again to give block i+1 its inputs. The cost is two passes of each block over the
calibration windows (`blocks.block_output`: no block before it reruns), plus the compression itself.
Within a block the statistics are of the base block's own inputs (q/k/v, o, gate/up and down are
fitted together), as in llm-compressor's sequential pipeline.
"""
from __future__ import annotations

import torch
from torch import nn

from compsearch.compress.apply import StoredMatrix, apply_plan_
from compsearch.compress.blocks import block_output, decoder_blocks
from compsearch.compress.calibration import InputHessians, forward_with_hooks
from compsearch.spaces.plan import Plan, PlanError


@torch.no_grad()
def apply_plan_sequentially_(model: nn.Module, plan: Plan, windows: torch.Tensor, batch_size: int = 4,
                             keep_stored: bool = False) -> dict[str, StoredMatrix]:
    """Compress the planned layers of `model` in place, block by block, each block's calibration
    statistics (Hessians, input norms) measured on the calibration `windows` with the blocks before it
    already compressed; layers before the blocks (the token embedding) first, and layers after them (an
    untied output head) last, on the compressed blocks' outputs.
    Returns the stored matrices by state-dict key when `keep_stored` (to write a checkpoint)."""
    if plan.shared_bases():
        raise PlanError("a basis shared across blocks (share_blocks > 1) is fitted to all its blocks at once; "
                        "sequential calibration compresses one block at a time: compress it with one-shot "
                        "statistics (compress.apply_plan_ with input_hessians)")
    blocks = decoder_blocks(model)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no plain list of decoder blocks to calibrate in sequence; "
                         "compress it with one-shot statistics (compress.apply_plan_ with input_hessians)")
    names = {id(module): name for name, module in model.named_modules()}
    prefixes = [names[id(block)] + "." for block in blocks]
    planned = [name for name, layer_plan in plan.layers.items() if not layer_plan.is_identity]
    in_block = [[name for name in planned if name.startswith(prefix)] for prefix in prefixes]
    outside = [name for name in planned if not any(name.startswith(prefix) for prefix in prefixes)]
    ordered = [name for name, _ in model.named_modules()]
    first_block = ordered.index(prefixes[0][:-1])
    before = [name for name in outside if ordered.index(name) < first_block]
    after = [name for name in outside if name not in before]
    stored: dict[str, StoredMatrix] = {}

    def compress(part: list[str], statistics: InputHessians | None) -> None:
        norms, hessians = (statistics.norms(), statistics.hessians()) if statistics else ({}, {})
        stored.update(apply_plan_(model, Plan({name: plan[name] for name in part}), norms, keep_stored=keep_stored,
                                  hessians=hessians).stored)

    batches = [windows[start:start + batch_size] for start in range(0, len(windows), batch_size)]
    if before:  # the token embedding: its rounding needs no input statistics
        compress(before, None)
    previous = [None] * len(batches)  # the compressed block i-1's outputs, batch by batch (none before block 0)
    for index, part in enumerate(in_block):
        if part:
            with InputHessians(model, part) as statistics:
                for batch, inputs in zip(batches, previous):
                    block_output(model, blocks, batch, index, index, inputs)
            compress(part, statistics)
        previous = [block_output(model, blocks, batch, index, index, inputs) for batch, inputs in zip(batches, previous)]
    if after:
        with InputHessians(model, after) as statistics:
            forward_with_hooks(model, windows, batch_size, readers=statistics.readers)
        compress(after, statistics)
    return stored
