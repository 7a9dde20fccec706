"""Calibration statistics: a pass stops after the layers it reads, and shares of the windows measured apart
merge into the statistics of all of them."""
import torch

from compsearch.compress import InputStatistics, input_norms, input_statistics


def test_a_statistics_pass_does_not_run_the_output_head(calibrated_tiny):
    model, _, windows, layers, (norms, hessians) = calibrated_tiny
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    try:
        names = [layer.name for layer in layers]
        plain = input_norms(model, windows.calib_ids, names)
        both = input_statistics(model, windows.calib_ids, names)
        head = input_norms(model, windows.calib_ids, ["lm_head"], batch_size=8)  # its reader is the head itself
    finally:
        handle.remove()
    assert calls == [1]  # only the pass that reads the head's inputs ran it (one batch of 8 windows)
    for name in names:  # the statistics are those of the full passes of the fixture
        assert torch.allclose(plain[name], norms[name], rtol=1e-5)
        assert torch.allclose(both[0][name], norms[name], rtol=1e-4)
        assert torch.allclose(both[1][name], hessians[name], rtol=1e-4, atol=1e-7)
    assert head["lm_head"].shape == (model.config.hidden_size,)


def test_shares_of_the_windows_merge_into_the_statistics_of_all_of_them(calibrated_tiny):
    model, _, windows, layers, (norms, hessians) = calibrated_tiny
    names = [layer.name for layer in layers]
    ids = windows.calib_ids
    shares = [InputStatistics.measure(model, ids[start:end], names, 4, with_hessians=True)
              for start, end in ((0, 3), (3, 5), (5, len(ids)))]
    merged = shares[0].merged_with(shares[1]).merged_with(shares[2])
    assert merged.tokens == ids.numel()
    for name in names:
        assert torch.allclose(merged.norms[name], norms[name], rtol=1e-4)
        assert torch.allclose(merged.hessians[name], hessians[name], rtol=1e-4, atol=1e-7)
    q, k, v = (f"model.layers.0.self_attn.{kind}_proj" for kind in "qkv")
    assert merged.hessians[q] is merged.hessians[k] is merged.hessians[v]  # one input, one Hessian
    moved = merged.to("cpu")
    assert moved.hessians[q] is moved.hessians[v]
    norms_only = InputStatistics.measure(model, ids[:3], names, 4, with_hessians=False).merged_with(
        InputStatistics.measure(model, ids[3:], names, 4, with_hessians=False))
    assert norms_only.hessians is None
    assert all(torch.allclose(norms_only.norms[name], norms[name], rtol=1e-4) for name in names)
