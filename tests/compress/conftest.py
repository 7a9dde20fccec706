"""A tiny model with its calibration statistics, shared by the compression tests of a session."""
import pytest

from compsearch.compress import input_hessians, input_norms
from compsearch.evaluators.data import load_text, make_windows
from compsearch.search.models import load_model, load_tokenizer
from compsearch.spaces.layers import linear_layers


def calibrated(model_dir, seq_len: int, eval_windows: int, calib_windows: int):
    """(model, tokenizer, windows, layers, (input norms, input Hessians)) of the model in `model_dir`."""
    model = load_model(str(model_dir))
    tokenizer = load_tokenizer(str(model_dir))
    text, source = load_text(None)
    windows = make_windows(tokenizer, text, source, seq_len, eval_windows, calib_windows)
    layers = linear_layers(model)
    names = [layer.name for layer in layers]
    return model, tokenizer, windows, layers, (input_norms(model, windows.calib_ids, names),
                                               input_hessians(model, windows.calib_ids, names))


@pytest.fixture(scope="session")
def calibrated_tiny(tiny_model_dir):
    """The tiny Llama calibrated on 8 windows of 32 tokens (see `calibrated`)."""
    return calibrated(tiny_model_dir, seq_len=32, eval_windows=2, calib_windows=8)


@pytest.fixture(scope="session")
def calibrated_wide(tiny_wide_dir):
    """The wide tiny Llama calibrated like `calibrated_tiny`."""
    return calibrated(tiny_wide_dir, seq_len=32, eval_windows=2, calib_windows=8)
