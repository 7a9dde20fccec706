"""Sequential calibration: each block compressed on the inputs the compressed blocks before it give."""
import copy

import pytest
import torch

from compsearch.compress import apply_plan_, input_hessians
from compsearch.compress.blocks import block_output, decoder_blocks, hidden
from compsearch.compress.calibration import InputHessians
from compsearch.compress.sequential import apply_plan_sequentially_
from compsearch.spaces.plan import LayerPlan, Plan

GPTQ = LayerPlan(bits=3, group_size=32, quant_method="gptq")


def _block_names(layers, block: int) -> list[str]:
    return [layer.name for layer in layers if layer.name.startswith(f"model.layers.{block}.")]


def test_one_block_runs_on_the_outputs_given_for_the_one_before(calibrated_tiny):
    model, _, windows, _, _ = calibrated_tiny
    blocks, batch = decoder_blocks(model), windows.calib_ids[:2]
    outputs = []
    handles = [block.register_forward_hook(lambda _m, _a, out: outputs.append(hidden(out))) for block in blocks]
    with torch.no_grad():
        model.get_decoder()(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        first = block_output(model, blocks, batch, 0)
        second = block_output(model, blocks, batch, 1, replayed=1, replay=first)
        through = block_output(model, blocks, batch, 1)  # block 0 runs too
    assert torch.allclose(hidden(first), outputs[0], atol=1e-6) and torch.allclose(hidden(second), outputs[1], atol=1e-6)
    assert torch.allclose(hidden(through), outputs[1], atol=1e-6)
    with torch.no_grad():  # block 1 reads what it is given, not what block 0 would compute
        shifted = block_output(model, blocks, batch, 1, replayed=1, replay=hidden(first) + 1.0)
    assert not torch.allclose(hidden(shifted), outputs[1], atol=1e-3)
    assert [type(block).__name__ for block in blocks] == ["LlamaDecoderLayer"] * len(blocks)  # put back


def test_input_hessians_and_norms_agree_with_their_definitions(calibrated_tiny):
    model, _, windows, layers, (norms, hessians) = calibrated_tiny
    names = [layer.name for layer in layers]
    with InputHessians(model, names) as statistics, torch.no_grad():
        model(windows.calib_ids)
    for name in names:  # one batch of all windows: the same sums as the fixture's batches of four
        assert torch.allclose(statistics.hessians()[name], hessians[name], rtol=1e-4, atol=1e-6)
        assert torch.allclose(statistics.norms()[name], norms[name], rtol=1e-4)


def test_each_block_is_fitted_to_the_inputs_of_the_compressed_blocks_before_it(calibrated_tiny):
    """Block 0 sees the base model's inputs (as one-shot calibration); block 1 sees what compressed block 0
    gives: its Hessians are those a full pass through the model with block 0 compressed measures."""
    model, _, windows, layers, (norms, hessians) = calibrated_tiny
    plan = Plan.uniform([layer.name for layer in layers], GPTQ)
    sequential = copy.deepcopy(model)
    apply_plan_sequentially_(sequential, plan, windows.calib_ids)

    by_hand = copy.deepcopy(model)  # block 0 one-shot, then block 1 on a full pass through compressed block 0
    first, second = _block_names(layers, 0), _block_names(layers, 1)
    apply_plan_(by_hand, Plan({name: GPTQ for name in first}), norms, hessians=hessians)
    shifted = input_hessians(by_hand, windows.calib_ids, second)
    assert any(not torch.allclose(shifted[name], hessians[name]) for name in second)  # block 0's error shows
    apply_plan_(by_hand, Plan({name: GPTQ for name in second}), hessians=shifted)

    one_shot = copy.deepcopy(model)
    apply_plan_(one_shot, plan, norms, hessians=hessians)
    for name in first + second:
        ours = sequential.get_submodule(name).weight
        assert torch.allclose(ours, by_hand.get_submodule(name).weight, atol=1e-5), name
    assert all(torch.equal(sequential.get_submodule(name).weight, one_shot.get_submodule(name).weight) for name in first)
    assert not all(torch.equal(sequential.get_submodule(name).weight, one_shot.get_submodule(name).weight)
                   for name in second)


def test_a_plan_needing_no_statistics_comes_out_as_one_shot(calibrated_tiny):
    model, _, windows, layers, _ = calibrated_tiny
    plan = Plan.uniform([layer.name for layer in layers], LayerPlan(bits=4, group_size=32))
    sequential, one_shot = copy.deepcopy(model), copy.deepcopy(model)
    stored = apply_plan_sequentially_(sequential, plan, windows.calib_ids, keep_stored=True)
    apply_plan_(one_shot, plan)
    assert set(stored) == {f"{layer.name}.weight" for layer in layers}
    assert all(torch.equal(sequential.get_submodule(layer.name).weight, one_shot.get_submodule(layer.name).weight)
               for layer in layers)


def test_a_model_without_a_block_list_is_refused_with_the_way_out(calibrated_tiny):
    model, _, windows, layers, _ = calibrated_tiny
    flat = copy.deepcopy(model)
    flat.model.layers = torch.nn.Sequential(*flat.model.layers)
    with pytest.raises(ValueError, match="one-shot"):
        apply_plan_sequentially_(flat, Plan.uniform([layers[0].name], GPTQ), windows.calib_ids)
