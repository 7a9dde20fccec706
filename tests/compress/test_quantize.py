import pytest
import torch

from compsearch.compress.quantize import quantize_rtn


def _relative_error(weight, bits, group_size=128):
    approx = quantize_rtn(weight, bits, group_size).dequantize()
    return ((approx - weight).norm() / weight.norm()).item()


def test_eight_bit_relative_error_under_one_percent():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    assert _relative_error(weight, 8) < 0.01


def test_error_shrinks_with_every_added_bit():
    weight = torch.randn(128, 384, generator=torch.Generator().manual_seed(1))
    errors = [_relative_error(weight, bits) for bits in (2, 3, 4, 5, 6, 8)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    # each bit roughly halves the error once the grid is fine enough
    assert errors[3] / errors[2] < 0.6


def test_smaller_groups_quantize_more_accurately():
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, 512)
    assert _relative_error(weight, 3, 32) < _relative_error(weight, 3, 128)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_in_range_and_zero_is_exact(bits):
    weight = torch.randn(16, 100)  # 100 is not a multiple of the group size: the last group is partial
    weight[:, ::7] = 0.0
    quantized = quantize_rtn(weight, bits, 32)
    assert quantized.codes.max().item() < 2 ** bits
    assert quantized.scales.dtype == torch.float16 and quantized.scales.shape == (16, 4)
    assert torch.all(quantized.dequantize()[:, ::7] == 0.0)


def test_one_sided_group_keeps_small_weights_small():
    # all-positive weights with one outlier: the grid includes 0, so small weights stay near their value
    weight = torch.full((1, 128), 0.01)
    weight[0, 0] = 1.0
    approx = quantize_rtn(weight, 3, 128).dequantize()
    assert (approx[0, 1:] - 0.01).abs().max() < 1.0 / 7
