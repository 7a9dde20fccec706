import pytest

from compsearch.evaluators.data import DataError, load_text, make_windows
from compsearch.search.models import load_tokenizer


def test_default_text_is_pydoc_topics():
    text, source = load_text(None)
    assert source == "pydoc_data.topics" and len(text) > 100_000


def test_windows_start_with_bos_and_halves_do_not_overlap(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    text, source = load_text(None)
    windows = make_windows(tokenizer, text, source, seq_len=16, eval_windows=3, calib_windows=5)
    assert windows.eval_ids.shape == (3, 16) and windows.calib_ids.shape == (5, 16)
    assert (windows.eval_ids[:, 0] == tokenizer.bos_token_id).all()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    half = len(ids) // 2
    assert windows.calib_ids[0, 1:].tolist() == ids[:15]
    assert windows.eval_ids[0, 1:].tolist() == ids[half:half + 15]
    assert windows.protocol.eval_tokens == 3 * 15 and len(windows.protocol.data_sha256) == 64


def test_text_file_folder_and_errors(tmp_path, tiny_model_dir):
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "b.md").write_text("beta " * 50)
    text, _ = load_text(str(tmp_path))
    assert "alpha" in text and "beta" in text
    with pytest.raises(DataError, match="no such file"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="UTF-8"):
        load_text(str(tmp_path / "bad.txt"))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    with pytest.raises(DataError, match="Give more text"):
        make_windows(tokenizer, "short text", "x", seq_len=64, eval_windows=4, calib_windows=4)
