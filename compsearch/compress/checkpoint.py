"""Compressed checkpoints: packed integer codes in safetensors, and a loader that rebuilds the model."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compsearch.compress.apply import MatrixLayout, StoredMatrix, shape_like_plan_
from compsearch.compress.matrix import pack_matrix, unpack_matrix
from compsearch.spaces.layers import linear_layers
from compsearch.spaces.plan import Plan

# Not model.safetensors: a folder of packed matrices must not look like a plain checkpoint, which
# `AutoModelForCausalLM.from_pretrained` would load with every compressed Linear left random.
WEIGHTS_FILE = "compsearch.safetensors"
OLD_WEIGHTS_FILE = "model.safetensors"  # what earlier versions wrote; still read
PLAN_FILE = "plan.json"
FORMAT = "compsearch-packed-1"  # matrices without `quant_method` in their layout are RTN, as written before


def save_compressed(model: nn.Module, plan: Plan, stored: dict[str, StoredMatrix], out_dir: Path, tokenizer=None) -> Path:
    """Write `model` (already compressed by `apply_plan_(..., keep_stored=True)`) to `out_dir`.

    Compressed matrices are written in their packed form; every other parameter as float16.
    Returns the path of the safetensors file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, matrix in stored.items():
        tensors.update({f"{key}.{part}": tensor for part, tensor in pack_matrix(matrix).items()})
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


def load_compressed(path: Path, trust_remote_code: bool = False) -> tuple[nn.Module, object | None]:
    """Rebuild a float32 model (and its tokenizer, if saved) from a folder written by `save_compressed`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    weights = path / WEIGHTS_FILE if (path / WEIGHTS_FILE).exists() else path / OLD_WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as archive:
        metadata = archive.metadata()
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{weights} is not a compsearch checkpoint (format {metadata.get('format')!r})")
        plan = Plan.from_json(metadata["plan"])
        layouts = {key: MatrixLayout(**value) for key, value in json.loads(metadata["matrices"]).items()}
        shape_like_plan_(model, linear_layers(model, include_lm_head=True), plan)
        names = set(archive.keys())
        state = {key: unpack_matrix({name[len(key) + 1:]: archive.get_tensor(name) for name in names
                                     if name.startswith(f"{key}.")}, layout).weight
                 for key, layout in layouts.items()}
        packed = {name for key in layouts for name in names if name.startswith(f"{key}.")}
        for name in names - packed:
            state[name] = archive.get_tensor(name).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint holds tensors the model has no place for: {unexpected[:5]}")
    model.tie_weights()
    untied = _not_loaded(model, missing, state)
    if untied:
        raise ValueError(f"checkpoint lacks tensors the model needs: {untied[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return model.eval(), tokenizer


def _not_loaded(model: nn.Module, missing: list[str], state: dict[str, torch.Tensor]) -> list[str]:
    """The `missing` names the checkpoint did not fill under another name either (as it fills a tied output
    head with the token embedding, and every block of a run with the basis they share, stored once)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(param) for key, param in params.items() if key in state}
    return [name for name in missing if id(params.get(name)) not in loaded]
