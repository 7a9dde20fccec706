"""Turning a compressed model into the form that is timed: real fast kernels where the device has them.

A trial's model holds every compressed weight dequantized in float32 (exact for quality metrics, but
it runs dense kernels). For latency the model is converted, layer by layer, to what a deployment
would run:

- CPU: 8-bit layers (uniform grids: rtn, gptq, hqq) become torch's dynamic int8 Linear
  (`torch.ao.quantization.quantize_dynamic`, fbgemm/onednn int8 GEMM); low-rank layers are already
  two smaller dense matrices and structurally pruned MLPs already have smaller matrices.
- CUDA (bf16): 4-bit layers with groups of 32/64/128 become torchao int4 weight-only, 8-bit layers
  torchao int8 weight-only, and 2:4 layers (16-bit values) semi-structured sparse where the shape allows.

Which quantized matrices have a fast kernel is their storage format's word (`StorageFormat.kernel`).
A choice with no fast kernel on the device (3-bit on CPU, unstructured sparsity, k-means codebooks,
...) is timed as the dense layer it is held as, and counted as simulated: `latency_kernel` is
"real" only when every compressed layer ran on a kernel that exploits its compression.
"""
from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

from compsearch.compress.techniques import quantizer_format
from compsearch.spaces.plan import LayerPlan, Plan

log = logging.getLogger(__name__)


def layer_kernel(plan: LayerPlan, device_type: str) -> str:
    """The kernel a layer's choice runs on: 'dense' (nothing to exploit), 'int8', 'int4', 'sparse24',
    'lowrank', 'structured' (real, smaller matrices), or 'simulated' (no fast kernel for it here)."""
    shrunk = plan.rank_fraction < 1.0 or plan.is_structured
    base = "lowrank" if plan.rank_fraction < 1.0 else "structured" if plan.is_structured else "dense"
    if plan.sparsity > 0:
        if device_type == "cuda" and plan.pattern == "2:4" and plan.bits == 16 and not shrunk:
            return "sparse24"
        return "simulated"
    if plan.bits == 16:
        return base
    kernel = quantizer_format(plan.quant_method).kernel(plan.bits, plan.group_size, device_type)
    return "simulated" if kernel == "int4" and shrunk else kernel  # torchao's int4 layout wants full matrices


def plan_kernels(plan: Plan, device_type: str) -> dict[str, str]:
    """Layer name -> kernel for every compressed layer of the plan."""
    return {name: layer_kernel(lp, device_type) for name, lp in plan.layers.items() if not lp.is_identity}


def kernel_summary(plan: Plan, device_type: str) -> dict:
    """`latency_kernel` ('real' or 'simulated') and how many compressed layers have no fast kernel."""
    kernels = plan_kernels(plan, device_type)
    simulated = sum(kernel == "simulated" for kernel in kernels.values())
    return {"latency_kernel": "simulated" if simulated else "real", "latency_simulated_layers": simulated}


def timing_model(model: nn.Module, plan: Plan) -> tuple[nn.Module, dict]:
    """A copy of `model` (already compressed by `plan`) on the device's fast kernels, and its kernel summary
    (`latency_kernel`, `latency_simulated_layers`) as really converted."""
    device = next(model.parameters()).device
    timed = copy.deepcopy(model)
    kernels = plan_kernels(plan, device.type)
    if device.type == "cuda":
        timed, kernels = _to_cuda_kernels_(timed, plan, kernels)
    else:
        timed = _to_cpu_kernels_(timed, kernels)
    simulated = sum(kernel == "simulated" for kernel in kernels.values())
    return timed, {"latency_kernel": "simulated" if simulated else "real", "latency_simulated_layers": simulated}


def _to_cpu_kernels_(model: nn.Module, kernels: dict[str, str]) -> nn.Module:
    int8 = [name for name, kernel in kernels.items() if kernel == "int8"]
    if not int8:
        return model
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    # A name maps to its module and (for a low-rank layer) both of its factors.
    spec = {name: per_channel_dynamic_qconfig for name in int8}
    with warnings.catch_warnings():  # torch marks eager-mode quantization deprecated; it is still the CPU int8 path
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, qconfig_spec=spec, dtype=torch.qint8, inplace=True)


def _to_cuda_kernels_(model: nn.Module, plan: Plan, kernels: dict[str, str]
                      ) -> tuple[nn.Module, dict[str, str]]:  # pragma: no cover - needs a GPU
    """torchao int4/int8 weight-only and 2:4 semi-structured sparsity, in bf16 (what those kernels take)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    model = model.to(torch.bfloat16)
    int8 = {name for name, kernel in kernels.items() if kernel == "int8"}
    if int8:
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: _covered(fqn, int8, module))
    for group_size in sorted({plan[name].group_size for name, kernel in kernels.items() if kernel == "int4"}):
        int4 = {name for name, kernel in kernels.items() if kernel == "int4" and plan[name].group_size == group_size}
        if int4:
            quantize_(model, Int4WeightOnlyConfig(group_size=group_size),
                      filter_fn=lambda module, fqn, names=int4: _covered(fqn, names, module))
    kernels = dict(kernels)
    for name in [name for name, kernel in kernels.items() if kernel == "sparse24"]:
        if not _to_semi_structured_(model.get_submodule(name), name):
            kernels[name] = "simulated"
    return model, kernels


def _covered(fqn: str, names: set[str], module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and (fqn in names or fqn.rsplit(".", 1)[0] in names)


def _to_semi_structured_(linear: nn.Module, name: str) -> bool:  # pragma: no cover - needs a GPU
    """Swap a 2:4-pruned Linear's weight for torch's semi-structured sparse tensor; False if the shape can't."""
    from torch.sparse import to_sparse_semi_structured

    rows, cols = linear.weight.shape
    if rows % 64 or cols % 64:  # cuSPARSELt / CUTLASS tile constraints
        log.info("%s (%dx%d) stays dense: 2:4 kernels need multiples of 64", name, rows, cols)
        return False
    linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
    return True
