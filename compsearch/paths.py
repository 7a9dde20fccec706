"""Where compsearch keeps what it measures or converts once and reuses (one place for every package)."""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$COMPSEARCH_CACHE`, else ~/.cache/compsearch: the converted default model, sensitivity profiles,
    latency cost tables."""
    return Path(os.environ.get("COMPSEARCH_CACHE", Path.home() / ".cache" / "compsearch"))
