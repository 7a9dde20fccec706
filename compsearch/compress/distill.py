"""Knowledge distillation: recover a compressed model's quality by training what its storage keeps in
floating point to match the base model's next-token distributions on the calibration split.

What trains -- so the plan, its bytes and its checkpoint format stay exactly as they were:
- quantized matrices: the float parameters their storage format marks `trainable` (fp16 group scales
  of the affine grid, codebooks of the palette), through a multiplicative factor per entry, codes and
  integer zero points fixed;
- planned matrices kept at 16 bits (low-rank factors, thinned MLPs and attentions, pruned weights,
  whose masks stay fixed);
- norm weights and biases.
Layers the plan leaves untouched and the embeddings stay frozen: they are the base model's.
The loss is KL(base || compressed) of the next-token distributions over the full vocabulary, mean
per token. Afterwards every trained value is rounded to float16 (what a checkpoint stores) and the
stored matrices are rebuilt, so `save_compressed` writes the distilled model exactly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compsearch.compress.matrix import StoredMatrix, quantized_values
from compsearch.compress.techniques import quantizer_format


@dataclass(frozen=True)
class DistillSettings:
    """`steps` Adam steps over batches of `batch_size` calibration windows (cycled in order);
    `lr` for 16-bit weights, norms and biases, `scale_lr` for the factors on scales and codebooks."""

    steps: int = 100
    lr: float = 1e-4
    scale_lr: float = 1e-3
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"distillation needs steps >= 1 and batch_size >= 1, got {self.steps} and {self.batch_size}")
        if not (self.lr > 0 and self.scale_lr > 0):
            raise ValueError(f"learning rates must be > 0, got lr={self.lr} and scale_lr={self.scale_lr}")


class _TrainableGrid:
    """A quantized Linear whose weight is recomputed from its fixed codes and trainable fp scales
    (or codebook) on every forward."""

    def __init__(self, module: nn.Linear, matrix: StoredMatrix):
        self.module, self.matrix = module, matrix
        self.field = quantizer_format(matrix.layout.quant_method).trainable
        self.values = getattr(matrix.quantized, self.field)
        self.factor = nn.Parameter(torch.ones(self.values.shape, dtype=torch.float32, device=module.weight.device))
        del module.weight  # the frozen Parameter; a tensor computed from the factor takes its place
        self.handle = module.register_forward_pre_hook(lambda m, _args: setattr(m, "weight", self.weight()))

    def weight(self) -> torch.Tensor:
        """The weight on the grid with the factored scales (or codebook), differentiable in the factor."""
        trained = dataclasses.replace(self.matrix.quantized, **{self.field: self.values.float() * self.factor})
        return quantized_values(trained, self.matrix.mask, self.matrix.layout.quant_method)

    def finish(self) -> StoredMatrix:
        """Round the trained values to fp16, give the module its Parameter back, return the new stored form."""
        self.handle.remove()
        rounded = (self.values.float() * self.factor.detach()).half()
        quantized = dataclasses.replace(self.matrix.quantized, **{self.field: rounded})
        weight = quantized_values(quantized, self.matrix.mask, self.matrix.layout.quant_method)
        del self.module.weight
        self.module.weight = nn.Parameter(weight, requires_grad=False)
        return StoredMatrix(self.matrix.layout, weight, self.matrix.mask, quantized)


def distill_(student: nn.Module, teacher: nn.Module, stored: dict[str, StoredMatrix], calib_ids: torch.Tensor,
             settings: DistillSettings = DistillSettings(),
             on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `student` (compressed by `apply_plan_(..., keep_stored=True)`, which returned `stored`)
    toward `teacher` (the base model) on `calib_ids`; `stored` is updated in place. Returns the loss
    of every step; `on_step(step, loss)` reports progress."""
    for param in student.parameters():
        param.requires_grad_(False)
    grids = {key: _TrainableGrid(student.get_submodule(key.removesuffix(".weight")), matrix)
             for key, matrix in stored.items() if matrix.quantized is not None}
    dense = {key: matrix for key, matrix in stored.items() if matrix.quantized is None}
    floats = [student.get_parameter(key) for key in dense] + _norms_and_biases(student)
    for param in floats:
        param.requires_grad_(True)
    groups = [{"params": floats, "lr": settings.lr}, {"params": [g.factor for g in grids.values()], "lr": settings.scale_lr}]
    optimizer = torch.optim.Adam([group for group in groups if group["params"]])
    losses = []
    was_training = student.training
    student.train(False)  # no dropout: the student must match the teacher, not a noisy version of it
    try:
        for step in range(settings.steps):
            start = (step * settings.batch_size) % len(calib_ids)
            batch = calib_ids[start:start + settings.batch_size]
            with torch.no_grad():
                target = F.log_softmax(teacher(batch).logits.float(), dim=-1)
            predicted = F.log_softmax(student(batch).logits.float(), dim=-1)
            loss = F.kl_div(predicted, target, log_target=True, reduction="none").sum(dim=-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for key, matrix in dense.items():
                    if matrix.mask is not None:
                        student.get_parameter(key).mul_(matrix.mask)
            losses.append(loss.item())
            if on_step:
                on_step(step + 1, losses[-1])
    finally:
        with torch.no_grad():
            for param in floats:
                param.requires_grad_(False)
                param.copy_(param.half().float())
            for key, grid in grids.items():
                stored[key] = grid.finish()
            for key, matrix in dense.items():
                stored[key] = StoredMatrix(matrix.layout, student.get_parameter(key).detach().clone(), matrix.mask, None)
        student.train(was_training)
    return losses


def _norms_and_biases(model: nn.Module) -> list[nn.Parameter]:
    """Normalization weights and Linear biases: stored at 16 bits whatever the plan."""
    params = []
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            params.extend(p for p in module.parameters(recurse=False))
        elif isinstance(module, nn.Linear) and module.bias is not None:
            params.append(module.bias)
    return params
