"""Calibration and evaluation text: loading, tokenizing, and cutting into non-overlapping windows."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEFAULT_SOURCE = "pydoc_data.topics"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


class DataError(ValueError):
    """The text to calibrate or evaluate on cannot be read or is too short."""


@dataclass(frozen=True)
class Protocol:
    """How a model was evaluated: recorded with every trial so results can be compared honestly."""

    data_source: str
    data_sha256: str
    seq_len: int
    eval_windows: int
    eval_tokens: int
    calib_windows: int
    bos_per_window: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Windows:
    """Token windows (rows of `seq_len` ids) for evaluation and calibration, from disjoint halves of the text."""

    eval_ids: torch.Tensor
    calib_ids: torch.Tensor
    protocol: Protocol


def load_text(path: str | None) -> tuple[str, str]:
    """The text and a name for its source: a file, every text file in a folder, or the default."""
    if path is None:
        from pydoc_data import topics

        return "\n\n".join(topics.topics[key] for key in sorted(topics.topics)), DEFAULT_SOURCE
    source = Path(path)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"--data {path}: the folder has no text files ({', '.join(TEXT_SUFFIXES)})")
    elif source.is_file():
        files = [source]
    else:
        raise DataError(f"--data {path}: no such file or folder; give a text file or a folder of them")
    try:
        return "\n\n".join(p.read_text(encoding="utf-8") for p in files), str(source.resolve())
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"--data {path}: cannot read it as UTF-8 text ({err})") from None


def make_windows(tokenizer, text: str, source: str, seq_len: int, eval_windows: int, calib_windows: int) -> Windows:
    """Cut the first half of the tokens into calibration windows and the second half into evaluation ones.

    Each window starts with the tokenizer's BOS token when it has one, as the model saw in training.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    body = seq_len - 1 if bos is not None else seq_len
    half = len(ids) // 2
    needed = max(eval_windows, calib_windows) * body
    if needed > half:
        raise DataError(
            f"the data from {source} has {len(ids)} tokens; {eval_windows} evaluation and {calib_windows} "
            f"calibration windows of {seq_len} tokens need {2 * needed}. Give more text or fewer/shorter windows"
        )
    protocol = Protocol(
        data_source=source, data_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), seq_len=seq_len,
        eval_windows=eval_windows, eval_tokens=eval_windows * (seq_len - 1), calib_windows=calib_windows,
        bos_per_window=bos is not None,
    )
    return Windows(_cut(ids[half:], body, eval_windows, bos), _cut(ids[:half], body, calib_windows, bos), protocol)


def _cut(ids: list[int], body: int, count: int, bos: int | None) -> torch.Tensor:
    rows = [ids[i * body:(i + 1) * body] for i in range(count)]
    if bos is not None:
        rows = [[bos] + row for row in rows]
    return torch.tensor(rows, dtype=torch.long)
