"""Measuring a model: perplexity, KL divergence to the base model, lm-eval tasks, latency, memory; plus data.

Import from the modules (`compsearch.evaluators.quality`, `.data`, `.latency`, ...): the package itself
imports nothing, so reading `metrics` (the command line does) does not load torch."""
