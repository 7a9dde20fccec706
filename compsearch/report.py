"""An offline HTML report of a study: its front, the plans on it, the sensitivity profile, the search's
history and how well the profile estimated KL.

The page is one file: figures are inline SVG with real <text> labels (so the DOM can be read), and
each is also written as a PNG beside it. A figure the study has nothing for says why instead.
"""
from __future__ import annotations

import html
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib
import optuna
import pandas as pd
from matplotlib.figure import Figure

from compsearch import report_figures as figures
from compsearch.search.results import SEARCH_SOURCE, trials_frame
from compsearch.search.sensitivity import PROFILE_ATTR
from compsearch.search.spec import OBJECTIVES, QUALITY_OBJECTIVES
from compsearch.search.study import SPEC_ATTR
from compsearch.spaces.layers import LayerInfo

log = logging.getLogger(__name__)
REPORT_FILE = "report.html"
PNG_DPI = 110
COLLAPSE_FACTOR = 10  # a trial whose perplexity is over 10x the base model's has collapsed
MB = 1e6


@dataclass(frozen=True)
class StudyView:
    """What the report reads from a study, read once: its trials, references, settings and protocol."""

    name: str
    spec: dict
    trials: pd.DataFrame  # the search's own trials, by rank then trial number, with a `collapsed` column
    references: pd.DataFrame  # configurations scored beside the search (`source` is their kind)
    layers: list[LayerInfo]
    base_metrics: dict
    base_bytes: int | None
    memory_budget_bytes: int | None
    latency_budget_ms: float | None
    profile: dict | None
    protocol: dict

    @property
    def objectives(self) -> list[str]:
        return list(self.spec.get("objectives", ("ppl", "memory")))

    @property
    def objective_columns(self) -> list[str]:
        return [OBJECTIVES[name] for name in self.objectives]

    @property
    def quality(self) -> str:
        """The quality column the front is drawn in: the first quality objective (ppl unless kl comes first)."""
        return OBJECTIVES[next((name for name in self.objectives if name in QUALITY_OBJECTIVES), "ppl")]

    @property
    def completed(self) -> pd.DataFrame:
        return self.trials[self.trials["state"] == "COMPLETE"]

    @property
    def front(self) -> pd.DataFrame:
        """The feasible Pareto front, by rank."""
        done = self.completed
        return done[done["on_front"] & (done["feasible"] == True)].sort_values("rank")  # noqa: E712 (nullable)

    @property
    def protocol_text(self) -> str:
        return describe_protocol(self.protocol)


def load_view(study: optuna.Study) -> StudyView:
    """Read everything the report shows from the study's storage."""
    attrs = study.user_attrs
    frame = trials_frame(study)
    if "source" not in frame:  # tables written before references existed
        frame["source"] = SEARCH_SOURCE
    searched = frame["source"] == SEARCH_SOURCE
    base_metrics = attrs.get("base_metrics") or {}
    trials, references = frame[searched].copy(), frame[~searched].copy()
    for table in (trials, references):
        table["collapsed"] = is_collapsed(table, base_metrics.get("ppl"))
    return StudyView(
        name=study.study_name, spec=attrs.get(SPEC_ATTR, {}), trials=trials, references=references,
        layers=[LayerInfo(**info) for info in attrs.get("layers", [])], base_metrics=base_metrics,
        base_bytes=attrs.get("base_bytes"), memory_budget_bytes=attrs.get("memory_budget_bytes"),
        latency_budget_ms=attrs.get("latency_budget_ms"), profile=attrs.get(PROFILE_ATTR),
        protocol=attrs.get("protocol") or {})


def is_collapsed(frame: pd.DataFrame, base_ppl: float | None) -> pd.Series:
    """Rows whose perplexity is over COLLAPSE_FACTOR x the base model's (none when that is unknown)."""
    if not base_ppl or "ppl" not in frame:
        return pd.Series(False, index=frame.index)
    return pd.to_numeric(frame["ppl"], errors="coerce").gt(COLLAPSE_FACTOR * base_ppl)


def describe_protocol(protocol: dict) -> str:
    """One line, e.g. '16 x 256-token evaluation windows (4096 tokens) of wiki.txt (sha256 71f2ff5d99bd), ...'."""
    rest = dict(protocol)
    parts = []
    if "eval_windows" in rest and "seq_len" in rest:
        text = f"{rest.pop('eval_windows')} x {rest.pop('seq_len')}-token evaluation windows"
        if "eval_tokens" in rest:
            text += f" ({rest.pop('eval_tokens')} tokens scored)"
        if "data_source" in rest:
            text += f" of {_shorten(str(rest.pop('data_source')))}"
        if "data_sha256" in rest:
            text += f" (sha256 {str(rest.pop('data_sha256'))[:12]})"
        parts.append(text)
    if "calib_windows" in rest:
        parts.append(f"{rest.pop('calib_windows')} calibration windows")
    if "bos_per_window" in rest:
        parts.append("BOS token per window" if rest.pop("bos_per_window") else "no BOS token")
    if "compress_version" in rest:
        parts.append(f"compression v{rest.pop('compress_version')}")
    parts += [f"{key}={value}" for key, value in rest.items()]
    return ", ".join(parts) if parts else "evaluation protocol not recorded"


def _shorten(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


# (file stem, heading, builder): the order they appear in.
FIGURES: tuple[tuple[str, str, Callable[[StudyView], Figure]], ...] = (
    ("front", "Quality against cost: every trial, the feasible Pareto front, references and budgets",
     figures.front_figure),
    ("plans", "The front's plans, layer by layer", figures.plans_figure),
    ("profile", "Sensitivity profile: KL of each option on each group alone (measured, or scaled from a measured "
                "one by output error)", figures.profile_figure),
    ("history", "Search history: hypervolume of the feasible front", figures.history_figure),
    ("estimate", "The profile's KL estimate against the measured KL", figures.estimate_figure),
)


def write_report(study: optuna.Study, out_dir: Path) -> Path:
    """Write report.html (self-contained, works offline: no CDN, no external files needed) and one PNG per
    figure into out_dir; return the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    view = load_view(study)
    sections = []
    for stem, heading, draw in FIGURES:
        png = out_dir / f"{stem}.png"
        try:
            figure = draw(view)
        except figures.FigureSkipped as why:
            log.info("report of %s: no %s figure: %s", view.name, stem, why)
            png.unlink(missing_ok=True)  # a stale figure from an earlier report would contradict the page
            sections.append(_section_html(stem, heading, f'<p class="missing">Not drawn: {html.escape(str(why))}.</p>'))
            continue
        figure.savefig(png, dpi=PNG_DPI)
        body = (f"<figure>{_inline_svg(figure)}<figcaption>Evaluation protocol: {html.escape(view.protocol_text)}. "
                f'<a href="{stem}.png">PNG</a></figcaption></figure>')
        sections.append(_section_html(stem, heading, body))
    path = out_dir / REPORT_FILE
    path.write_text(_page_html(view, sections), encoding="utf-8")
    return path


def _inline_svg(figure: Figure) -> str:
    """The figure as an <svg> element; text stays text (svg.fonttype none) so labels are in the DOM."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]  # the XML prolog and DOCTYPE have no place inside HTML


def _section_html(stem: str, heading: str, body: str) -> str:
    return f'<section id="figure-{stem}"><h2>{html.escape(heading)}</h2>{body}</section>'


_STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f2f2f2}table.facts td,table.facts th{text-align:left}
svg{max-width:100%;height:auto}figcaption{font-size:.85em;color:#555}.missing{color:#a33}"""


def _page_html(view: StudyView, sections: list[str]) -> str:
    name = html.escape(view.name)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>compsearch report: {name}</title>'
            f"<style>{_STYLE}</style></head><body>\n<h1>Study {name}</h1>\n{_facts_html(view)}\n"
            f"<h2>Evaluation protocol</h2><p>{html.escape(view.protocol_text)}</p>\n"
            f"<h2>Feasible Pareto front</h2>{_front_table(view)}\n"
            f"<h2>Reference configurations</h2>{_reference_table(view)}\n" + "\n".join(sections) + "\n</body></html>\n")


def _facts_html(view: StudyView) -> str:
    counts = view.trials["state"].value_counts()
    facts = {
        "model": view.spec.get("model", "?"), "space": view.spec.get("space", "?"),
        "objectives": ", ".join(view.objectives), "memory budget": _memory_budget_text(view),
        "latency budget": f"{view.latency_budget_ms:g} ms" if view.latency_budget_ms else "none",
        "base model (16-bit)": _base_text(view),
        "trials by state": ", ".join(f"{state} {count}" for state, count in counts.items()) or "none yet",
        "feasible Pareto front": f"{len(view.front)} trials", "references": f"{len(view.references)}",
    }
    rows = "".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>"
                   for key, value in facts.items())
    return f'<table class="facts">{rows}</table>'


def _memory_budget_text(view: StudyView) -> str:
    if not view.memory_budget_bytes:
        return "none"
    share = f" ({view.memory_budget_bytes / view.base_bytes:.0%} of the 16-bit model)" if view.base_bytes else ""
    return f"{view.memory_budget_bytes / MB:.4g} MB{share}"


def _base_text(view: StudyView) -> str:
    parts = [f"{view.base_bytes / MB:.4g} MB"] if view.base_bytes else []
    if view.base_metrics.get("ppl"):
        parts.append(f"ppl {view.base_metrics['ppl']:.4g}")
    if view.base_metrics.get("latency_ms"):
        parts.append(f"latency {view.base_metrics['latency_ms']:.4g} ms")
    return ", ".join(parts) or "not measured"


def _front_table(view: StudyView) -> str:
    if view.front.empty:
        return "<p>No feasible trial on the front yet.</p>"
    return _table_html(view.front, ["rank", "trial", "seed"])


def _reference_table(view: StudyView) -> str:
    if view.references.empty:
        return "<p>None scored beside this study.</p>"
    return _table_html(view.references, ["name", "source", "feasible"])


_METRIC_HEADINGS = {"ppl": "ppl", "kl": "KL (nats/token)", "memory_bytes": "memory (MB)",
                    "bits_per_weight": "bits/weight", "latency_ms": "latency (ms)"}


def _table_html(frame: pd.DataFrame, leading: list[str]) -> str:
    columns = [c for c in leading if c in frame] + [c for c in _METRIC_HEADINGS if c in frame]
    head = "".join(f"<th>{html.escape(_METRIC_HEADINGS.get(c, c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c, row[c]))}</td>" for c in columns) + "</tr>"
                   for _, row in frame.iterrows())
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(column: str, value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return "-"
    if column == "memory_bytes":
        return f"{value / MB:.4g}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
