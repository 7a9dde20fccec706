import math

import pytest
import torch

from compsearch.evaluators.quality import base_log_probs, perplexity_and_kl

from compsearch.evaluators.data import load_text, make_windows
from compsearch.evaluators import quality
from compsearch.search.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    text, source = load_text(None)
    return model, make_windows(tokenizer, text, source, seq_len=32, eval_windows=6, calib_windows=2)


def test_perplexity_matches_the_models_own_loss(tiny):
    model, windows = tiny
    with torch.no_grad():
        loss = model(windows.eval_ids, labels=windows.eval_ids).loss.item()
    assert math.isclose(perplexity_and_kl(model, windows.eval_ids, 4)["ppl"], math.exp(loss), rel_tol=1e-4)


def test_chunking_does_not_change_results(tiny, monkeypatch):
    model, windows = tiny
    whole = perplexity_and_kl(model, windows.eval_ids, 6)
    monkeypatch.setattr(quality, "CHUNK_FLOATS", 1000)  # a few rows at a time
    chunked = perplexity_and_kl(model, windows.eval_ids, 2)
    assert math.isclose(whole["ppl"], chunked["ppl"], rel_tol=1e-5)


def test_kl_to_itself_is_zero_and_grows_with_damage(tiny):
    model, windows = tiny
    base = base_log_probs(model, windows.eval_ids, 4)
    assert perplexity_and_kl(model, windows.eval_ids, 4, base)["kl"] < 1e-4  # float16 cache round-off
    damaged = load_model_copy(model)
    with torch.no_grad():
        damaged.model.layers[0].mlp.down_proj.weight.mul_(-3)
    assert perplexity_and_kl(damaged, windows.eval_ids, 4, base)["kl"] > 1e-3


def load_model_copy(model):
    import copy

    return copy.deepcopy(model)
