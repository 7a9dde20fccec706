"""What the benchmark scripts share: the default model with the default data's windows, and writing a table."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from compsearch.evaluators.data import Windows, load_text, make_windows
from compsearch.search.models import load_model, load_tokenizer, resolve_model


def default_model_and_windows(seq_len: int, eval_windows: int, calib_windows: int):
    """SmolLM2-135M, its tokenizer and the default data's evaluation and calibration windows."""
    ref = resolve_model("smollm2-135m")
    model, tokenizer = load_model(ref), load_tokenizer(ref)
    text, source = load_text(None)
    windows: Windows = make_windows(tokenizer, text, source, seq_len, eval_windows, calib_windows)
    return model, tokenizer, windows


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Write the table as CSV and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    print(table.to_string(index=False))
    print(f"\nwrote {path}")
