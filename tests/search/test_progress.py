"""Progress: bars on a terminal, a line per quarter in a log."""
import io

from compsearch.search.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_at_each_quarter():
    log = io.StringIO()
    progress = Progress(log)
    for done in range(1, 9):
        progress.step("sensitivity profile", done, 8)
    progress.line("profile ready")
    assert log.getvalue().splitlines() == ["sensitivity profile: 2/8", "sensitivity profile: 4/8",
                                           "sensitivity profile: 6/8", "sensitivity profile: 8/8", "profile ready"]


def test_a_terminal_gets_a_bar_that_closes_when_done():
    terminal = Terminal()
    progress = Progress(terminal)
    progress.step("trials", 1, 4)
    progress.line("[1/4] trial 0: ...")
    for done in (2, 3, 4):
        progress.step("trials", done, 4)
    shown = terminal.getvalue()
    assert "[1/4] trial 0: ..." in shown and "trials: 100%" in shown and "4/4" in shown
    assert not progress._bars  # closed at the total


def test_a_trial_line_says_which_constraint_an_infeasible_trial_breaks():
    from compsearch.search.cli import _trial_line
    from compsearch.search.runner import TrialEvent

    metrics = {"ppl": 4.6e6, "kl": 12.5, "memory_bytes": 101e6, "bits_per_weight": 3.36, "latency_ms": None}
    best = {"ppl": 14.585, "memory_bytes": 134.4e6}
    line = _trial_line(TrialEvent(10, 20, 8, "COMPLETE", metrics, False, best, 9, None, ("quality",)))
    assert line.startswith("[10/20] trial 8: ppl 4600000.000  101.0 MB  3.36 b/w  past the quality floor | best")
    both = _trial_line(TrialEvent(10, 20, 8, "COMPLETE", metrics, False, best, 9, None, ("memory", "quality")))
    assert "past the memory budget and quality floor" in both
