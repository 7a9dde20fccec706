"""The cached sensitivity measurements: a damaged file is reported once and measured again, never a crash."""
import json
import logging

import pytest

from compsearch.search.sensitivity import SensitivityCache


def test_measurements_round_trip(tmp_path):
    cache = SensitivityCache(tmp_path / "profile.json")
    cache.values[SensitivityCache.key('{"layers": {}}')] = 0.25
    cache.save()
    assert SensitivityCache(tmp_path / "profile.json").values == cache.values


@pytest.mark.parametrize("content", [b'{"abc": 0.1, "de', b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'{"abc": "x"}'])
def test_a_damaged_cache_is_reported_and_measured_again(tmp_path, caplog, content):
    path = tmp_path / "profile.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        cache = SensitivityCache(path)
    assert cache.values == {}
    assert "is damaged" in caplog.text and "measuring its entries again" in caplog.text
    cache.values["k"] = 1.0
    cache.save()  # the rebuilt cache replaces the damaged file
    assert json.loads(path.read_text()) == {"k": 1.0}
