"""Progress for people: tqdm bars on a terminal, plain lines where the output is a log (a pipe, CI, a Ray job)."""
from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


class Progress:
    """`step(stage, done, total)` moves a stage's bar (or, in a log, prints a line at each quarter);
    `line(text)` prints above the bars."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self._bars: dict[str, tqdm] = {}
        self._quarters: dict[str, int] = {}  # in a log: the last quarter of each stage printed

    def step(self, stage: str, done: int, total: int) -> None:
        if not self.live:
            quarter = 4 * done // max(1, total)
            if quarter > self._quarters.get(stage, 0) or done == total:
                self._quarters[stage] = quarter
                print(f"{stage}: {done}/{total}", file=self.stream, flush=True)
            return
        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, desc=stage, file=self.stream, dynamic_ncols=True)
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self._bars[stage]

    def line(self, text: str) -> None:
        if self._bars:
            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)
