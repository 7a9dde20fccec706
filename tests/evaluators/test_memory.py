"""Peak process memory and the batch size chosen from free memory."""
import time

import pytest
import torch

from compsearch.evaluators.memory import PeakMemory, auto_batch_size
from compsearch.evaluators import memory as memory_module
from compsearch.search.models import load_model

ALLOCATED = 64 * 2**20


def allocate_and_touch() -> torch.Tensor:
    block = torch.ones(ALLOCATED // 4)  # ones: every page is written, so resident
    time.sleep(0.05)
    return block


@pytest.mark.parametrize("use_hwm", [True, False])
def test_peak_memory_sees_a_transient_allocation(monkeypatch, use_hwm):
    if not use_hwm:
        monkeypatch.setattr(memory_module, "_reset_hwm", lambda: False)  # the sampling-thread fallback
    import psutil

    before = psutil.Process().memory_info().rss
    with PeakMemory() as peak:
        block = allocate_and_touch()
        del block
    assert peak.metrics["peak_rss_bytes"] >= before + 0.8 * ALLOCATED
    assert "peak_gpu_bytes" not in peak.metrics


def test_auto_batch_size_follows_free_memory(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    assert auto_batch_size(model, 256, free_bytes=1) == 1
    assert auto_batch_size(model, 256, free_bytes=10**12) == memory_module.MAX_CPU_BATCH_TOKENS // 256
    assert auto_batch_size(model, 16, free_bytes=10**12) == memory_module.MAX_AUTO_BATCH  # 64 would fit the tokens
    assert auto_batch_size(model, 256, "meta", free_bytes=10**12) == memory_module.MAX_AUTO_BATCH  # not a CPU
    sizes = [auto_batch_size(model, 16, free_bytes=n) for n in (2**20, 2**22, 2**24)]
    assert sizes == sorted(sizes) and auto_batch_size(model, 32) >= 1
