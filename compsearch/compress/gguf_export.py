"""Writing a compressed model as a GGUF file that llama.cpp (llama-cli, llama-server, Ollama) runs.

Every matrix a plan quantized in a GGUF type (`compress.gguf_formats`) is written as its blocks,
byte for byte what the trial evaluated; layers the plan keeps at 16 bits are F16 and 1-D tensors
(norms) F32, as llama.cpp's own converter writes them. The file's metadata -- architecture,
hyper-parameters, tokenizer, chat template -- is copied from a GGUF of the same model (the bundled
default model ships as one), or, for a Llama-architecture checkpoint with a byte-level BPE tokenizer,
made from its config and tokenizer files.
"""
from __future__ import annotations

import logging
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compsearch.compress.apply import layer_nbytes
from compsearch.compress.ggml_blocks import BlockQuantized, pack
from compsearch.compress.matrix import StoredMatrix
from compsearch.spaces.layers import LayerInfo
from compsearch.spaces.plan import Plan

log = logging.getLogger(__name__)
SKIPPED_TEMPLATE_KEYS = ("general.architecture", "general.file_type")  # written anew
# Gemma's RMSNorm scales by (1 + weight): llama.cpp's files store 1 + weight (transformers' loader
# subtracts the 1 again), so an export adds it back.
UNIT_OFFSET_NORM_ARCHS = ("gemma", "gemma2", "gemma3")


class GGUFExportError(ValueError):
    """The plan or the model cannot be written as a GGUF file."""


def gguf_linear_bits_per_weight(path: Path) -> float:
    """Stored bits per weight of a GGUF file's decoder matrices (its block tensors of two dimensions)."""
    import gguf

    linear = [t for t in gguf.GGUFReader(str(path)).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in linear) / sum(int(t.n_elements) for t in linear)


def export_gguf(model: nn.Module, plan: Plan, stored: dict[str, StoredMatrix], out_path: Path,
                template: Path | None = None, tokenizer_dir: Path | None = None) -> Path:
    """Write `model` (compressed by `apply_plan_(..., keep_stored=True)`, which returned `stored`) to
    `out_path`. Metadata comes from the GGUF `template`, else from the config and `tokenizer_dir`."""
    _check_plan(plan, stored)
    writer, arch = _writer(out_path, model.config, template, tokenizer_dir)
    for gguf_name, key, tensor in _named_tensors(model, arch):
        data, raw_type = _tensor_data(key, tensor, stored.get(key), model.config, arch)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


@dataclass(frozen=True)
class GGUFFileLayout:
    """What a GGUF export of a model weighs, for any plan, without writing it: the header (metadata and
    tensor directory, the same for every plan) and each tensor's data, padded as the file pads them."""

    header_bytes: int
    alignment: int
    shapes: dict[str, tuple[int, ...]]  # state-dict key -> shape, every tensor the file holds

    def file_nbytes(self, layers: list[LayerInfo], plan: Plan) -> int:
        """The bytes of the .gguf file `export_gguf` writes for `plan`."""
        planned = {f"{layer.name}.weight": layer for layer in layers}
        total = self.header_bytes
        for key, shape in self.shapes.items():
            layer = planned.get(key)
            if layer is not None:
                nbytes = layer_nbytes(layer, plan[layer.name])
            else:
                nbytes = math.prod(shape) * (4 if len(shape) == 1 else 2)  # 1-D in F32, matrices in F16
            total += -(-nbytes // self.alignment) * self.alignment
        return total


def gguf_file_layout(model: nn.Module, template: Path | None = None, tokenizer_dir: Path | None = None) -> GGUFFileLayout:
    """The layout of `model`'s GGUF export (a meta-device skeleton will do: only names and shapes are read)."""
    with tempfile.TemporaryDirectory(prefix="compsearch-gguf-header-") as folder:
        path = Path(folder) / "header.gguf"
        writer, arch = _writer(path, model.config, template, tokenizer_dir)
        shapes = {}
        for gguf_name, key, tensor in _named_tensors(model, arch):
            shapes[key] = tuple(tensor.shape)
            dtype = np.float32 if tensor.dim() == 1 else np.float16
            writer.add_tensor_info(gguf_name, tuple(tensor.shape), np.dtype(dtype), tensor.numel() * dtype().itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        size = path.stat().st_size
    alignment = writer.data_alignment
    return GGUFFileLayout(-(-size // alignment) * alignment, alignment, shapes)


def _writer(path: Path, config, template: Path | None, tokenizer_dir: Path | None):
    """A GGUF writer with the file's metadata, and the architecture's name."""
    import gguf

    arch = _architecture(template, config)
    writer = gguf.GGUFWriter(str(path), arch)
    if template is not None:
        _copy_metadata(gguf.GGUFReader(str(template)), writer)
    else:
        _llama_metadata(writer, config, tokenizer_dir)
    return writer, arch


def _named_tensors(model: nn.Module, arch: str):
    """(GGUF name, state-dict key, tensor) of every tensor llama.cpp loads, tied ones once."""
    import gguf

    names = gguf.TensorNameMap(_model_arch(arch), model.config.num_hidden_layers)
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key.endswith("rotary_emb.inv_freq") or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"{key} has no GGUF tensor name for architecture {arch!r}")
        yield gguf_name, key, tensor.detach()


def llama_quantize_types(model: nn.Module, plan: Plan, template: Path | None = None) -> str:
    """The plan as the lines `llama-quantize --tensor-type-file` reads (`^tensor$=type`, one a line): the
    same mix made by llama.cpp's own quantizer from an F16 GGUF of the base model."""
    import gguf

    _check_plan(plan, stored=None)
    arch = _architecture(template, model.config)
    names = gguf.TensorNameMap(_model_arch(arch), model.config.num_hidden_layers)
    lines = []
    for name, layer_plan in sorted(plan.layers.items()):
        gguf_name = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise GGUFExportError(f"{name} has no GGUF tensor name for architecture {arch!r}")
        kind = layer_plan.quant_method if layer_plan.bits < 16 else "f16"
        lines.append(f"^{re.escape(gguf_name)}$={kind}")
    return "\n".join(lines) + "\n"


def _check_plan(plan: Plan, stored: dict[str, StoredMatrix] | None) -> None:
    """GGUF holds one matrix per Linear, of the model's shape, in a ggml type or 16 bits."""
    from compsearch.compress.gguf_formats import GGUF_TYPES

    for name, layer_plan in plan.layers.items():
        if layer_plan.rank_fraction < 1.0 or layer_plan.is_structured:
            raise GGUFExportError(f"{name} is low-rank or structurally pruned: llama.cpp's architectures have "
                                  "no place for that; export it with --format compsearch")
        if layer_plan.bits < 16 and layer_plan.quant_method not in GGUF_TYPES:
            raise GGUFExportError(f"{name} is quantized with {layer_plan.quant_method!r}, which no GGUF type stores; "
                                  f"search a GGUF space (types {', '.join(GGUF_TYPES)}) or export --format compsearch")
        if layer_plan.sparsity > 0:
            raise GGUFExportError(f"{name} is pruned: GGUF stores no masks; export it with --format compsearch")
    missing = [name for name, lp in plan.layers.items() if lp.bits < 16 and f"{name}.weight" not in (stored or {})]
    if stored is not None and missing:
        raise GGUFExportError(f"no stored matrices for {missing[:3]}: apply the plan with keep_stored=True")


def _architecture(template: Path | None, config) -> str:
    if template is not None:
        import gguf

        field = gguf.GGUFReader(str(template)).get_field("general.architecture")
        return field.contents()
    if config.model_type != "llama":
        raise GGUFExportError(f"a {config.model_type!r} model needs a GGUF of the same model as template "
                              "(--gguf-template FILE, e.g. made by llama.cpp's convert_hf_to_gguf.py)")
    return "llama"


def _model_arch(arch: str):
    import gguf

    for model_arch, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return model_arch
    raise GGUFExportError(f"architecture {arch!r} is unknown to the installed gguf package")


def _copy_metadata(reader, writer) -> None:
    import gguf

    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in SKIPPED_TEMPLATE_KEYS:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)


def _llama_metadata(writer, config, tokenizer_dir: Path | None) -> None:
    """Llama hyper-parameters from the config; a byte-level BPE tokenizer from `tokenizer.json`."""
    import gguf

    if tokenizer_dir is None:
        raise GGUFExportError("without a GGUF template the tokenizer files are needed (tokenizer_dir)")
    heads = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    try:
        vocab = gguf.vocab.BpeVocab(Path(tokenizer_dir))
    except FileNotFoundError as err:
        raise GGUFExportError(f"{tokenizer_dir}: no byte-level BPE tokenizer.json ({err}); give a GGUF template") from None
    tokens, _scores, types = zip(*vocab.all_tokens())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(types))
    gguf.SpecialVocab(Path(tokenizer_dir), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))


def _tensor_data(key: str, tensor: torch.Tensor, matrix: StoredMatrix | None, config, arch: str):
    import gguf

    rows = _llama_row_order(key, tensor.shape[0], config) if arch == "llama" else None
    if matrix is not None and isinstance(matrix.quantized, BlockQuantized):
        data = pack(matrix.quantized)
        raw_type = gguf.GGMLQuantizationType[matrix.quantized.type.name.upper()]
    elif tensor.dim() == 1:
        values = tensor.detach().float()
        if arch in UNIT_OFFSET_NORM_ARCHS and key.endswith("norm.weight"):
            values = values + 1
        data, raw_type = values.numpy().astype(np.float32), None
    else:
        data, raw_type = tensor.detach().to(torch.float16).numpy(), None
    return (data[rows] if rows is not None else data), raw_type


def _llama_row_order(key: str, rows: int, config) -> np.ndarray | None:
    """llama.cpp's Llama rotates interleaved pairs, transformers halves: q and k rows are reordered as
    llama.cpp's converter does (per head, the two halves interleaved)."""
    if key.endswith("q_proj.weight"):
        heads = config.num_attention_heads
    elif key.endswith("k_proj.weight"):
        heads = config.num_key_value_heads or config.num_attention_heads
    else:
        return None
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)
