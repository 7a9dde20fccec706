"""Measuring a model: perplexity, KL divergence to the base model, lm-eval tasks, latency, memory; plus data."""
from compsearch.evaluators.data import DataError, Protocol, Windows, load_text, make_windows
from compsearch.evaluators.latency import LatencySettings, measure_generation, measure_latency
from compsearch.evaluators.memory import PeakMemory, auto_batch_size
from compsearch.evaluators.quality import TopKLogProbs, base_log_probs, perplexity_and_kl

__all__ = ["DataError", "LatencySettings", "PeakMemory", "Protocol", "TopKLogProbs", "Windows", "auto_batch_size",
           "base_log_probs", "load_text", "make_windows", "measure_generation", "measure_latency",
           "perplexity_and_kl"]
