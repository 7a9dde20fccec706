"""Measured memory: the peak of the process while evaluating, and batch sizes that fit what is free."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import psutil
import torch
from torch import nn

log = logging.getLogger(__name__)
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MAX_AUTO_BATCH = 32
# On a CPU a batch past about 1024 tokens is slower, not faster (its activations leave the caches): 16 x 256
# evaluation tokens of SmolLM2-135M on one thread take 19.1 s in one batch, 17.7 s in batches of 4 windows.
MAX_CPU_BATCH_TOKENS = 1024
AUTO_BATCH_FRACTION = 0.25  # of the free memory, leaving room for other workers and the compressed copy


def _read_hwm_bytes() -> int | None:
    """Linux's peak resident set size of this process (VmHWM), or None where /proc has no such field."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where that is refused."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring the peak memory of what runs inside it.

    CPU: the process's peak RSS (`peak_rss_bytes`), from Linux's VmHWM reset on entry, or else from a
    thread sampling RSS every `interval_s`. CUDA: also `peak_gpu_bytes` from torch's allocator.
    """

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.01):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.metrics: dict[str, int] = {}
        self._stop = threading.Event()
        self._sampled = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._use_hwm = _reset_hwm() and _read_hwm_bytes() is not None
        if not self._use_hwm:
            self._sampled = psutil.Process().memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(self.interval_s):
            self._sampled = max(self._sampled, process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        rss_now = psutil.Process().memory_info().rss
        peak = _read_hwm_bytes() if self._use_hwm else self._sampled
        self.metrics["peak_rss_bytes"] = max(int(peak or 0), rss_now)
        if self.device.type == "cuda":
            self.metrics["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(self.device))


def free_memory_bytes(device: str | torch.device = "cpu") -> int:
    """Memory free for new tensors: available RAM on CPU, free device memory on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def sequence_bytes(model: nn.Module, seq_len: int) -> int:
    """Rough float32 activation bytes of one sequence in a forward pass (logits chunked separately).

    Per token: the residual stream and MLP intermediate per layer (kept transiently), the attention
    scores of one layer, and a chunk of logits; a factor 2 covers temporaries.
    """
    config = model.config
    hidden = getattr(config, "hidden_size", 1024)
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    heads = getattr(config, "num_attention_heads", 16)
    per_token = 4 * (6 * hidden + 3 * intermediate + heads * seq_len)
    return 2 * seq_len * per_token


def auto_batch_size(model: nn.Module, seq_len: int, device: str | torch.device = "cpu",
                    fraction: float = AUTO_BATCH_FRACTION, free_bytes: int | None = None) -> int:
    """The largest batch (1..MAX_AUTO_BATCH; on a CPU, of at most `MAX_CPU_BATCH_TOKENS` tokens) whose
    activations fit in `fraction` of the free memory."""
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    size = int(fraction * free // max(1, sequence_bytes(model, seq_len)))
    largest = MAX_AUTO_BATCH if torch.device(device).type != "cpu" else MAX_CPU_BATCH_TOKENS // seq_len
    chosen = max(1, min(MAX_AUTO_BATCH, largest, size))
    log.info("batch size %d chosen for %d-token windows (%.1f GB free)", chosen, seq_len, free / 1e9)
    return chosen
