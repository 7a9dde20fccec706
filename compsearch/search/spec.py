"""What the user asked for: `JobSpec`, its validation, and budgets with units."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from compsearch.evaluators.metrics import MAXIMIZE, TASK_PREFIX, is_task_metric, metric
from compsearch.evaluators.metrics import OBJECTIVES as DECLARED_OBJECTIVES
from compsearch.search.errors import UserError
from compsearch.spaces import SpaceError, get_space
from compsearch.spaces.knobs import CHOICE_FIELDS, FLOAT_METHOD
from compsearch.spaces.layers import GRANULARITIES
from compsearch.spaces.space import DEFAULT_SPACE, Space

DEFAULT_MODEL = "smollm2-135m"
TASKS_ON = ("all", "pareto")


class _Objectives(dict):
    """Objective name -> the metric it optimizes; a task metric (`task_<task>_<metric>`) names itself."""

    def __missing__(self, name: str) -> str:
        if is_task_metric(name):
            return name
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or is_task_metric(name)


# Objective name -> its metric (declared in `evaluators.metrics`). Optuna minimizes every objective: a
# maximized one (a task accuracy) is told as its negation (`objective_sign` -1), and reported everywhere
# else with its own sign.
OBJECTIVES = _Objectives(DECLARED_OBJECTIVES)


def objective_sign(name: str) -> int:
    """+1 for an objective minimized as is, -1 for one maximized (task metrics such as accuracy)."""
    return -1 if metric(OBJECTIVES[name]).direction == MAXIMIZE else 1


QUALITY_OBJECTIVES = ("ppl", "kl")
EXPORT_FORMATS = ("compsearch", "gguf", "llama-quantize", "compressed-tensors")  # what `export --format` writes
RUNTIMES = ("torch", "llamacpp")  # what latency is measured in
SAMPLERS = ("nsga2", "tpe", "random")
SEED_LIMIT = 2**32  # the samplers' random generators take seeds below it
# Three times the base perplexity (about 1.1 nats/token of KL): past it the text is visibly broken, and
# such plans, kept as parents, breed collapsed children (perplexity in the thousands and more).
DEFAULT_MAX_PPL_RATIO = 3.0
# Steps of a student's distillation (`--students`): three times a plan's default (`DistillSettings.steps`); a
# model made smaller by removing channels and heads has more to recover, and recovers more per step.
STUDENT_STEPS = 300
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


@dataclass(frozen=True)
class JobSpec:
    """Everything that defines a study's search; a study keeps its spec for its whole life."""

    study: str
    model: str = DEFAULT_MODEL
    data: str | None = None
    space: str = DEFAULT_SPACE
    granularity: str | None = None  # None: the space's own (block; layer for gguf and vllm)
    tie_fused: bool | None = None  # None: the space's own (tied; apart for gguf)
    include_lm_head: bool = False
    # Overrides of the space's choices, one per knob (`spaces.knobs.KNOBS`; a test keeps them in step).
    bits: tuple[int, ...] | None = None
    group_sizes: tuple[int, ...] | None = None
    sparsities: tuple[str, ...] | None = None
    prune_methods: tuple[str, ...] | None = None
    rank_fractions: tuple[float, ...] | None = None
    quant_methods: tuple[str, ...] | None = None
    lowrank_methods: tuple[str, ...] | None = None
    channel_fractions: tuple[float, ...] | None = None
    head_fractions: tuple[float, ...] | None = None
    share_blocks: tuple[int, ...] | None = None
    objectives: tuple[str, ...] = ("ppl", "memory")
    memory_budget: str | None = None
    latency_budget_ms: float | None = None
    # The quality floor: a plan whose perplexity exceeds this multiple of the base model's is infeasible
    # (never a parent, never exported as a front plan); None: no floor. See `DEFAULT_MAX_PPL_RATIO`.
    max_ppl_ratio: float | None = DEFAULT_MAX_PPL_RATIO
    sampler: str = "nsga2"
    seed: int = 0
    population_size: int = 8
    uniform_seeds: bool = True
    guided: bool = True
    profile_windows: int = 2
    profile_seq_len: int = 128
    seq_len: int = 256
    eval_windows: int = 16
    # 32: SparseGPT 2:4 at 20.9 against 25.2 with 16 windows, for a 25 s statistics pass on 2 cores instead of
    # 14 (64: 19.7, 52 s); memory does not grow with it (benchmarks/results/calibration_size.csv, README)
    calib_windows: int = 32
    batch_size: int = 0  # windows per forward pass; 0 = chosen from free memory on each worker
    latency_prompt_tokens: int = 64
    trust_remote_code: bool = False
    tasks: tuple[str, ...] | None = None  # lm-eval task names and bigbench:PATH entries
    task_paths: tuple[str, ...] | None = None  # folders of the user's lm-eval task YAML files
    tasks_on: str = "all"  # score tasks on every trial, or only on the final Pareto front
    task_limit: int | None = None  # first N examples of every task
    distill_top: int = 0  # after the search, distill the best N feasible plans (their rows gain distilled_*)
    distill_steps: int | None = None  # steps of each of those distillations; None: `DistillSettings`' default
    # The student path: the best N feasible plans that remove MLP channels or attention heads (smaller dense
    # models) are distilled too, for longer (`student_steps`; None: `STUDENT_STEPS`).
    students: int = 0
    student_steps: int | None = None
    measure_latency: bool = False  # measure latency on every trial even without a latency objective/budget
    decode_tokens: int = 16
    decode_batch: int = 4
    latency_repeats: int = 5
    kl_top_k: int = 1024  # base-model tokens kept per position for KL; 0 keeps the full distribution
    runtime: str | None = None  # what latency is measured in: torch, or llamacpp (default for GGUF spaces)
    gguf_template: str | None = None  # a GGUF of the base model whose metadata the trials' GGUF files copy

    def __post_init__(self) -> None:
        for name in (*CHOICE_FIELDS, "objectives"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if not _STUDY_NAME.fullmatch(self.study):  # fullmatch: `$` would let a trailing newline through
            raise UserError(f"study name {self.study!r} must be 1-100 letters, digits, '_', '.' or '-'")
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise UserError(f"objectives {','.join(self.objectives)!r} are not valid; choose distinct names "
                            f"from {sorted(OBJECTIVES)}, e.g. --objectives ppl,memory")
        if self.sampler not in SAMPLERS:
            raise UserError(f"sampler {self.sampler!r} is unknown; choose one of {SAMPLERS}")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise UserError(f"granularity {self.granularity!r} is unknown; choose one of {GRANULARITIES}")
        if self.memory_budget is not None:
            parse_memory_budget(self.memory_budget, base_bytes=1)
        if not 0 <= self.seed < SEED_LIMIT:
            raise UserError(f"seed {self.seed} must be a whole number from 0 to {SEED_LIMIT - 1}")
        if self.max_ppl_ratio is not None and not (math.isfinite(self.max_ppl_ratio) and self.max_ppl_ratio > 1):
            raise UserError(f"max quality loss {self.max_ppl_ratio!r} must be a perplexity ratio above 1 (e.g. 3 allows "
                            "three times the base model's perplexity), or none")
        if self.latency_budget_ms is not None and not self.latency_budget_ms > 0:
            raise UserError(f"latency budget {self.latency_budget_ms!r} ms must be a positive number of milliseconds")
        for name in ("seq_len", "eval_windows", "calib_windows", "population_size", "latency_prompt_tokens",
                     "profile_windows", "profile_seq_len"):
            if getattr(self, name) < (2 if name in ("seq_len", "population_size") else 1):
                raise UserError(f"{name.replace('_', '-')}={getattr(self, name)} is too small")
        self._check_evaluators()
        space = self.search_space()  # validates the choices
        self._check_runtime(space)
        if self.students and not any(value < 1.0 for knob in ("channel_fraction", "head_fraction")
                                     for value in space.choices[knob]):
            raise UserError(f"--students {self.students} distills plans that remove MLP channels or attention heads; "
                            f"space {self.space!r} removes neither: offer some (--mlp-channels 1,0.75 or "
                            "--attention-heads 1,0.67), or use --space structured")

    def _check_runtime(self, space: Space) -> None:
        if self.runtime not in (None, *RUNTIMES):
            raise UserError(f"runtime {self.runtime!r} is unknown; choose one of {RUNTIMES}")
        if self.latency_runtime != "llamacpp":
            return
        from compsearch.compress.gguf_formats import GGUF_TYPES

        bad = [m for m in space.choices["quant_method"] if m not in (FLOAT_METHOD, *GGUF_TYPES)]
        others = [k for k in ("sparsity", "rank_fraction", "channel_fraction", "head_fraction", "share_blocks")
                  if k in space.knobs()]
        if bad or others:
            raise UserError(f"--runtime llamacpp times plans as GGUF files, which hold GGUF types only: drop "
                            f"{', '.join(bad + others)} from the space or use --runtime torch")

    @property
    def latency_runtime(self) -> str:
        """`llamacpp` for GGUF spaces unless asked otherwise, else `torch`."""
        if self.runtime:
            return self.runtime
        return "llamacpp" if self.space == "gguf" else "torch"

    def _check_evaluators(self) -> None:
        """Tasks, latency settings and batch size (0 = chosen from free memory)."""
        for name in ("tasks", "task_paths"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.batch_size < 0:
            raise UserError(f"batch-size={self.batch_size} must be a positive number, or 0 to fit free memory")
        for name in ("decode_tokens", "decode_batch", "latency_repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')}={getattr(self, name)} must be at least 1")
        if self.kl_top_k < 0:
            raise UserError(f"kl-top-k={self.kl_top_k} must be a number of tokens, or 0 for the full distribution")
        if self.task_limit is not None and self.task_limit < 1:
            raise UserError(f"task-limit={self.task_limit} must be at least 1 (examples per task)")
        if self.distill_top < 0 or (self.distill_steps is not None and self.distill_steps < 1):
            raise UserError(f"--distill-top {self.distill_top} --distill-steps {self.distill_steps}: give the number of "
                            "best plans to distill (0: none) and at least 1 step, e.g. --distill-top 3 --distill-steps 20")
        if self.students < 0 or (self.student_steps is not None and self.student_steps < 1):
            raise UserError(f"--students {self.students} --student-steps {self.student_steps}: give the number of "
                            "structured plans to distill (0: none) and at least 1 step, e.g. --students 2 --student-steps 300")
        if self.tasks_on not in TASKS_ON:
            raise UserError(f"tasks-on {self.tasks_on!r} is unknown; choose one of {TASKS_ON}")
        task_objectives = [o for o in self.objectives if o.startswith(TASK_PREFIX)]
        if task_objectives and not (self.tasks or self.task_paths):
            raise UserError(f"objective {task_objectives[0]} needs tasks: add --tasks (e.g. bigbench:FILE.json)")
        if task_objectives and self.tasks_on != "all":
            raise UserError(f"objective {task_objectives[0]} needs every trial scored: use --tasks-on all")
        for task in self.tasks or ():
            if task.startswith("bigbench:"):
                from compsearch.evaluators.bigbench import TaskError, task_files

                try:
                    task_files(task)
                except TaskError as err:
                    raise UserError(str(err)) from None

    @property
    def task_settings(self) -> dict | None:
        """The `TaskSuite` fields of the study's tasks, or None without tasks."""
        if not (self.tasks or self.task_paths):
            return None
        return {"tasks": tuple(self.tasks or ()), "task_paths": tuple(self.task_paths or ()), "limit": self.task_limit}

    @property
    def latency_settings(self) -> dict:
        """The `LatencySettings` fields of the study."""
        return {"prompt_tokens": self.latency_prompt_tokens, "decode_tokens": self.decode_tokens,
                "decode_batch": self.decode_batch, "repeats": self.latency_repeats}

    def search_space(self) -> Space:
        try:
            return get_space(self.space).with_choices(
                granularity=self.granularity, tie_fused=self.tie_fused,
                **{name: getattr(self, name) for name in CHOICE_FIELDS})
        except SpaceError as err:
            raise UserError(str(err)) from None

    @property
    def needs_kl(self) -> bool:
        """KL is measured when it is an objective, and in guided studies (next to the profile's estimate)."""
        return "kl" in self.objectives or self.guided

    @property
    def needs_latency(self) -> bool:
        return "latency" in self.objectives or self.latency_budget_ms is not None or self.measure_latency

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        known = {f.name for f in fields(cls)}
        data = {"max_ppl_ratio": None, **data}  # a study from before the quality floor keeps running without one
        return cls(**{key: value for key, value in data.items() if key in known})

    def quality_violation(self, ppl: float | None, base_ppl: float) -> float:
        """How far past the quality floor a plan of perplexity `ppl` is, relative to it (<= 0: within);
        a perplexity that is missing or not finite (a diverged model) is infinitely past it."""
        if ppl is None or not math.isfinite(ppl):
            return math.inf
        return (ppl / base_ppl - self.max_ppl_ratio) / self.max_ppl_ratio

    @property
    def max_kl(self) -> float | None:
        """The quality floor in KL (nats/token): log perplexity grows by about the KL to the base model."""
        return math.log(self.max_ppl_ratio) if self.max_ppl_ratio else None


def parse_memory_budget(text: str, base_bytes: int) -> int:
    """Bytes from '60MB', '1.2GiB', '350000000' with a unit, '35%' or a fraction like '0.35' of `base_bytes`."""
    value = str(text).strip().lower().replace(" ", "")
    match = re.fullmatch(r"(\d+(?:\.\d+)?|\.\d+)([a-z%]*)", value)
    if not match:
        raise UserError(f"memory budget {text!r} is not a size; write e.g. 60MB, 1.2GiB, 35% or 0.35")
    number, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        number, unit = number / 100.0, ""
    if unit == "":
        if not 0.0 < number <= 1.0:
            raise UserError(f"memory budget {text!r} has no unit; give a fraction of the base model in (0, 1] "
                            "or bytes with a unit such as 60MB or 1.2GiB")
        return int(number * base_bytes)
    if unit not in _BYTE_UNITS:
        raise UserError(f"memory budget {text!r} has unknown unit {unit!r}; use one of {sorted(_BYTE_UNITS)}")
    if number <= 0:
        raise UserError(f"memory budget {text!r} must be positive")
    return int(number * _BYTE_UNITS[unit])
