"""ggml block types byte for byte: what we pack, gguf-py (llama.cpp's reference layout) reads as the
same values we compute with; our rounding is at least as good as ggml's reference rounding."""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize, quantize

from compsearch.compress import ggml_quantize
from compsearch.compress.ggml_blocks import BLOCK_TYPES, BlockQuantized, pack, unpack
from compsearch.compress.ggml_quantize import quantize_blocks, quantize_blocks_gptq
from compsearch.compress.matrix import MatrixStats

REFERENCE_QUANTIZERS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # the types gguf-py quantizes itself


def _random_fields(t, rows: int, cols: int, generator) -> BlockQuantized:
    codes = torch.randint(0, t.code_levels, (rows, cols), generator=generator).to(torch.uint8)
    blocks, subs = cols // t.block_size, cols // t.sub_block
    d = (torch.randn(rows, blocks, generator=generator) * 0.01).half()
    dmin = (torch.rand(rows, blocks, generator=generator) * 0.01).half() if t.has_min else None
    scales = mins = None
    if t.sub_scale_bits:
        low, high = ((-(1 << (t.sub_scale_bits - 1)), (1 << (t.sub_scale_bits - 1)) - 1) if t.sub_scale_signed
                     else (0, (1 << t.sub_scale_bits) - 1))
        scales = torch.randint(low, high + 1, (rows, subs), generator=generator).to(torch.int16)
        if t.sub_min_bits:
            mins = torch.randint(0, 1 << t.sub_min_bits, (rows, subs), generator=generator).to(torch.int16)
    return BlockQuantized(t, codes, d, dmin, scales, mins)


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_packed_blocks_are_what_llama_cpp_reads(name):
    t = BLOCK_TYPES[name]
    qtype = GGMLQuantizationType[name.upper()]
    assert GGML_QUANT_SIZES[qtype] == (t.block_size, t.type_size)
    q = _random_fields(t, 3, 512, torch.Generator().manual_seed(1))
    data = pack(q)
    assert data.shape == (3, 512 // t.block_size * t.type_size)
    assert np.array_equal(dequantize(data, qtype), q.dequantize().numpy())
    again = unpack(t, data, (3, 512))
    for field in ("codes", "d", "dmin", "sub_scales", "sub_mins"):
        assert (getattr(again, field) is None and getattr(q, field) is None) or torch.equal(getattr(again, field),
                                                                                             getattr(q, field)), field


@pytest.fixture(scope="module")
def weights():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 512, generator=generator) * 0.05
    weight[:, :8] *= 6  # a few outlier inputs, as real layers have
    importance = torch.rand(512, generator=generator) + 0.1
    return weight.half().float(), importance


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_rounding_is_representable_and_uses_the_importance(weights, name):
    weight, importance = weights
    t = BLOCK_TYPES[name]
    plain, weighted = quantize_blocks(weight, t), quantize_blocks(weight, t, importance)
    for q in (plain, weighted):
        assert np.array_equal(dequantize(pack(q), GGMLQuantizationType[name.upper()]), q.dequantize().numpy())
    assert _weighted_error(weight, weighted, importance) <= _weighted_error(weight, plain, importance) * 1.001


def _weighted_error(weight: torch.Tensor, q: BlockQuantized, importance: torch.Tensor) -> float:
    return float(((weight - q.dequantize()).square() * importance).sum())


@pytest.mark.parametrize("name", REFERENCE_QUANTIZERS)
def test_rounding_beats_ggml_reference_rounding(weights, name):
    weight, _ = weights
    qtype = GGMLQuantizationType[name.upper()]
    reference = torch.from_numpy(dequantize(quantize(weight.numpy(), qtype), qtype))
    ours = quantize_blocks(weight, BLOCK_TYPES[name]).dequantize()
    assert (weight - ours).norm() < (weight - reference).norm()


@pytest.mark.parametrize("name", sorted(name for name, t in BLOCK_TYPES.items() if t.sub_scale_bits))
def test_k_types_search_and_refit_their_block_scales(weights, name, monkeypatch):
    """Never worse than the block scale max / top alone; much better where the weights lie on a 32-block
    grid (a model converted from a Q4_1 file), whose sub-scales max / top rounds badly."""
    weight, importance = weights
    on_grid = torch.from_numpy(dequantize(quantize(weight.numpy(), GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1))
    t = BLOCK_TYPES[name]
    searched = [quantize_blocks(w, t, importance) for w in (weight, on_grid)]
    monkeypatch.setattr(ggml_quantize, "SUB_SCALE_STEPS", (0.0,))
    monkeypatch.setattr(ggml_quantize, "REFIT_ROUNDS", 0)
    plain = [quantize_blocks(w, t, importance) for w in (weight, on_grid)]
    assert _weighted_error(weight, searched[0], importance) <= _weighted_error(weight, plain[0], importance)
    assert (_weighted_error(on_grid, searched[1], importance)
            <= _weighted_error(on_grid, plain[1], importance) * (0.8 if name in ("q4_k", "q5_k") else 1.0))


@pytest.fixture(scope="module")
def calibration(weights):
    """Correlated inputs with a few loud features, and the statistics GPTQ reads."""
    generator = torch.Generator().manual_seed(2)
    mixing = torch.randn(512, 512, generator=generator) / 512 ** 0.5 + torch.eye(512)
    inputs = torch.randn(2048, 512, generator=generator) @ mixing
    inputs[:, 100:104] *= 8
    return MatrixStats(hessian=inputs.T @ inputs / len(inputs))


def _output_error(weight: torch.Tensor, q: BlockQuantized, hessian: torch.Tensor) -> float:
    delta = weight - q.dequantize()
    return float((delta @ hessian * delta).sum())


@pytest.mark.parametrize("name", sorted(BLOCK_TYPES))
def test_error_compensating_fill_lowers_the_output_error(weights, calibration, name):
    weight, _ = weights
    t, hessian = BLOCK_TYPES[name], calibration.hessian
    order = calibration.activation_order()
    assert order[0] in range(100, 104) and sorted(order.tolist()) == list(range(512))
    rounded = quantize_blocks(weight, t, torch.diagonal(hessian))
    filled = quantize_blocks_gptq(weight, t, calibration.hinv_factor("w", activation_order=True), order,
                                  torch.diagonal(hessian))
    assert np.array_equal(dequantize(pack(filled), GGMLQuantizationType[name.upper()]), filled.dequantize().numpy())
    assert _output_error(weight, filled, hessian) < 0.8 * _output_error(weight, rounded, hessian)


@pytest.mark.parametrize("name", ["q4_0", "q6_k"])
def test_error_compensating_fill_keeps_pruned_weights_at_zero(weights, calibration, name):
    weight, _ = weights
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    filled = quantize_blocks_gptq(weight, BLOCK_TYPES[name], calibration.hinv_factor("w", activation_order=True),
                                  calibration.activation_order(), keep=keep)
    values = filled.dequantize()
    assert torch.all(values[~keep] == 0) and (values[keep] != 0).float().mean() > 0.75


def test_rows_the_block_does_not_divide_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_blocks(torch.randn(4, 576), BLOCK_TYPES["q4_k"])
