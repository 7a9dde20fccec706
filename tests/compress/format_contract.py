"""The contract every registered quantizer and its storage format keep, written once and run over
every implementation (as Optuna runs one suite over every storage).

`test_formats.py` runs it over every registered quantizer; a plug-in runs it over its own in one
file: register the format and quantizer, subclass `QuantizerContract`, and give the `quant_method`
fixture (see `test_plugin_format.py`).
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

from compsearch.compress import apply_plan_, layer_nbytes, load_compressed, save_compressed
from compsearch.compress.distill import DistillSettings, distill_
from compsearch.compress.matrix import MatrixLayout, MatrixStats, compress_matrix, quantized_values
from compsearch.compress.prune import kept_count
from compsearch.compress.storage import uses_mask_format
from compsearch.compress.techniques import QUANTIZERS
from compsearch.evaluators.kernels import layer_kernel, timing_model
from compsearch.spaces.plan import LayerPlan, Plan

ROWS, COLS, GROUP = 48, 256, 64


def _problem(seed: int = 0) -> tuple[torch.Tensor, MatrixStats]:
    """A weight matrix with a few outlier inputs, and statistics of correlated calibration inputs."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(ROWS, COLS, generator=generator) * 0.05
    inputs = torch.randn(512, COLS, generator=generator) @ (torch.eye(COLS) + 0.1 * torch.randn(COLS, COLS, generator=generator))
    inputs[:, :4] *= 8
    return weight.half().float(), MatrixStats(inputs.norm(dim=0), inputs.T @ inputs / len(inputs))


def _compress(quant_method: str, bits: int, sparsity: float = 0.0, seed: int = 0):
    weight, stats = _problem(seed)
    plan = LayerPlan(bits=bits, group_size=GROUP, quant_method=quant_method, sparsity=sparsity,
                     prune_method="wanda" if sparsity else "magnitude")
    layout = MatrixLayout("w", ROWS, COLS, kept_count(ROWS, COLS, sparsity, "unstructured"), bits, GROUP, quant_method)
    return weight, compress_matrix(weight, layout, plan, stats)


def _output_error(reference: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative error of the layer's outputs on the calibration inputs: ||(W - Q) X^T|| / ||W X^T||."""
    delta = reference - approx
    return float(((delta @ hessian * delta).sum() / (reference @ hessian * reference).sum()).sqrt())


class QuantizerContract:
    """Every test takes the `quant_method` fixture: the registered quantizer under test."""

    @pytest.fixture
    def quantizer(self, quant_method):
        return QUANTIZERS.get(quant_method)

    @pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.75])
    def test_packed_bytes_are_the_accounted_bytes(self, quantizer, sparsity):
        for bits in quantizer.bits:
            _, matrix = _compress(quantizer.name, bits, sparsity)
            keep = matrix.mask if uses_mask_format(ROWS, COLS, matrix.layout.kept, bits, GROUP, quantizer.name) else None
            parts = quantizer.storage.pack(matrix.quantized, keep)
            packed = sum(t.numel() * t.element_size() for t in parts.values()) + (ROWS * COLS + 7) // 8 * (keep is not None)
            assert packed == matrix.layout.nbytes, (bits, sparsity)

    @pytest.mark.parametrize("sparsity", [0.0, 0.75])
    def test_unpack_inverts_pack_exactly(self, quantizer, sparsity):
        _, matrix = _compress(quantizer.name, min(quantizer.bits), sparsity)
        keep = matrix.mask if uses_mask_format(ROWS, COLS, matrix.layout.kept, matrix.layout.bits, GROUP,
                                               quantizer.name) else None
        parts = quantizer.storage.pack(matrix.quantized, keep)
        again = quantizer.storage.unpack(parts, (ROWS, COLS), matrix.layout.bits, GROUP, keep)
        assert torch.equal(quantized_values(again, matrix.mask, quantizer.name), matrix.weight)

    def test_error_shrinks_with_bits_and_stays_bounded(self, quantizer):
        hessian = _problem()[1].hessian
        errors = []
        for bits in sorted(quantizer.bits):
            weight, matrix = _compress(quantizer.name, bits)
            errors.append(_output_error(weight, matrix.weight, hessian))
        assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
        # each extra bit about halves the error (round-to-nearest on a uniform grid gives about 1.5 x 2^-bits)
        assert all(error < 4 * 2.0 ** -bits for bits, error in zip(sorted(quantizer.bits), errors)), errors

    def test_pruned_weights_compute_as_exact_zeros(self, quantizer):
        _, matrix = _compress(quantizer.name, min(quantizer.bits), sparsity=0.5)
        assert torch.all(matrix.weight[~matrix.mask] == 0)

    def test_checkpoint_round_trip_is_bit_exact_and_bytes_match(self, quantizer, calibrated_wide, tmp_path):
        model, tokenizer, _, layers, (norms, hessians) = calibrated_wide
        plan = _block_plan(layers, quantizer)
        compressed = copy.deepcopy(model)
        stored = apply_plan_(compressed, plan, norms, keep_stored=True, hessians=hessians).stored
        path = save_compressed(compressed, plan, stored, tmp_path, tokenizer)
        with safe_open(str(path), framework="pt") as archive:
            sizes = {name: archive.get_tensor(name).numel() * archive.get_tensor(name).element_size()
                     for name in archive.keys()}
        for layer in layers:
            written = sum(size for name, size in sizes.items() if name.startswith(layer.name + "."))
            assert written == layer_nbytes(layer, plan[layer.name]), layer.name
        reloaded, _ = load_compressed(tmp_path)
        for name, param in compressed.named_parameters():
            assert torch.equal(param, reloaded.get_parameter(name)), name

    def test_distillation_trains_parameters_not_codes(self, quantizer, calibrated_wide, tmp_path):
        model, tokenizer, windows, layers, (norms, hessians) = calibrated_wide
        plan = _block_plan(layers, quantizer)
        student = copy.deepcopy(model)
        stored = apply_plan_(student, plan, norms, keep_stored=True, hessians=hessians).stored
        before = {key: copy.deepcopy(matrix) for key, matrix in stored.items()}
        distill_(student, model, stored, windows.calib_ids, DistillSettings(steps=3, lr=1e-3, scale_lr=1e-2))
        trainable = quantizer.storage.trainable
        for key, matrix in stored.items():
            assert torch.equal(matrix.quantized.codes, before[key].quantized.codes), key
            assert not torch.equal(getattr(matrix.quantized, trainable), getattr(before[key].quantized, trainable)), key
            assert torch.equal(matrix.weight, student.get_parameter(key)), key
        save_compressed(student, plan, stored, tmp_path, tokenizer)
        reloaded, _ = load_compressed(tmp_path)
        for key in stored:
            assert torch.equal(reloaded.get_parameter(key), student.get_parameter(key)), key

    def test_timed_kernel_is_the_formats(self, quantizer, calibrated_wide):
        model, _, _, layers, (norms, hessians) = calibrated_wide
        plan = _block_plan(layers, quantizer, bits=max(quantizer.bits), prune_last=False)
        compressed = copy.deepcopy(model)
        apply_plan_(compressed, plan, norms, hessians=hessians)
        expected = quantizer.storage.kernel(max(quantizer.bits), GROUP, "cpu")
        assert {layer_kernel(lp, "cpu") for lp in plan.layers.values()} == {expected}
        timed, summary = timing_model(compressed, plan)
        assert summary["latency_kernel"] == ("simulated" if expected == "simulated" else "real")
        converted = {name for name in plan.layers if type(timed.get_submodule(name)) is not torch.nn.Linear}
        assert converted == (set() if expected == "simulated" else set(plan.layers))


def _block_plan(layers, quantizer, bits: int | None = None, prune_last: bool = True) -> Plan:
    """The quantizer on every Linear of the first block, the last one also pruned (unless not asked)."""
    names = [layer.name for layer in layers if ".layers.0." in layer.name]
    bits = bits or min(quantizer.bits)
    return Plan({name: LayerPlan(bits=bits, group_size=32, quant_method=quantizer.name,
                                 sparsity=0.5 if prune_last and name == names[-1] else 0.0, prune_method="wanda")
                 for name in names})
