"""Compressed matrices kept across the plans one worker applies: each layer's variant is computed once.

A matrix compressed under a layer plan depends only on the base model's weights, the calibration
statistics (both fixed for a worker) and that layer plan, not on what the other layers do, because
statistics are measured on the base model. So a worker that evaluates many plans (the sensitivity
profile's one-layer plans, then the trials) keeps each (matrix, layer plan) result it computes and
reuses it: GPTQ-style methods then cost once per variant instead of once per trial. The cache holds
what the checkpoint stores (codes and scales, or the 16-bit values of a pruned matrix), not float32
weights, and drops the least recently used variants beyond its byte budget.

Variants of calibrated or iterative methods (GPTQ, SparseGPT, Wanda, HQQ, k-means ...: the costly
ones, `VariantStore.keeps`) also go to a `VariantStore` on disk when the worker has one: every worker, resume and
study that compresses the same model with the same calibration windows on the same kind of device
then reads them instead of computing them again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from compsearch.compress.matrix import (MatrixLayout, StoredMatrix, pack_matrix, quantized_values, unpack_mask,
                                       unpack_matrix)
from compsearch.compress.storage import pack_bits
from compsearch.spaces.plan import LayerPlan

log = logging.getLogger(__name__)

FLOAT32_BYTES = 4
PARTIAL_FILE_S = 3600  # a temporary variant file this old belongs to a writer that was killed
ROUNDING = ("rtn", "rtn-sym")  # quantizers that compute a matrix faster than the store reads it back
MODEL_COPIES = 2  # the budget: as many bytes as two float32 copies of the model's weights


def variant_cache_bytes(total_params: int) -> int:
    """A worker's cache budget for a model of `total_params` parameters (holds many variants: codes
    take a byte or less per weight)."""
    return MODEL_COPIES * total_params * FLOAT32_BYTES


@dataclass(frozen=True)
class _Variant:
    matrix: StoredMatrix  # with `weight` empty when it is rebuilt from `quantized` or `half_weight`
    half_weight: torch.Tensor | None  # the values of a matrix kept at 16 bits
    nbytes: int


class VariantCache:
    """(state-dict key, layer plan) -> the compressed matrix, least recently used first out; backed by
    `store` (on disk) for the variants `VariantStore.keeps`."""

    def __init__(self, max_bytes: int, store: "VariantStore | None" = None):
        self.max_bytes = max_bytes
        self.store = store
        self.nbytes = 0
        self.hits = self.misses = 0
        self._variants: OrderedDict[tuple[str, LayerPlan], _Variant] = OrderedDict()

    def get(self, key: str, plan: LayerPlan) -> StoredMatrix | None:
        variant = self._variants.get((key, plan))
        if variant is None:
            stored = self.store.get(key, plan) if self.store is not None and VariantStore.keeps(plan) else None
            if stored is None:
                self.misses += 1
                return None
            self._keep(key, plan, stored)
            self.hits += 1
            return stored
        self.hits += 1
        self._variants.move_to_end((key, plan))
        stored = variant.matrix
        if stored.quantized is not None:
            weight = quantized_values(stored.quantized, stored.mask, plan.quant_method)
        else:
            weight = variant.half_weight.float()
        return StoredMatrix(stored.layout, weight, stored.mask, stored.quantized)

    def put(self, key: str, plan: LayerPlan, matrix: StoredMatrix) -> None:
        """Keep `matrix` unless it is a plain 16-bit copy (cheaper to make again than to keep); write it to
        the store when it keeps such variants."""
        if matrix.quantized is None and matrix.mask is None:
            return
        if self.store is not None and VariantStore.keeps(plan):
            self.store.put(key, plan, matrix)
        self._keep(key, plan, matrix)

    def _keep(self, key: str, plan: LayerPlan, matrix: StoredMatrix) -> None:
        half = matrix.weight.half() if matrix.quantized is None else None
        kept = StoredMatrix(matrix.layout, torch.empty(0), matrix.mask, matrix.quantized)
        parts = [half, matrix.mask, *(vars(matrix.quantized).values() if matrix.quantized is not None else ())]
        nbytes = sum(part.numel() * part.element_size() for part in parts if isinstance(part, torch.Tensor))
        if nbytes > self.max_bytes:
            return
        previous = self._variants.pop((key, plan), None)
        self.nbytes += nbytes - (previous.nbytes if previous else 0)
        self._variants[(key, plan)] = _Variant(kept, half, nbytes)
        while self.nbytes > self.max_bytes:
            _, dropped = self._variants.popitem(last=False)
            self.nbytes -= dropped.nbytes


class VariantStore:
    """Compressed matrices on disk, one safetensors file per (state-dict key, layer plan), in a folder
    that names the model, the calibration windows, the device type and the compression version
    (`search.trial.variant_store`).

    Files are written whole or not at all (a temporary file renamed), so workers on one machine share a
    folder; `trim` removes the least recently read files beyond `max_bytes`. A file that cannot be read
    is removed and its variant computed again.
    """

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.reads = self.writes = 0

    @staticmethod
    def keeps(plan: LayerPlan) -> bool:
        """Whether variants of `plan` go to disk: those of calibrated or iterative methods; plain rounding
        and magnitude pruning are faster to compute than to read (4-bit 1536 x 576: 13 ms vs 35 ms)."""
        return plan.needs_norms or plan.needs_hessian or (plan.bits < 16 and plan.quant_method not in ROUNDING)

    def path(self, key: str, plan: LayerPlan) -> Path:
        name = hashlib.sha256(_identity(key, plan).encode()).hexdigest()[:32]
        return self.folder / f"{name}.safetensors"

    def get(self, key: str, plan: LayerPlan) -> StoredMatrix | None:
        path = self.path(key, plan)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as archive:
                metadata = archive.metadata()
                if metadata.get("variant") != _identity(key, plan):
                    raise ValueError("it holds another variant")
                parts = {name: archive.get_tensor(name) for name in archive.keys()}
            layout = MatrixLayout(**json.loads(metadata["layout"]))
            keep = parts.pop("keep", None)
            stored = unpack_matrix(parts, layout)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
            log.warning("variant file %s is damaged (%s): computing it again", path, str(err).splitlines()[0])
            path.unlink(missing_ok=True)
            return None
        if keep is not None:  # a densely stored pruned matrix: its mask kept beside the checkpoint's parts
            stored = StoredMatrix(layout, stored.weight, unpack_mask(keep, layout), stored.quantized)
        with contextlib.suppress(OSError):  # trimmed meanwhile, or a read-only cache
            os.utime(path)  # read now: the last to go when the folder is trimmed
        self.reads += 1
        return stored

    def put(self, key: str, plan: LayerPlan, matrix: StoredMatrix) -> None:
        parts = pack_matrix(matrix)
        if matrix.mask is not None and "mask" not in parts:
            parts["keep"] = pack_bits(matrix.mask, 1)
        tmp = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(dir=self.folder, prefix=".variant-", suffix=".tmp")
            os.close(handle)
            save_file(parts, tmp, metadata={"variant": _identity(key, plan),
                                            "layout": json.dumps(vars(matrix.layout), sort_keys=True)})
            os.replace(tmp, self.path(key, plan))
        except OSError as err:  # a full or read-only disk costs the reuse, never the trial
            log.warning("variant not kept in %s (%s)", self.folder, err)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return
        self.writes += 1

    def contents(self) -> dict[str, tuple[int, int]]:
        """{layer plan, as its fields that differ from the defaults: (matrices, bytes)} of the folder."""
        held: dict[str, list[int]] = {}
        defaults = LayerPlan().to_dict()
        for path in self.folder.glob("*.safetensors"):
            try:
                with safe_open(str(path), framework="pt") as archive:
                    plan = LayerPlan.from_dict(json.loads(archive.metadata()["variant"])["plan"])
                size = path.stat().st_size
            except (OSError, ValueError, KeyError, TypeError, SafetensorError):
                continue  # damaged or removed meanwhile: `get` deals with it
            name = " ".join(f"{field}={value}" for field, value in plan.to_dict().items()
                            if value != defaults[field]) or "16-bit"
            count_and_bytes = held.setdefault(name, [0, 0])
            count_and_bytes[0] += 1
            count_and_bytes[1] += size
        return {name: (count, nbytes) for name, (count, nbytes) in held.items()}

    def trim(self) -> int:
        """Remove the least recently read files until the folder holds at most `max_bytes`, and the partial
        files of writers killed mid-write; the bytes it holds after."""
        for partial in self.folder.glob(".variant-*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - partial.stat().st_mtime > PARTIAL_FILE_S:  # not one being written now
                    partial.unlink()
        files = []
        for path in self.folder.glob("*.safetensors"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed by another worker meanwhile
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        held = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if held <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            held -= size
        return held


def _identity(key: str, plan: LayerPlan) -> str:
    return json.dumps({"key": key, "plan": plan.to_dict()}, sort_keys=True)
