"""A latency cost model for GGUF plans in llama.cpp: per-type costs fitted to files llama.cpp times.

llama.cpp runs each matrix of a GGUF file with its type's own dot-product kernel, and a matrix of a
given type costs about the same per weight whatever its shape. So a plan's time is predicted as

    t = overhead + sum over types T of cost_T x (weights llama.cpp multiplies in type T)

(the token embedding counts when it is also the output matrix). The costs are fitted by least
squares, per scenario (`decode_ms` per generated token, `latency_ms` of the prompt), to timing files:
the model in F16, and in each type the plans use (with llama.cpp's fallbacks on rows the type cannot
hold). A timing file holds all-zero blocks -- the kernels' speed does not depend on the values -- so
writing one costs no quantization. Files are timed the first time a plan uses a new type and the
results cached on disk per CPU, thread count, llama.cpp version, model and latency settings.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compsearch.compress.apply import layer_layout
from compsearch.compress.ggml_blocks import BLOCK_TYPES, BlockQuantized
from compsearch.compress.gguf_formats import gguf_type
from compsearch.compress.matrix import StoredMatrix
from compsearch.compress.techniques import quantizer_for
from compsearch.evaluators.costmodel import CostTable, shapes_digest
from compsearch.evaluators.latency import LatencySettings, device_name
from compsearch.spaces.knobs import FLOAT_METHOD
from compsearch.spaces.layers import embedding_layers, layer_info, linear_layers
from compsearch.spaces.plan import LayerPlan, Plan

SCENARIOS = ("decode_ms", "latency_ms")


class LlamaCppCostModel:
    """Predicts `predicted_decode_ms`, `predicted_latency_ms` and `predicted_prefill_tok_s` of a GGUF
    plan in llama.cpp; see the module docstring."""

    def __init__(self, model: nn.Module, model_ref: str, settings: LatencySettings, gguf, threads: int,
                 cache_dir: Path | None = None):
        import llama_cpp

        self.model, self.settings, self.gguf, self.threads = model, settings, gguf, threads
        self.embeddings = embedding_layers(model)
        self.planned = linear_layers(model) + self.embeddings
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = output is not None and bool(self.embeddings) and \
            output.weight is model.get_submodule(self.embeddings[0].name).weight
        # (layer multiplied, the planned layer whose tensor it reads)
        self.multiplied = [(layer, layer) for layer in linear_layers(model)]
        if output is not None:
            head = layer_info(model, next(name for name, module in model.named_modules() if module is output))
            self.multiplied.append((head, self.embeddings[0] if tied else head))
        self._store = CostTable({"runtime": f"llama.cpp {llama_cpp.__version__}", "cpu": device_name(torch.device("cpu")),
                                 "threads": threads, "model": str(model_ref), "shapes": shapes_digest(self.planned),
                                 **settings.to_dict()}, cache_dir)
        self.files: dict[str, dict] = self._store.entries.setdefault("files", {})

    def weights_by_type(self, plan: Plan) -> dict[str, int]:
        """Weights llama.cpp multiplies per GGUF type under `plan`."""
        counts: dict[str, int] = {}
        for layer, stored_as in self.multiplied:
            kind = gguf_type(stored_as, plan[stored_as.name])
            counts[kind] = counts.get(kind, 0) + layer.out_features * layer.in_features
        return counts

    def predict(self, plan: Plan) -> dict[str, float]:
        """Predicted figures of `plan`; times the files of types no plan used before."""
        counts = self.weights_by_type(plan)
        for kind in [FLOAT_METHOD, *counts]:
            if kind not in self.files:
                self._time_file(kind)
        kinds = sorted({kind for file in self.files.values() for kind in file["weights"]})
        design = np.array([[1.0, *(file["weights"].get(kind, 0) / 1e6 for kind in kinds)]
                           for file in self.files.values()])
        features = np.array([1.0, *(counts.get(kind, 0) / 1e6 for kind in kinds)])
        predicted = {}
        for scenario in SCENARIOS:
            times = np.array([file[scenario] for file in self.files.values()])
            costs = np.linalg.lstsq(design, times, rcond=None)[0]  # least norm: all files weigh the same in total
            predicted[f"predicted_{scenario}"] = float(features @ costs)
        predicted["predicted_prefill_tok_s"] = self.settings.prompt_tokens * 1000.0 / predicted["predicted_latency_ms"]
        return predicted

    def _time_file(self, kind: str) -> None:
        """Time the model with every planned tensor in `kind` (zero blocks; llama.cpp's fallbacks)."""
        from compsearch.compress.gguf_export import export_gguf
        from compsearch.evaluators.llamacpp import llamacpp_latency

        plan, stored = Plan(), {}
        if kind != FLOAT_METHOD:
            plans = {}
            for layer in self.planned:
                quantizer = quantizer_for(kind, layer.in_features)
                if quantizer is None:  # kept in F16, as llama-quantize keeps it
                    continue
                plans[layer.name] = LayerPlan(bits=quantizer.bits[0], quant_method=quantizer.name)
                layout = layer_layout(layer, plans[layer.name])[0]
                stored[layout.key] = StoredMatrix(layout, torch.empty(0), None,
                                                  _zero_blocks(quantizer.name, layout.rows, layout.cols))
            plan = Plan(plans)
        with tempfile.TemporaryDirectory(prefix="compsearch-timing-") as folder:
            path = export_gguf(self.model, plan, stored, Path(folder) / f"{kind}.gguf", self.gguf.template,
                               self.gguf.tokenizer_dir)
            measured = llamacpp_latency(path, self.settings, self.threads)
        self.files[kind] = {"weights": self.weights_by_type(plan), **{s: measured[s] for s in SCENARIOS}}
        self._store.save()


def _zero_blocks(type_name: str, rows: int, cols: int) -> BlockQuantized:
    t = BLOCK_TYPES[type_name]

    def zeros(per_row: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(rows, per_row, dtype=dtype)
    blocks, subs = cols // t.block_size, cols // t.sub_block
    return BlockQuantized(t, zeros(cols, torch.uint8), zeros(blocks, torch.float16),
                          zeros(blocks, torch.float16) if t.has_min else None,
                          zeros(subs, torch.int16) if t.sub_scale_bits else None,
                          zeros(subs, torch.int16) if t.sub_min_bits else None)
