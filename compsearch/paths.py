"""Where compsearch keeps what it measures or converts once and reuses (one place for every package)."""
from __future__ import annotations

import os
from pathlib import Path


VARIANT_STORE_GB = 8.0  # the default bound of the compressed-layer variants kept on disk


def default_cache_dir() -> Path:
    """`$COMPSEARCH_CACHE`, else ~/.cache/compsearch: the converted default model, sensitivity profiles,
    latency cost tables, compressed-layer variants."""
    return Path(os.environ.get("COMPSEARCH_CACHE", Path.home() / ".cache" / "compsearch"))


def variant_store_bytes() -> int:
    """`$COMPSEARCH_VARIANT_CACHE_GB` (0 turns the store off), else `VARIANT_STORE_GB`: how much of the cache
    the compressed-layer variants may take."""
    text = os.environ.get("COMPSEARCH_VARIANT_CACHE_GB", str(VARIANT_STORE_GB))
    try:
        gigabytes = float(text)
    except ValueError:
        gigabytes = -1.0
    if not gigabytes >= 0:
        raise ValueError(f"COMPSEARCH_VARIANT_CACHE_GB={text!r} is not a size in GB; set a number >= 0 (0: no store)")
    return int(gigabytes * 2**30)
