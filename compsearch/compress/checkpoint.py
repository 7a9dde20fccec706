"""Compressed checkpoints: packed integer codes in safetensors, and a loader that rebuilds the model."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compsearch.compress.apply import MatrixLayout, StoredMatrix, shape_like_plan_
from compsearch.compress.kmeans import PalettizedMatrix
from compsearch.compress.quantize import dequantize
from compsearch.compress.storage import FLOAT_BITS, NO_EXACT_ZERO, pack_bits, uses_mask_format, unpack_bits
from compsearch.spaces.layers import linear_layers
from compsearch.spaces.plan import Plan

WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"
FORMAT = "compsearch-packed-1"  # matrices without `quant_method` in their layout are RTN, as written before
PACKED_PARTS = ("mask", "values", "codes", "scales", "zeros", "codebook")


def save_compressed(model: nn.Module, plan: Plan, stored: dict[str, StoredMatrix], out_dir: Path, tokenizer=None) -> Path:
    """Write `model` (already compressed by `apply_plan_(..., keep_stored=True)`) to `out_dir`.

    Compressed matrices are written in their packed form; every other parameter as float16.
    Returns the path of the safetensors file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, matrix in stored.items():
        tensors.update(_packed_tensors(key, matrix))
    seen: set[int] = set()
    for name, param in model.named_parameters():  # shared (tied) parameters come once
        if name in stored or id(param) in seen:
            continue
        seen.add(id(param))
        tensors[name] = param.detach().to(torch.float16).contiguous()
    layouts = {key: vars(matrix.layout) for key, matrix in stored.items()}
    metadata = {"format": FORMAT, "plan": plan.to_json(), "matrices": json.dumps(layouts, sort_keys=True)}
    path = out_dir / WEIGHTS_FILE
    save_file(tensors, str(path), metadata=metadata)
    (out_dir / PLAN_FILE).write_text(plan.to_json() + "\n")
    model.config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return path


def _packed_tensors(key: str, matrix: StoredMatrix) -> dict[str, torch.Tensor]:
    layout = matrix.layout
    masked = _masked(layout)
    tensors = {}
    if masked:
        tensors[f"{key}.mask"] = pack_bits(matrix.mask, 1)
    if layout.bits >= FLOAT_BITS:
        values = matrix.weight[matrix.mask] if masked else matrix.weight
        tensors[f"{key}.values"] = values.to(torch.float16).reshape(-1).contiguous()
        return tensors
    q = matrix.quantized
    codes = q.codes[matrix.mask] if masked else q.codes
    tensors[f"{key}.codes"] = pack_bits(codes, layout.bits)
    if layout.quant_method == "kmeans":
        tensors[f"{key}.codebook"] = q.codebook.contiguous()
        return tensors
    tensors[f"{key}.scales"] = q.scales.contiguous()
    tensors[f"{key}.zeros"] = pack_bits(q.zeros, layout.bits)
    return tensors


def _masked(layout: MatrixLayout) -> bool:
    return uses_mask_format(layout.rows, layout.cols, layout.kept, layout.bits, layout.group_size, layout.quant_method)


def load_compressed(path: Path, trust_remote_code: bool = False) -> tuple[nn.Module, object | None]:
    """Rebuild a float32 model (and its tokenizer, if saved) from a folder written by `save_compressed`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as archive:
        metadata = archive.metadata()
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path / WEIGHTS_FILE} is not a compsearch checkpoint (format {metadata.get('format')!r})")
        plan = Plan.from_json(metadata["plan"])
        layouts = {key: MatrixLayout(**value) for key, value in json.loads(metadata["matrices"]).items()}
        shape_like_plan_(model, linear_layers(model, include_lm_head=True), plan)
        state = {key: _unpack_matrix(archive, key, layout) for key, layout in layouts.items()}
        packed_parts = {f"{key}.{part}" for key in layouts for part in PACKED_PARTS}
        for name in archive.keys():
            if name not in packed_parts:
                state[name] = archive.get_tensor(name).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint holds tensors the model has no place for: {unexpected[:5]}")
    model.tie_weights()
    untied = [name for name in missing if not _is_tied(model, name)]
    if untied:
        raise ValueError(f"checkpoint lacks tensors the model needs: {untied[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model.eval(), tokenizer


def _unpack_matrix(archive, key: str, layout: MatrixLayout) -> torch.Tensor:
    count = layout.rows * layout.cols
    masked = _masked(layout)
    mask = unpack_bits(archive.get_tensor(f"{key}.mask"), 1, count).bool().reshape(layout.rows, layout.cols) if masked else None
    n_values = layout.kept if masked else count
    if layout.bits >= FLOAT_BITS:
        values = archive.get_tensor(f"{key}.values").float()
        return _scatter(values, mask, layout)
    codes = unpack_bits(archive.get_tensor(f"{key}.codes"), layout.bits, n_values)
    if layout.quant_method in NO_EXACT_ZERO:
        # Only kept weights have codes; pruned positions get code 0 and are zeroed by the mask.
        full = torch.zeros(layout.rows, layout.cols, dtype=torch.uint8)
        if mask is not None:
            full[mask] = codes
        else:
            full = codes.reshape(layout.rows, layout.cols)
        values = PalettizedMatrix(full, archive.get_tensor(f"{key}.codebook"), layout.bits).dequantize()
        return values * mask if mask is not None else values
    scales = archive.get_tensor(f"{key}.scales")
    zeros = unpack_bits(archive.get_tensor(f"{key}.zeros"), layout.bits, scales.numel()).reshape(scales.shape)
    if mask is not None:
        # Pruned positions hold the zero point, which dequantizes to exactly 0.
        full = zeros.repeat_interleave(layout.group_size, dim=1)[:, : layout.cols].clone()
        full[mask] = codes
        codes = full
    return dequantize(codes.reshape(layout.rows, layout.cols), scales, zeros, layout.group_size)


def _scatter(values: torch.Tensor, mask: torch.Tensor | None, layout: MatrixLayout) -> torch.Tensor:
    if mask is None:
        return values.reshape(layout.rows, layout.cols)
    full = torch.zeros(layout.rows, layout.cols)
    full[mask] = values
    return full


def _is_tied(model: nn.Module, name: str) -> bool:
    head = model.get_output_embeddings()
    return head is not None and name.endswith("weight") and model.get_submodule(name.rsplit(".", 1)[0]) is head \
        and head.weight is model.get_input_embeddings().weight
