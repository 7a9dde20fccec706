"""Every value a trial records, declared once: its name (the key evaluators return and the Parquet
column), unit, and whether it is optimized (and which way) or context.

Objectives, the Parquet tables and the leaderboard read these declarations; a worker that returns an
undeclared value fails loudly instead of losing it. Task metrics (`task_<task>_<metric>`, one per
lm-eval task and metric) are declared by their prefix: they are higher-is-better unless their name
says otherwise (perplexity, bits per byte, loss).
"""
from __future__ import annotations

from dataclasses import dataclass

from compsearch.registry import Registry

MINIMIZE, MAXIMIZE = "minimize", "maximize"
TASK_PREFIX = "task_"
LOWER_IS_BETTER_TASK_METRICS = ("perplexity", "bits_per_byte", "loss")


@dataclass(frozen=True)
class Metric:
    """`objective`: the short name a user asks for it by (`--objectives ppl,memory`), if it can be one;
    `direction`: MINIMIZE or MAXIMIZE for a quality or cost, None for context (where, how, why);
    `on_board`: shown by the leaderboard."""

    name: str
    unit: str
    direction: str | None
    description: str
    objective: str | None = None
    on_board: bool = False


class UndeclaredMetric(ValueError):
    """A value an evaluator returned that no `Metric` declares."""


METRICS: Registry[Metric] = Registry("metric")
for _metric in (
    Metric("ppl", "", MINIMIZE, "perplexity on the evaluation windows", "ppl", True),
    Metric("kl", "nats/token", MINIMIZE, "mean KL(base || compressed) of the next-token distributions", "kl", True),
    Metric("nll", "nats/token", MINIMIZE, "mean negative log-likelihood on the evaluation windows"),
    Metric("estimated_kl", "nats/token", MINIMIZE, "the sensitivity profile's additive KL estimate", on_board=True),
    Metric("bits_per_weight", "bits", MINIMIZE, "stored bits per weight of the planned layers", on_board=True),
    Metric("memory_bytes", "bytes", MINIMIZE, "bytes of the model as stored under the plan", "memory", True),
    Metric("latency_ms", "ms", MINIMIZE, "median prefill forward pass", "latency", True),
    Metric("latency_p90_ms", "ms", MINIMIZE, "90th percentile prefill forward pass"),
    Metric("predicted_latency_ms", "ms", MINIMIZE, "the cost model's prefill prediction", on_board=True),
    Metric("prefill_tok_s", "tokens/s", MAXIMIZE, "median prefill throughput"),
    Metric("prefill_p90_tok_s", "tokens/s", MAXIMIZE, "prefill throughput at the 90th percentile latency"),
    Metric("decode_ms", "ms", MINIMIZE, "median decode step at batch 1", on_board=True),
    Metric("decode_p90_ms", "ms", MINIMIZE, "90th percentile decode step at batch 1"),
    Metric("predicted_decode_ms", "ms", MINIMIZE, "the cost model's decode prediction at batch 1", on_board=True),
    Metric("decode_batch_ms", "ms", MINIMIZE, "median decode step at the decode batch"),
    Metric("decode_batch_p90_ms", "ms", MINIMIZE, "90th percentile decode step at the decode batch"),
    Metric("predicted_decode_batch_ms", "ms", MINIMIZE, "the cost model's decode prediction at the decode batch"),
    Metric("predicted_prefill_tok_s", "tokens/s", MAXIMIZE, "the cost model's prefill throughput"),
    Metric("peak_rss_bytes", "bytes", MINIMIZE, "the worker's peak resident memory while evaluating", on_board=True),
    Metric("peak_gpu_bytes", "bytes", MINIMIZE, "peak CUDA memory allocated while evaluating"),
    Metric("compress_s", "s", MINIMIZE, "seconds spent compressing"),
    Metric("evaluate_s", "s", MINIMIZE, "seconds spent measuring"),
    Metric("decode_batch", "sequences", None, "the batch of the batched decode measurement"),
    Metric("latency_kernel", "", None, "real: every compressed layer ran on a kernel exploiting it; else simulated",
           on_board=True),
    Metric("latency_simulated_layers", "layers", None, "compressed layers timed without a fast kernel"),
    Metric("latency_device", "", None, "cpu or cuda"),
    Metric("latency_device_name", "", None, "the processor or GPU timed on"),
    Metric("latency_dtype", "", None, "the dtype timed in"),
    Metric("latency_threads", "threads", None, "torch threads while timing"),
    Metric("latency_repeats", "repeats", None, "timed repeats per figure"),
    Metric("latency_runtime", "", None, "what ran the timed model: torch, or llama.cpp on the trial's GGUF file"),
    Metric("gguf_file_bytes", "bytes", MINIMIZE, "bytes of the trial's GGUF file (GGUF plans timed in llama.cpp)"),
    Metric("pruned", "", None, "why the latency cost model ruled the plan out before it ran"),
    Metric("worker", "", None, "host:pid of the worker that ran the trial"),
    Metric("threads", "threads", None, "torch threads the worker compressed with (an export uses as many: float "
                                       "sums, hence GPTQ's rounding, depend on the thread count)"),
    Metric("node_id", "", None, "the Ray node of that worker"),
):
    METRICS.register(_metric)
OBJECTIVES = {metric.objective: metric.name for metric in METRICS if metric.objective}


def is_task_metric(name: str) -> bool:
    return isinstance(name, str) and name.startswith(TASK_PREFIX) and len(name) > len(TASK_PREFIX)


def metric(name: str) -> Metric:
    """The declared metric `name`, or the declaration of a task metric column."""
    if is_task_metric(name):
        lower = any(word in name for word in LOWER_IS_BETTER_TASK_METRICS)
        return Metric(name, "", MINIMIZE if lower else MAXIMIZE, "an lm-eval task metric", name)
    return METRICS.get(name)


def check_declared(values: dict) -> None:
    """Refuse values no metric declares: they would never reach the tables."""
    undeclared = sorted(key for key in values if key not in METRICS and not is_task_metric(key))
    if undeclared:
        raise UndeclaredMetric(f"evaluators returned undeclared values {undeclared}; declare them in "
                               "compsearch.evaluators.metrics.METRICS")
