"""Measuring a model: perplexity, KL divergence to the base model, latency; plus the data they use."""
from evaluators.data import DataError, Protocol, Windows, load_text, make_windows
from evaluators.latency import measure_latency
from evaluators.quality import base_log_probs, perplexity_and_kl

__all__ = ["DataError", "Protocol", "Windows", "base_log_probs", "load_text", "make_windows",
           "measure_latency", "perplexity_and_kl"]
