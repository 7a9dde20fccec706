"""A tiny model with its calibration statistics, shared by the compression tests of a session."""
import pytest

from compsearch.compress import input_hessians, input_norms
from compsearch.evaluators import load_text, make_windows
from compsearch.search.models import load_model, load_tokenizer
from compsearch.spaces.layers import linear_layers


@pytest.fixture(scope="session")
def calibrated_tiny(tiny_model_dir):
    """(model, tokenizer, windows, layers, (input norms, input Hessians)) of the tiny Llama."""
    model = load_model(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    text, source = load_text(None)
    windows = make_windows(tokenizer, text, source, seq_len=32, eval_windows=2, calib_windows=8)
    layers = linear_layers(model)
    names = [layer.name for layer in layers]
    return model, tokenizer, windows, layers, (input_norms(model, windows.calib_ids, names),
                                               input_hessians(model, windows.calib_ids, names))
