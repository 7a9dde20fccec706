"""A model folder whose weights are missing or damaged is refused before anything loads them."""
import shutil

import pytest

from compsearch.search.errors import UserError
from compsearch.search.models import check_weights


def test_complete_weights_pass(tiny_model_dir):
    check_weights(str(tiny_model_dir))
    check_weights("some-org/some-hub-id")  # not a folder: left to transformers


def test_missing_weights(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match="has a config but no weights"):
        check_weights(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights(tiny_model_dir, tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = next(folder.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 100)
    with pytest.raises(UserError, match="cannot be read .*damaged or incomplete"):
        check_weights(str(folder))
