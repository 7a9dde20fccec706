"""The compression techniques a `LayerPlan` names, each registered once with what it needs and does.

- `QUANTIZERS`: `quant_method` -> how a matrix is quantized and the storage format of the result;
- `PRUNERS`: `prune_method` -> which weights go (and how the kept ones are updated);
- `FACTORIZATIONS`: `lowrank_method` -> the SVD a low-rank layer is cut from.

`needs` names the calibration statistics an entry uses: `norms` (||X_j||_2 per input feature) and
`hessian` (X^T X / tokens). A pruner whose statistics are missing (the `up` factor of a low-rank
layer has no input norms) falls back to its `fallback`. Adding a technique is one entry here (or in a
plug-in module) and its `register` call; spaces, plans, storage and kernels ask these registries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from compsearch.compress.formats import FORMATS, Quantized, StorageFormat
from compsearch.compress.gptq import quantize_gptq
from compsearch.compress.hqq import quantize_hqq
from compsearch.compress.kmeans import palettize
from compsearch.compress.lowrank import whitened_svd
from compsearch.compress.prune import keep_mask
from compsearch.compress.quantize import quantize_rtn
from compsearch.compress.sparsegpt import prune_sparsegpt
from compsearch.registry import Registry

if TYPE_CHECKING:
    from compsearch.compress.matrix import MatrixStats

NORMS, HESSIAN = "norms", "hessian"
SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Quantizer:
    """`quantize(values, bits, group_size, stats, keep, key)` -> codes and parameters in `format`;
    `bits` lists the widths it stores (16 means no quantization and needs no quantizer); a layer whose
    rows its format cannot hold (`StorageFormat.row_multiple`) gets `fallback` instead."""

    name: str
    format: str
    quantize: Callable[[torch.Tensor, int, int, "MatrixStats", "torch.Tensor | None", str], Quantized]
    needs: frozenset[str] = frozenset()
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    fallback: str | None = None

    @property
    def storage(self) -> StorageFormat:
        return FORMATS.get(self.format)


def quantizer_for(quant_method: str, row_length: int) -> Quantizer | None:
    """The quantizer matrices with rows of `row_length` values get for `quant_method`: it, or its
    fallbacks; None (kept in 16 bits) when none of them holds such rows, as llama-quantize stores a
    tensor its fallback cannot hold in F16."""
    quantizer: Quantizer | None = QUANTIZERS.get(quant_method)
    while quantizer is not None and row_length % quantizer.storage.row_multiple:
        quantizer = QUANTIZERS.get(quantizer.fallback) if quantizer.fallback else None
    return quantizer


@dataclass(frozen=True)
class Pruner:
    """`prune(values, sparsity, pattern, stats, key)` -> (keep mask, values with zeros where pruned)."""

    name: str
    prune: Callable[[torch.Tensor, float, str, "MatrixStats", str], tuple[torch.Tensor, torch.Tensor]]
    needs: frozenset[str] = frozenset()
    fallback: str | None = None  # used when the statistics in `needs` are missing


@dataclass(frozen=True)
class Factorization:
    """`svd(weight, stats, key)` -> (u, s, vh) with weight = u diag(s) vh, truncated by the rank."""

    name: str
    svd: Callable[[torch.Tensor, "MatrixStats", str], SVD]
    needs: frozenset[str] = frozenset()


QUANTIZERS: Registry[Quantizer] = Registry("quant_method")
PRUNERS: Registry[Pruner] = Registry("prune_method")
FACTORIZATIONS: Registry[Factorization] = Registry("lowrank_method")


def quantizer_format(quant_method: str) -> StorageFormat:
    """The storage format of what `quant_method` produces."""
    return QUANTIZERS.get(quant_method).storage


def pruner_for(prune_method: str, stats: "MatrixStats") -> Pruner:
    """The pruner that runs: `prune_method`, or its fallbacks while statistics it needs are missing."""
    pruner = PRUNERS.get(prune_method)
    while not stats.has(pruner.needs):
        if pruner.fallback is None:
            raise ValueError(f"prune_method={pruner.name!r} needs calibration {sorted(pruner.needs)}; none were given")
        pruner = PRUNERS.get(pruner.fallback)
    return pruner


def _kmeans(values, bits, group_size, stats, keep, key):
    importance = stats.norms.square().unsqueeze(0) if stats.norms is not None else torch.ones(1, values.shape[1])
    if keep is not None:
        importance = importance * keep  # pruned weights are not stored: they must not pull centroids
    return palettize(values, bits, importance)


def _rtn(values, bits, group_size, stats, keep, key):
    return quantize_rtn(values, bits, group_size)


def _gptq(values, bits, group_size, stats, keep, key):
    return quantize_gptq(values, bits, group_size, stats.hinv_factor(key, activation_order=True),
                         stats.activation_order(), torch.diagonal(stats.hessian), keep)


def _hqq(values, bits, group_size, stats, keep, key):
    return quantize_hqq(values, bits, group_size)


def _rtn_symmetric(values, bits, group_size, stats, keep, key):
    return quantize_rtn(values, bits, group_size, symmetric=True)


def _gptq_symmetric(values, bits, group_size, stats, keep, key):
    return quantize_gptq(values, bits, group_size, stats.hinv_factor(key, activation_order=True),
                         stats.activation_order(), torch.diagonal(stats.hessian), keep, symmetric=True)


QUANTIZERS.register(Quantizer("rtn", "affine", _rtn))
QUANTIZERS.register(Quantizer("gptq", "affine", _gptq, needs=frozenset({HESSIAN})))
# Symmetric grids (no zero point): compressed-tensors' format, which vLLM serves (`vllm` space).
QUANTIZERS.register(Quantizer("rtn-sym", "symmetric", _rtn_symmetric))
QUANTIZERS.register(Quantizer("gptq-sym", "symmetric", _gptq_symmetric, needs=frozenset({HESSIAN})))
QUANTIZERS.register(Quantizer("hqq", "affine", _hqq))
QUANTIZERS.register(Quantizer("kmeans", "palette", _kmeans, needs=frozenset({NORMS})))


def _scored(method: str):
    def prune(values, sparsity, pattern, stats, key):
        mask = keep_mask(values, sparsity, pattern, method, stats.norms)
        return mask, values * mask
    return prune


def _sparsegpt(values, sparsity, pattern, stats, key):
    updated, mask = prune_sparsegpt(values, sparsity, pattern, stats.hinv_factor(key), stats.hessian)
    return mask, updated


PRUNERS.register(Pruner("magnitude", _scored("magnitude")))
PRUNERS.register(Pruner("wanda", _scored("wanda"), needs=frozenset({NORMS}), fallback="magnitude"))
# Without a Hessian, Wanda is SparseGPT's diagonal approximation.
PRUNERS.register(Pruner("sparsegpt", _sparsegpt, needs=frozenset({HESSIAN}), fallback="wanda"))

def _plain_svd(weight, stats, key):
    return tuple(torch.linalg.svd(weight.float(), full_matrices=False))


def _whitened_svd(weight, stats, key):
    return whitened_svd(weight.float(), stats.hessian)


FACTORIZATIONS.register(Factorization("svd", _plain_svd))
FACTORIZATIONS.register(Factorization("whiten", _whitened_svd, needs=frozenset({HESSIAN})))

from compsearch.compress import gguf_formats  # noqa: E402,F401  (registers the GGUF tensor types)

PLUGIN_GROUP = "compsearch.plugins"


def load_plugins() -> None:
    """Import every installed plug-in (entry points of group `compsearch.plugins`): each registers its
    formats and techniques when imported, in every process that imports this module (Ray workers too)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()
        except Exception as err:
            raise ImportError(f"compsearch plug-in {entry.name!r} ({entry.value}) failed to load: "
                              f"{type(err).__name__}: {err}; fix or uninstall it") from err


load_plugins()
