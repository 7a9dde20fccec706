import torch

from compsearch.compress.lowrank import LowRankLinear, factorize


def test_svd_error_equals_discarded_singular_values():
    weight = torch.randn(96, 160, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    singular = torch.linalg.svdvals(weight.double())
    for rank in (8, 32, 64, 96):
        down, up = factorize(weight, rank)
        error = (up.double() @ down.double() - weight.double()).norm()
        expected = singular[rank:].square().sum().sqrt()
        assert abs(error - expected) < 1e-5 * weight.norm(), (rank, error, expected)  # float32 round-off


def test_low_rank_linear_computes_up_of_down():
    layer = LowRankLinear(12, 10, 4, bias=True)
    x = torch.randn(3, 12)
    expected = x @ layer.down.weight.T @ layer.up.weight.T + layer.up.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
