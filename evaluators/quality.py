"""Perplexity and KL divergence to the base model, with the vocabulary projection done in chunks."""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_FLOATS = 1 << 24  # about 64 MiB of float32 logits at a time, whatever the vocabulary size


@torch.inference_mode()
def next_token_log_probs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(log-probabilities, targets) for every predicted position, a bounded chunk of rows at a time."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    rows_per_chunk = max(1, CHUNK_FLOATS // head.out_features)
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        hidden = decoder(input_ids=batch).last_hidden_state[:, :-1].reshape(-1, head.in_features)
        targets = batch[:, 1:].reshape(-1)
        for row in range(0, hidden.shape[0], rows_per_chunk):
            logits = head(hidden[row:row + rows_per_chunk]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            yield F.log_softmax(logits, dim=-1), targets[row:row + rows_per_chunk]


def base_log_probs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The base model's log-probabilities, chunked like `next_token_log_probs`, kept in float16."""
    return [log_probs.half() for log_probs, _ in next_token_log_probs(model, windows, batch_size)]


def perplexity_and_kl(
    model: nn.Module, windows: torch.Tensor, batch_size: int, base: list[torch.Tensor] | None = None
) -> dict[str, float]:
    """`ppl` over all predicted tokens; with the base model's log-probs also `kl` = mean KL(base || model)."""
    nll_sum, kl_sum, tokens = 0.0, 0.0, 0
    for index, (log_probs, targets) in enumerate(next_token_log_probs(model, windows, batch_size)):
        nll_sum -= log_probs.gather(1, targets.unsqueeze(1)).sum().item()
        tokens += targets.numel()
        if base is not None:
            reference = base[index].float()
            kl_sum += (reference.exp() * (reference - log_probs)).sum().item()
    metrics = {"ppl": math.exp(nll_sum / tokens) if math.isfinite(nll_sum) else math.inf, "nll": nll_sum / tokens}
    if base is not None:
        metrics["kl"] = kl_sum / tokens
    return metrics
