"""The HTML report of real studies on the tiny model, opened in headless Chromium."""
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from compsearch.report import FIGURES, StudyView, describe_protocol, load_view, write_report
from compsearch.report_figures import _quality_limits, hypervolume
from compsearch.search.commands import RunOptions, evaluate, resume, submit
from compsearch.search.evaluate import Reference
from compsearch.search.study import load_study, open_storage
from tests.search.helpers import tiny_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


def run_study(spec, trials: int, folder: Path):
    options = RunOptions(results_dir=folder / "results", workers=2, cache_dir=folder / "cache")
    submit(spec, trials, options)
    study, _ = load_study(spec.study, open_storage(options.storage_url(spec.study)))
    return study


@pytest.fixture(scope="module")
def guided_report(tiny_model_dir, ray_session, tmp_path_factory):
    """A guided study with a memory budget, latency measured, one reference configuration and its best plan
    distilled."""
    folder = tmp_path_factory.mktemp("report")
    study = run_study(tiny_spec(tiny_model_dir, "report", memory_budget="0.5", measure_latency=True), 6, folder)
    options = RunOptions(results_dir=folder / "results", cache_dir=folder / "cache")
    evaluate([Reference("uniform", "rtn:8:g128")], options, "report")
    resume("report", 6, RunOptions(results_dir=folder / "results", workers=2, cache_dir=folder / "cache"),
           distill_top=1, distill_steps=2)
    study, _ = load_study("report", open_storage(options.storage_url("report")))
    return study, write_report(study, folder / "out")


@pytest.fixture(scope="module")
def plain_report(tiny_model_dir, ray_session, tmp_path_factory):
    """An unguided study: no profile, no KL estimates, no budget, no references."""
    folder = tmp_path_factory.mktemp("report-plain")
    study = run_study(tiny_spec(tiny_model_dir, "report-plain", guided=False), 4, folder)
    return study, write_report(study, folder / "out")


class SvgReader(HTMLParser):
    """Counts the elements inside the element with id `gid`, and collects the text of <text> elements."""

    def __init__(self, gid: str):
        super().__init__()
        self.gid, self.depth, self.in_text = gid, 0, False
        self.counts: dict[str, int] = {}
        self.texts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += 1
            self.counts[tag] = self.counts.get(tag, 0) + 1
        elif dict(attrs).get("id") == self.gid:
            self.depth = 1
        self.in_text = self.in_text or tag == "text"

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1
        if tag == "text":
            self.in_text = False

    def handle_data(self, data):
        if self.in_text:
            self.texts.append(data.strip())

    def points(self) -> int:
        """Scatter markers as matplotlib writes them: <use> of one <defs> path, or one <path> each."""
        return self.counts.get("use") or self.counts.get("path", 0)


def chromium(*args: str, profile: Path) -> str:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout


def read_dom(html_path: Path, gid: str, tmp_path: Path) -> SvgReader:
    reader = SvgReader(gid)
    reader.feed(chromium("--dump-dom", html_path.resolve().as_uri(), profile=tmp_path / "chromium"))
    return reader


def test_hypervolume_of_a_staircase():
    points = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [3.5, 3.5], [5.0, 0.5]])  # the last two add nothing
    assert hypervolume(points, np.array([4.0, 4.0])) == pytest.approx(1 + 2 + 3, rel=1e-12)
    assert hypervolume(points[:, :1], np.array([4.0])) == pytest.approx(3.0, rel=1e-12)
    assert hypervolume(np.empty((0, 2)), np.array([4.0, 4.0])) == 0.0


def test_protocol_reads_as_one_line():
    text = describe_protocol({"seq_len": 256, "eval_windows": 16, "eval_tokens": 4080, "data_source": "wiki.txt",
                              "data_sha256": "ab" * 32, "calib_windows": 8, "compress_version": 4, "extra": 1})
    assert text.startswith("16 x 256-token evaluation windows (4080 tokens scored) of wiki.txt (sha256 abababababab)")
    assert "8 calibration windows" in text and "compression v4" in text and text.endswith("extra=1")


@pytest.mark.slow
def test_report_writes_every_figure_as_png(guided_report):
    _, html_path = guided_report
    for stem, _, _ in FIGURES:
        png = html_path.parent / f"{stem}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, stem
        assert png.stat().st_size > 5_000, stem
    page = html_path.read_text()
    assert "<script" not in page and "<link" not in page and not re.search(r'(src|href)="(https?:|//)', page)  # offline
    assert page.count("<svg") == len(FIGURES) and "Not drawn" not in page


@pytest.mark.slow
@needs_chromium
def test_chromium_shows_the_front_and_its_axes(guided_report, tmp_path):
    study, html_path = guided_report
    view = load_view(study)
    assert len(view.front) >= 1 and len(view.references) == 1
    front = read_dom(html_path, "front-points", tmp_path)
    assert front.points() == len(view.front)
    assert read_dom(html_path, "reference-points", tmp_path).points() == 1
    assert read_dom(html_path, "distilled-points", tmp_path).points() == 1  # with an arrow from its trial
    assert read_dom(html_path, "latency-front-points", tmp_path).points() == view.front["latency_ms"].notna().sum()
    assert {"memory (MB)", "perplexity", "latency (ms, median prefill)", "rtn:8:g128"} <= set(front.texts)
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,2000", html_path.resolve().as_uri(), profile=tmp_path / "shot")
    assert shot.read_bytes()[:8] == PNG_MAGIC and shot.stat().st_size > 20_000


@pytest.mark.slow
@needs_chromium
def test_study_without_profile_or_references_still_renders(plain_report, tmp_path):
    study, html_path = plain_report
    folder = html_path.parent
    assert {p.name for p in folder.glob("*.png")} == {"front.png", "plans.png", "history.png"}
    page = html_path.read_text()
    assert "Not drawn: the study records no sensitivity profile" in page
    assert "Not drawn: no trial has a profile estimate of its KL" in page
    assert "None scored beside this study" in page
    dom = read_dom(html_path, "front-points", tmp_path)
    assert dom.points() == len(load_view(study).front) and "memory (MB)" in dom.texts
    assert read_dom(html_path, "reference-points", tmp_path).points() == 0
    assert read_dom(html_path, "distilled-points", tmp_path).points() == 0


def test_the_quality_axis_spans_the_feasible_points_not_an_infeasible_outlier():
    def rows(ppl, feasible):
        return pd.DataFrame({"state": "COMPLETE", "ppl": ppl, "feasible": feasible, "collapsed": False})

    view = StudyView(name="s", spec={}, trials=rows([15.0, 20.0, 28.0], [True, True, True]),
                     references=rows([71.0, 17.7, 12.5], [False, True, False]), layers=[], base_metrics={"ppl": 14.0},
                     base_bytes=None, memory_budget_bytes=None, latency_budget_ms=None, profile=None, protocol={})
    bottom, top, log = _quality_limits(view)
    assert bottom < 12.5 and 28.0 < top < 71.0 and not log  # the 71 is drawn at the top edge instead
