"""The report's figures, drawn with matplotlib's object-oriented `Figure` (no pyplot, no display needed).

Each builder takes a `StudyView` (`compsearch.report`) and returns a `Figure` whose title states the
evaluation protocol, or raises `FigureSkipped` saying what the study lacks for it. The front's point
collections carry stable SVG ids (`front-points`, `feasible-points`, `reference-points`, ...; the
latency panel's are prefixed `latency-`) so the page's DOM can be checked.
"""
from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from compsearch.compress import layer_nbytes
from compsearch.search.spec import OBJECTIVES, objective_sign
from compsearch.spaces.knobs import KNOBS
from compsearch.spaces.layers import LayerInfo
from compsearch.spaces.plan import LayerPlan, Plan

if TYPE_CHECKING:
    from compsearch.report import StudyView

MB = 1e6
AXIS_LABELS = {"ppl": "perplexity", "kl": "KL to the base model (nats/token)", "memory_bytes": "memory (MB)",
               "latency_ms": "latency (ms, median prefill)"}
LOG_SPAN = 10  # an axis whose values span more than 10x is drawn in log scale
HV_MARGIN = 0.1  # the hypervolume's reference point lies 10% beyond the worst observed value of each objective
KL_FLOOR = 1e-8  # nats/token: a measured KL of 0 (or rounding below it) still has a colour on a log scale
SEED_MARKERS = {"uniform": "s", "profile": "D"}
# Which technique (`Knob.factor`) a plan field belongs to; `pattern` is how a sparsity knob's N:M value is stored.
FACTOR_OF = {**{knob.name: knob.factor for knob in KNOBS}, "pattern": "sparsity"}
OFF_KNOBS = [knob for knob in KNOBS if knob.off is not None]
OFF_FIELDS = {knob.name for knob in OFF_KNOBS}


class FigureSkipped(Exception):
    """The study has nothing to draw this figure from; the message says why."""


def _figure(view: StudyView, title: str, size: tuple[float, float]) -> Figure:
    figure = Figure(figsize=size, layout="constrained")
    figure.suptitle(f"{view.name}: {title}\n{_wrap(view.protocol_text, size[0])}", fontsize=10)
    return figure


def _wrap(text: str, width_in: float) -> str:
    """Text broken into lines that fit a figure `width_in` inches wide at a 10-point font."""
    return textwrap.fill(text, max(40, int(width_in * 12)))


# --- 1. the front -------------------------------------------------------------------------------------

def front_figure(view: StudyView) -> Figure:
    """Quality against memory (and latency, when measured): every completed trial, the feasible Pareto
    front, seed trials, references, budgets and the base model; collapsed trials sit at the top edge."""
    if view.completed.empty:
        raise FigureSkipped("the study has no completed trial yet")
    panels = [("memory_bytes", 1 / MB, view.memory_budget_bytes, view.base_bytes, "")]
    if view.completed["latency_ms"].notna().any():
        panels.append(("latency_ms", 1.0, view.latency_budget_ms, view.base_metrics.get("latency_ms"), "latency-"))
    figure = _figure(view, f"{AXIS_LABELS[view.quality]} against cost", (6.5 * len(panels), 5.2))
    axes = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    limits = _quality_limits(view)
    for ax, (column, scale, budget, base_x, prefix) in zip(axes, panels):
        _front_panel(ax, view, column, scale, budget, base_x, limits, prefix)
    axes[0].set_ylabel(AXIS_LABELS[view.quality])
    return figure


def _quality_limits(view: StudyView) -> tuple[float, float, bool]:
    """(bottom, top, log scale) of the quality axis: from the best point that has not collapsed up to the
    worst feasible one (or the base model): collapsed and infeasible points cannot squash the front; those
    above it are drawn at the top edge."""
    quality = view.quality
    frames = [view.completed, view.references]
    base = pd.Series([view.base_metrics.get(quality)])

    def numbers(parts: list[pd.Series]) -> pd.Series:
        return pd.to_numeric(pd.concat(parts), errors="coerce").dropna()

    distilled = view.completed.get(f"distilled_{quality}", pd.Series(dtype=float))  # --distill-top's points
    kept = numbers([f.loc[~f["collapsed"], quality] for f in frames] + [base, distilled])
    if kept.empty:
        kept = numbers([f[quality] for f in frames])
    feasible = numbers([f.loc[~f["collapsed"] & (f["feasible"] == True), quality] for f in frames] + [base])  # noqa: E712
    values = pd.concat([kept[kept <= feasible.max()], feasible]) if len(feasible) >= 2 else kept
    positive = values[values > 0]
    low, high = (values.min(), values.max()) if not values.empty else (0.0, 1.0)
    if not positive.empty and positive.max() / positive.min() > LOG_SPAN:
        return positive.min() / 1.3, positive.max() * 1.3, True
    pad = 0.06 * (high - low) or 0.05 * abs(high) or 1.0
    return low - pad, high + pad, False


def _front_panel(ax: Axes, view: StudyView, column: str, scale: float, budget: float | None,
                 base_x: float | None, limits: tuple[float, float, bool], prefix: str) -> None:
    quality, (bottom, top, log) = view.quality, limits

    def points(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """x in display units and quality clipped to the top edge, for the rows that have both."""
        frame = _drawable(frame, column, quality)
        return frame[column].to_numpy(float) * scale, np.minimum(frame[quality].to_numpy(float), top)

    done = view.completed
    _scatter(ax, prefix + "feasible-points", points(done[done["feasible"] == True]),  # noqa: E712 (nullable)
             s=16, color="0.6", label="feasible trial")
    _scatter(ax, prefix + "infeasible-points", points(done[done["feasible"] == False]),  # noqa: E712
             s=22, marker="x", color="tab:red", linewidths=1, label="infeasible trial")
    for kind, seeds in done[done["seed"].notna()].groupby(done["seed"].str.split(":").str[0]):  # preset:Q4_K_M
        _scatter(ax, f"{prefix}seed-{kind}-points", points(seeds), s=70, marker=SEED_MARKERS.get(kind, "P"),
                 facecolors="none", edgecolors="tab:green" if kind == "uniform" else "tab:purple",
                 linewidths=1.2, label=f"{kind} seed")
    front_x, front_y = points(view.front.sort_values(column))
    if column in view.objective_columns and len(front_x):
        ax.plot(front_x, front_y, color="tab:blue", linewidth=1.3, zorder=3, gid=prefix + "front-line")
    _scatter(ax, prefix + "front-points", (front_x, front_y), s=40, color="tab:blue", zorder=4,
             label="feasible Pareto front")
    references = _drawable(view.references, column, quality)
    _scatter(ax, prefix + "reference-points", points(references), s=60, marker="D", color="tab:orange",
             edgecolors="black", zorder=5, label="reference")
    for name, x, y in zip(references.get("name", []), *points(references)):
        ax.annotate(str(name), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
    _distilled_arrows(ax, done, quality, points, prefix)
    above = pd.concat([done, references])
    above = above[pd.to_numeric(above[quality], errors="coerce").gt(top)]
    _scatter(ax, prefix + "clipped-points", points(above), s=60, marker="^", color="tab:purple", zorder=5,
             clip_on=False, label="above the axis (collapsed)" if above["collapsed"].any() else "above the axis")
    if budget:
        ax.axvline(budget * scale, color="tab:red", linestyle="--", linewidth=1, gid=prefix + "budget-line",
                   label=f"budget {budget * scale:.4g} {'MB' if column == 'memory_bytes' else 'ms'}")
    base_y = view.base_metrics.get(quality)
    if base_x and base_y is not None and (base_y > 0 or not log):
        ax.scatter([base_x * scale], [base_y], s=160, marker="*", color="gold", edgecolors="black", zorder=6,
                   gid=prefix + "base-point", label="base model (16-bit)")
    ax.set_yscale("log" if log else "linear")
    ax.set_ylim(bottom, top)
    ax.set_xlabel(AXIS_LABELS[column])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _distilled_arrows(ax: Axes, done: pd.DataFrame, quality: str, points, prefix: str) -> None:
    """The trials distilled after the search (`--distill-top`): an arrow from the trial's point to where
    distillation took it, at the same cost."""
    after_column = f"distilled_{quality}"
    if after_column not in done:
        return
    distilled = _drawable(done, after_column, quality)
    (xs, before), (_, after) = points(distilled), points(distilled.assign(**{quality: distilled[after_column]}))
    for x, start, end in zip(xs, before, after):
        ax.annotate("", (x, end), xytext=(x, start), arrowprops={"arrowstyle": "->", "color": "tab:cyan", "lw": 1.2})
    _scatter(ax, prefix + "distilled-points", (xs, after), s=40, marker="v", color="tab:cyan", zorder=5,
             label="after distillation")


def _drawable(frame: pd.DataFrame, column: str, quality: str) -> pd.DataFrame:
    """The rows that have both coordinates of a panel."""
    return frame[pd.to_numeric(frame[column], errors="coerce").notna()
                 & pd.to_numeric(frame[quality], errors="coerce").notna()]


def _scatter(ax: Axes, gid: str, xy: tuple[np.ndarray, np.ndarray], **style) -> None:
    """A scatter with an SVG id; nothing (no empty group) when there are no points."""
    if len(xy[0]):
        ax.scatter(*xy, **style).set_gid(gid)


# --- 2. the front's plans -------------------------------------------------------------------------------

def plans_figure(view: StudyView) -> Figure:
    """Bits per weight of every layer for each front trial, plus a panel per other knob that varies."""
    front = view.front
    if front.empty:
        raise FigureSkipped("no feasible trial is on the Pareto front yet")
    if not view.layers:
        raise FigureSkipped("the study does not record its layers")
    plans = [Plan.from_json(text) for text in front["plan_json"]]
    panels = {"bits per weight": (_bits_matrix(plans, view.layers), None)}
    for field in [knob.name for knob in KNOBS if knob.name != "bits"] + ["pattern"]:
        matrix, categories = _knob_matrix(plans, view.layers, field)
        if len({v for v in matrix.ravel() if v == v}) > 1:  # shown where it varies (NaN: technique off)
            panels[field] = (matrix, categories)
    rows = [f"#{rank} trial {trial}" for rank, trial in zip(front["rank"], front["trial"])]
    height = 0.8 + 0.2 * len(rows)
    width = min(18.0, max(8.0, 3.0 + 0.06 * len(view.layers)))
    figure = _figure(view, "per-layer plans of the feasible Pareto front (rows by rank)",
                     (width, 1.0 + height * len(panels)))
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, (matrix, categories)) in zip(axes, panels.items()):
        _heatmap(figure, ax, matrix, categories, title)
        _label_rows(ax, rows)
        _mark_blocks(ax, view.layers)
    kinds = [layer.kind for layer in view.layers if layer.block == view.layers[0].block]
    axes[-1].set_xlabel(_wrap(f"layer, grouped by decoder block (within a block: {', '.join(kinds)}); "
                              "grey: technique off", width))
    return figure


def _bits_matrix(plans: list[Plan], layers: list[LayerInfo]) -> np.ndarray:
    return np.array([[layer_nbytes(layer, plan[layer.name]) * 8 / layer.num_params for layer in layers]
                     for plan in plans])


def _knob_matrix(plans: list[Plan], layers: list[LayerInfo], field: str) -> tuple[np.ndarray, list[str] | None]:
    """The field's value per (plan, layer); text values become category codes. A knob that switches its
    technique (sparsity, rank, structure) always has a value; another (group size, method) is NaN where
    its technique is off."""
    switch = field in OFF_FIELDS
    values = [[getattr(plan[layer.name], field) if switch or _technique_on(plan[layer.name], FACTOR_OF[field])
               else None for layer in layers] for plan in plans]
    present = [v for row in values for v in row if v is not None]
    categories = sorted({str(v) for v in present}) if any(isinstance(v, str) for v in present) else None
    code = (lambda v: categories.index(str(v))) if categories else float
    return np.array([[np.nan if v is None else code(v) for v in row] for row in values], dtype=float), categories


def _technique_on(layer_plan: LayerPlan, factor: str) -> bool:
    """Whether the layer plan uses the technique: one of its knobs is off its 'off' value (or it has none)."""
    knobs = [knob for knob in OFF_KNOBS if knob.factor == factor]
    return not knobs or any(float(getattr(layer_plan, k.name)) != float(k.off) for k in knobs)


# Colours of text values (methods): tab20's hues, strong ones first, without its greys (grey means "off").
_TAB20 = [color for index, color in enumerate(matplotlib.colormaps["tab20"].colors) if index not in (14, 15)]
CATEGORY_COLORS = _TAB20[0::2] + _TAB20[1::2]


def _heatmap(figure: Figure, ax: Axes, matrix: np.ndarray, categories: list[str] | None, title: str) -> None:
    if categories:
        cmap = ListedColormap([CATEGORY_COLORS[i % len(CATEGORY_COLORS)] for i in range(len(categories))])
        image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap=cmap.with_extremes(bad="0.9"),
                          vmin=-0.5, vmax=len(categories) - 0.5)
        bar = figure.colorbar(image, ax=ax, ticks=range(len(categories)), fraction=0.03, pad=0.01)
        bar.ax.set_yticklabels(categories, fontsize=7)
    else:
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.9")
        image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap=cmap)
        bar = figure.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    bar.set_label(title, fontsize=8)
    ax.set_title(title, fontsize=9, loc="left")


def _label_rows(ax: Axes, labels: list[str], most: int = 40) -> None:
    step = max(1, len(labels) // most)
    ax.set_yticks(range(0, len(labels), step), labels[::step], fontsize=7)


def _mark_blocks(ax: Axes, layers: list[LayerInfo]) -> None:
    """One tick per decoder block (its index) at the middle of its columns, a white line between blocks."""
    spans: list[list] = []  # [label, first column, last column]
    for column, layer in enumerate(layers):
        label = layer.block.rsplit(".", 1)[-1] if layer.block != layer.name else layer.kind
        if spans and spans[-1][0] == label and spans[-1][2] == column - 1:
            spans[-1][2] = column
        else:
            spans.append([label, column, column])
    step = max(1, len(spans) // 40)
    ax.set_xticks([(first + last) / 2 for _, first, last in spans[::step]], [s[0] for s in spans[::step]], fontsize=7)
    for _, first, _ in spans[1:]:
        ax.axvline(first - 0.5, color="white", linewidth=1.5)


# --- 3. the sensitivity profile ---------------------------------------------------------------------------

def profile_figure(view: StudyView) -> Figure:
    """log10 KL of each (technique, option) measured on each decision group alone."""
    if not view.profile:
        raise FigureSkipped("the study records no sensitivity profile (an unguided study, or one run before "
                            "studies kept their profile)")
    groups = list(view.profile)
    columns = list(dict.fromkeys((factor, key) for options in view.profile.values()
                                 for factor, by_option in options.items() for key in by_option))
    matrix = np.full((len(groups), len(columns)), np.nan)
    for row, group in enumerate(groups):
        for col, (factor, key) in enumerate(columns):
            kl = view.profile[group].get(factor, {}).get(key)
            if kl is not None:
                matrix[row, col] = np.log10(max(kl, KL_FLOOR))
    figure = _figure(view, "sensitivity profile", (min(18.0, 4.0 + 0.28 * len(columns)), 2.5 + 0.2 * len(groups)))
    ax = figure.subplots()
    image = ax.imshow(matrix, aspect="auto", interpolation="nearest",
                      cmap=matplotlib.colormaps["magma_r"].with_extremes(bad="0.9"))
    figure.colorbar(image, ax=ax, fraction=0.03, pad=0.01).set_label("log10 KL (nats/token)")
    ax.set_xticks(range(len(columns)), [_option_label(key) for _, key in columns], rotation=90, fontsize=7)
    _label_rows(ax, groups, most=60)
    for col in range(1, len(columns)):
        if columns[col][0] != columns[col - 1][0]:
            ax.axvline(col - 0.5, color="white", linewidth=2)
    ax.set_xlabel("option, grouped by technique (" + ", ".join(dict.fromkeys(f for f, _ in columns)) + ")")
    ax.set_ylabel("decision group")
    return figure


def _option_label(key: str) -> str:
    """'{"bits": 4, "group_size": 128}' -> 'bits=4 group_size=128'."""
    try:
        return " ".join(f"{name}={value}" for name, value in json.loads(key).items())
    except (ValueError, AttributeError):
        return key


# --- 4. history -------------------------------------------------------------------------------------------

def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """What the points (rows; every objective minimized, one or two) dominate up to `reference`."""
    points = points[(points < reference).all(axis=1)]
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(reference[0] - points[:, 0].min())
    points = points[np.argsort(points[:, 0], kind="stable")]
    area, best_y = 0.0, reference[1]
    for (x, y), next_x in zip(points, [*points[1:, 0], reference[0]]):
        best_y = min(best_y, y)
        area += (next_x - x) * (reference[1] - best_y)
    return float(area)


def history_figure(view: StudyView) -> Figure:
    """Hypervolume of the feasible front after each completed trial (first two objectives), with failed,
    infeasible and collapsed trials marked along the trial axis."""
    done = view.completed.sort_values("trial")
    if done.empty:
        raise FigureSkipped("the study has no completed trial yet")
    names = view.objectives[:2]
    values = done.reindex(columns=[OBJECTIVES[n] for n in names]).apply(pd.to_numeric, errors="coerce")
    values = values.to_numpy(float) * np.array([objective_sign(n) for n in names])  # all minimized
    finite = np.isfinite(values).all(axis=1)
    if not finite.any():
        raise FigureSkipped(f"no completed trial has a value for each of {', '.join(names)}")
    usable = finite & ~done["collapsed"].to_numpy(bool)  # a collapsed trial would stretch the box to nothing
    worst = values[usable if usable.any() else finite].max(axis=0)
    reference = worst + HV_MARGIN * np.abs(worst)
    feasible = (done["feasible"] == True).to_numpy(bool) & finite  # noqa: E712 (nullable column)
    volumes = [hypervolume(values[: i + 1][feasible[: i + 1]], reference) for i in range(len(done))]
    figure = _figure(view, "search history", (9, 5.5))
    ax, events = figure.subplots(2, 1, sharex=True, height_ratios=[4, 1])
    ax.step(done["trial"].to_numpy(int), volumes, where="post", marker=".", color="tab:blue", label="feasible front")
    shown = " x ".join(OBJECTIVES[n] + (" (negated)" if objective_sign(n) < 0 else "") for n in names)
    ax.set_ylabel(f"hypervolume in {shown}")
    ax.set_title("reference point: " + ", ".join(f"{OBJECTIVES[n]} {r:.4g}" for n, r in zip(names, reference)),
                 fontsize=8)
    ax.grid(alpha=0.3)
    failed = view.trials.loc[view.trials["state"] == "FAIL", "trial"]
    lanes = (("failed", failed, "x", "tab:red"),
             ("infeasible", done.loc[done["feasible"] == False, "trial"], "|", "tab:orange"),  # noqa: E712
             ("collapsed", done.loc[done["collapsed"], "trial"], "v", "tab:purple"))
    for lane, (_, trials, marker, color) in enumerate(lanes):
        events.plot(trials.to_numpy(int), [lane] * len(trials), linestyle="none", marker=marker, color=color)
    events.set_yticks(range(len(lanes)), [label for label, *_ in lanes], fontsize=8)
    events.set_ylim(-0.6, len(lanes) - 0.4)
    events.set_xlabel("trial number")
    events.grid(axis="x", alpha=0.3)
    return figure


# --- 5. estimated against measured KL ----------------------------------------------------------------------

def estimate_figure(view: StudyView) -> Figure:
    """The profile's additive KL estimate against the KL measured, one point per completed trial."""
    done = view.completed
    both = done[done["estimated_kl"].notna() & done["kl"].notna()] if "estimated_kl" in done else done.iloc[:0]
    if both.empty:
        raise FigureSkipped("no trial has a profile estimate of its KL (estimates come with guided search)")
    estimated, measured = both["estimated_kl"].to_numpy(float), both["kl"].to_numpy(float)
    feasible = (both["feasible"] == True).to_numpy(bool)  # noqa: E712 (nullable column)
    figure = _figure(view, "estimated against measured KL", (6.5, 6))
    ax = figure.subplots()
    ax.scatter(estimated[feasible], measured[feasible], s=20, color="tab:blue", label="feasible trial")
    ax.scatter(estimated[~feasible], measured[~feasible], s=24, marker="x", color="tab:red", label="infeasible trial")
    everything = np.concatenate([estimated, measured])
    positive = everything[everything > 0]
    low, high = (positive.min(), positive.max()) if len(positive) else (0.0, 1.0)
    if len(positive) and high / low > LOG_SPAN:
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        low = min(0.0, everything.min())
    ax.plot([low, high], [low, high], color="black", linestyle="--", linewidth=1, label="measured = estimated")
    ratio = np.median(measured[estimated > 0] / estimated[estimated > 0]) if (estimated > 0).any() else np.nan
    ax.set_title(f"{len(both)} trials; median measured / estimated = {ratio:.3g}", fontsize=8)
    ax.set_xlabel("estimated KL (nats/token, sum of the profile's single-group KLs)")
    ax.set_ylabel("measured KL (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure
