"""What the benchmark scripts share: the default model with the default data's windows, writing a table, and
this process's resident memory."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from compsearch.evaluators.data import Windows, load_text, make_windows
from compsearch.search.models import load_model, load_tokenizer, resolve_model

GIB = 2 ** 30


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


def merged_rows(path: Path, new: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    """The table in the CSV at `path` (if there is one) with the rows of `new` replacing those with the same
    `key` values; the other rows kept, first."""
    if not path.exists():
        return new
    old = pd.read_csv(path)
    kept = old[~old.set_index(key).index.isin(new.set_index(key).index)]
    return pd.concat([kept, new], ignore_index=True) if len(kept) else new


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def rss_gib(field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (peak since the last reset) of this process, in GiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError(f"{field} not in /proc/self/status")
