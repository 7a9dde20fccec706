"""Plans of symmetric integer weights written as compressed-tensors checkpoints, which vLLM serves and
transformers loads (`AutoModelForCausalLM.from_pretrained(folder)`).

Written with the compressed-tensors library itself: every quantized Linear gets a `QuantizationScheme`
(int, symmetric, group strategy, its bits and group size; one config group per distinct scheme, its
targets the modules' names), its `weight_scale` is set to the plan's fp16 scales and its weight to the
plan's values, and the library's `pack-quantized` compressor stores the codes (32 / bits per int32), so
the checkpoint decompresses to exactly the values the trial computed with. Layers kept at 16 bits are
left out of every group; the model's other tensors are written in float16.

What the format cannot hold is refused: asymmetric grids (compressed-tensors 0.20 writes their packed
zero points in a shape its own transformers loader then rejects), other quantizers' formats, low-rank
factors and structured pruning (the checkpoint keeps the model's config and shapes), and a quantized
token embedding. Pruned weights are stored as codes of 0 (compressed-tensors 0.20 dropped its sparse
formats, so sparsity saves no bytes here).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compsearch.compress.matrix import StoredMatrix
from compsearch.compress.storage import FLOAT_BITS
from compsearch.compress.techniques import quantizer_format
from compsearch.spaces.plan import Plan

FORMAT = "pack-quantized"
STORAGE = "symmetric"  # the registered format (`formats.SymmetricGrid`) whose layout this is


class CompressedTensorsExportError(ValueError):
    """The plan holds something a compressed-tensors checkpoint cannot."""


def check_exportable(model: nn.Module, plan: Plan) -> None:
    """Refuse, naming the layer and the fix, a plan that a compressed-tensors checkpoint cannot hold."""
    for name, layer_plan in plan.layers.items():
        if layer_plan.is_identity:
            continue
        if layer_plan.rank_fraction < 1.0 or layer_plan.is_structured:
            raise CompressedTensorsExportError(
                f"{name}: a compressed-tensors checkpoint keeps the model's shapes, so it holds no low-rank "
                "factors or structured pruning; export this plan with --format compsearch")
        if layer_plan.bits >= FLOAT_BITS:
            continue
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            raise CompressedTensorsExportError(f"{name}: the token embedding is kept at 16 bits in compressed-tensors "
                                               "exports; search with the vllm space")
        storage = quantizer_format(layer_plan.quant_method).name
        if storage != STORAGE:
            raise CompressedTensorsExportError(
                f"{name}: quant method {layer_plan.quant_method!r} stores the {storage!r} format; compressed-tensors "
                "(as vLLM and transformers load it) holds symmetric integer weights: search with the vllm space "
                "(quant methods gptq-sym, rtn-sym)")
        if module.in_features % layer_plan.group_size:
            raise CompressedTensorsExportError(
                f"{name}: groups of {layer_plan.group_size} do not divide its {module.in_features} inputs, and "
                "compressed-tensors (and vLLM) need whole groups: use a group size that divides them")


def export_compressed_tensors(model: nn.Module, plan: Plan, stored: dict[str, StoredMatrix], out_dir: Path,
                              tokenizer=None) -> Path:
    """Write `model` (compressed by `apply_plan_(..., keep_stored=True)`, which returned `stored`) to
    `out_dir` as a compressed-tensors checkpoint; `model` is turned into the saved form (float16, packed)
    and should not be used afterwards. Returns `out_dir`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs, QuantizationConfig, QuantizationScheme, QuantizationStatus, apply_quantization_config,
    )

    check_exportable(model, plan)
    schemes: dict[tuple[int, int], list[str]] = {}
    for name, layer_plan in plan.layers.items():
        if layer_plan.bits < FLOAT_BITS:
            schemes.setdefault((layer_plan.bits, layer_plan.group_size), []).append(name)
    config = QuantizationConfig(
        config_groups={f"group_{index}": QuantizationScheme(
            targets=names, weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group",
                                                    group_size=group_size))
            for index, ((bits, group_size), names) in enumerate(sorted(schemes.items()))},
        ignore=["lm_head"], quantization_status=QuantizationStatus.FROZEN)
    model.half()
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for names in schemes.values():
            for name in names:
                module = model.get_submodule(name)
                matrix = stored[f"{name}.weight"]
                module.weight.copy_(matrix.weight)  # (code - middle) * scale: the compressor finds the codes again
                module.weight_scale.copy_(matrix.quantized.scales)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=FORMAT)
    compressor.compress_model(model)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def load_checkpoint(out_dir: Path, trust_remote_code: bool = False) -> nn.Module:
    """The checkpoint as `AutoModelForCausalLM.from_pretrained` loads it (float32), its weights unpacked:
    compressed-tensors unpacks them on the model's first forward pass, so one is run here and every later
    call (also one of the decoder alone) sees plain Linears."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    with torch.no_grad():
        model.eval()(input_ids=torch.zeros(1, 1, dtype=torch.long))
    return model


def checkpoint_nbytes(out_dir: Path) -> int:
    """Bytes of the checkpoint's tensor files."""
    return sum(path.stat().st_size for path in Path(out_dir).glob("*.safetensors"))
