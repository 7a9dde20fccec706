"""A latency cost model: per-layer time by choice, measured once per device and cached on disk.

A plan's latency is predicted as the sum, over every Linear of the model, of the time of the matrices
it becomes (its shape after structured pruning and low-rank factorization, on the kernel its choice
runs on: `evaluators.kernels.layer_kernel`), plus a fixed overhead for everything that is not a Linear
(attention, norms, embeddings, Python). Linear times are micro-benchmarked one shape and kernel at a
time; the overhead is calibrated once as the measured base model minus its predicted Linear time
(so removed attention heads are credited for their smaller projections, not for the attention scores
they no longer compute: the prediction errs high there, and the measured latency is the one to trust).
Three scenarios are predicted: a batch-1 decode step, a decode step at the configured batch, and a
batch-1 prefill of the prompt (`latency_ms`, from which `predicted_prefill_tok_s`).

The table is a JSON file keyed by device, thread count, torch version, the model and the latency
settings; entries are added as new shapes or kernels are met, so it is measured once per device.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from compsearch.evaluators.kernels import layer_kernel
from compsearch.evaluators.latency import LatencySettings, device_name
from compsearch.paths import default_cache_dir
from compsearch.spaces.layers import LayerInfo, linear_layers
from compsearch.spaces.plan import LayerPlan, Plan, rank_for, structured_shape

log = logging.getLogger(__name__)
BENCH_REPEATS, BENCH_CALLS, BENCH_WARMUP = 15, 5, 3
COLD_BYTES, MAX_COPIES = 64 * 2**20, 64  # weights cycled per benchmark: more than a CPU's last-level cache


def layer_matrices(layer: LayerInfo, plan: LayerPlan, device_type: str) -> list[tuple[int, int, str]]:
    """(rows, cols, kernel) of the matrices a Linear runs as under its plan ('dense' for simulated choices)."""
    rows, cols = structured_shape(layer, plan)
    kernel = layer_kernel(plan, device_type)
    kernel = kernel if kernel in ("int8", "int4", "sparse24") else "dense"
    if plan.rank_fraction < 1.0:
        rank = rank_for(rows, cols, plan.rank_fraction)
        return [(rank, cols, kernel), (rows, rank, kernel)]
    return [(rows, cols, kernel)]


def shapes_digest(layers: list[LayerInfo]) -> str:
    """A short name for the layers' names and shapes (part of a cost table's key)."""
    return hashlib.sha256(repr([(layer.name, layer.out_features, layer.in_features) for layer in layers]).encode()
                          ).hexdigest()[:16]


class CostTable:
    """Measured costs in a JSON file under the cache folder, named by a digest of `key` (device, threads,
    versions, model, settings): a table measured under other conditions is never read. Written
    atomically, since several workers may share the cache."""

    def __init__(self, key: dict, cache_dir: Path | None = None):
        self.key = key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(cache_dir or default_cache_dir()) / "latency" / f"{digest}.json"
        self.entries: dict = self._load()

    def _load(self) -> dict:
        """The cached table; a damaged file (truncated, garbled, not this shape) is reported once and its
        costs are measured again."""
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and isinstance(data.get("table"), dict):
                return data["table"] if data.get("key") == self.key else {}
            problem = "not a table of costs"
        except (OSError, ValueError) as err:
            problem = str(err).splitlines()[0]
        log.warning("latency cost table %s is damaged (%s): measuring its costs again", self.path, problem)
        return {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".costmodel.", dir=self.path.parent)
        with os.fdopen(handle, "w") as out:
            json.dump({"key": self.key, "table": self.entries}, out, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


class LatencyCostModel:
    """Predicts `predicted_decode_ms`, `predicted_decode_batch_ms`, `predicted_latency_ms` and
    `predicted_prefill_tok_s` of a plan without running it; see the module docstring."""

    def __init__(self, model: nn.Module, model_ref: str, settings: LatencySettings, cache_dir: Path | None = None):
        self.model, self.settings = model, settings
        self.device = next(model.parameters()).device
        self.linears = linear_layers(model, include_lm_head=True)
        self._store = CostTable({"device": device_name(self.device), "device_type": self.device.type,
                                 "threads": torch.get_num_threads(), "torch": torch.__version__,
                                 "model": str(model_ref), "shapes": shapes_digest(self.linears), **settings.to_dict()},
                                cache_dir)
        self.path, self.table = self._store.path, self._store.entries

    @property
    def scenarios(self) -> dict[str, int]:
        """Scenario -> tokens one Linear call processes in it."""
        s = self.settings
        return {"decode_ms": 1, "decode_batch_ms": s.decode_batch, "latency_ms": s.prompt_tokens}

    def save(self) -> None:
        self._store.save()

    def linear_ms(self, rows: int, cols: int, kernel: str, tokens: int) -> float:
        """Milliseconds of one call of a `rows x cols` Linear on `kernel` over `tokens` tokens (cached)."""
        entry = f"{rows}x{cols}|{kernel}|{tokens}"
        if entry not in self.table:
            self.table[entry] = _bench_linear(rows, cols, kernel, tokens, self.device)
        return self.table[entry]

    def linear_sum_ms(self, plan: Plan, tokens: int) -> float:
        """Predicted time of every Linear of the model under `plan` for one call over `tokens` tokens."""
        total = 0.0
        for layer in self.linears:
            for rows, cols, kernel in layer_matrices(layer, plan[layer.name], self.device.type):
                total += self.linear_ms(rows, cols, kernel, tokens)
        return total

    def calibrate(self, measured_base: dict[str, float]) -> None:
        """Set each scenario's overhead from the base model's measured figures (`decode_ms`, ...)."""
        for scenario, tokens in self.scenarios.items():
            if scenario in measured_base:
                self.table[f"overhead|{scenario}"] = measured_base[scenario] - self.linear_sum_ms(Plan(), tokens)
        self.save()

    @property
    def calibrated(self) -> bool:
        return all(f"overhead|{scenario}" in self.table for scenario in self.scenarios)

    def predict(self, plan: Plan) -> dict[str, float]:
        """Predicted latency figures of `plan` (needs `calibrate` once; the table is saved if it grew)."""
        if not self.calibrated:
            raise RuntimeError("the cost model has no overhead yet: call calibrate() with the base model's timings")
        size = len(self.table)
        predicted = {f"predicted_{scenario}": self.table[f"overhead|{scenario}"] + self.linear_sum_ms(plan, tokens)
                     for scenario, tokens in self.scenarios.items()}
        predicted["predicted_prefill_tok_s"] = self.settings.prompt_tokens * 1000.0 / predicted["predicted_latency_ms"]
        if len(self.table) != size:
            self.save()
        return predicted


def _bench_module(rows: int, cols: int, kernel: str, device: torch.device) -> nn.Module:
    """A Linear of the shape on the kernel, with random weights (time does not depend on values)."""
    linear = nn.Linear(cols, rows, bias=False).to(device).eval()
    if kernel == "dense":
        return linear
    from compsearch.evaluators.kernels import _to_cpu_kernels_, _to_cuda_kernels_

    wrapper = nn.Sequential(linear)
    if device.type == "cuda":  # pragma: no cover - needs a GPU
        plan = Plan({"0": LayerPlan(bits=4 if kernel == "int4" else 8 if kernel == "int8" else 16,
                                    sparsity=0.5 if kernel == "sparse24" else 0.0,
                                    pattern="2:4" if kernel == "sparse24" else "unstructured")})
        return _to_cuda_kernels_(wrapper, plan, {"0": kernel})[0]
    return _to_cpu_kernels_(wrapper, {"0": kernel})


@torch.inference_mode()
def _bench_linear(rows: int, cols: int, kernel: str, tokens: int, device: torch.device) -> float:
    """Median milliseconds per call, from `BENCH_REPEATS` timings of `BENCH_CALLS` calls each.

    Calls cycle through enough copies of the layer to overflow the caches: in a model, a layer's
    weights come from main memory at every token, and a cache-hot micro-benchmark would hide that.
    """
    weight_bytes = rows * cols * (2 if device.type == "cuda" else 4)
    copies = max(1, min(MAX_COPIES, -(-COLD_BYTES // weight_bytes)))
    modules = [_bench_module(rows, cols, kernel, device) for _ in range(copies)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(tokens, cols, device=device, dtype=dtype)
    timings = []
    calls = max(BENCH_CALLS, copies)
    for step in range(BENCH_WARMUP + BENCH_REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for call in range(calls):
            modules[call % copies](x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= BENCH_WARMUP:
            timings.append((time.perf_counter() - start) * 1000.0 / calls)
    return statistics.median(timings)
