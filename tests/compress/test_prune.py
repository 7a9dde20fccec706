import pytest
import torch

from compsearch.compress.prune import keep_mask, kept_count


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_ratio_is_exact_per_row(sparsity, method):
    weight = torch.randn(32, 200)
    norms = torch.rand(200) + 0.1
    mask = keep_mask(weight, sparsity, "unstructured", method, norms)
    assert torch.all(mask.sum(dim=1) == 200 - round(sparsity * 200))
    assert mask.sum().item() == kept_count(32, 200, sparsity, "unstructured")


@pytest.mark.parametrize("pattern, n, m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_nm_pattern_keeps_n_of_every_m(pattern, n, m):
    weight = torch.randn(16, 64)
    mask = keep_mask(weight, 1 - n / m, pattern, "magnitude")
    assert torch.all(mask.reshape(16, -1, m).sum(dim=2) == n)
    assert mask.sum().item() == kept_count(16, 64, 1 - n / m, pattern)


def test_magnitude_keeps_the_largest_weights():
    weight = torch.tensor([[0.1, -3.0, 0.2, 2.0]])
    assert keep_mask(weight, 0.5).tolist() == [[False, True, False, True]]


def test_wanda_weighs_by_input_norms():
    weight = torch.tensor([[1.0, 1.0, 0.5, 0.5]])
    norms = torch.tensor([0.1, 0.1, 10.0, 10.0])
    assert keep_mask(weight, 0.5, method="wanda", input_norms=norms).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError, match="calibration input norms"):
        keep_mask(weight, 0.5, method="wanda")
