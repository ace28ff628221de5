"""One progress bar for every long step (preparing images, training, evaluating, predicting).

A rich bar on stderr (or ``file``). On a terminal it redraws in place; in a log file (CI, ``nohup``)
rich draws it once when it stops, so a long run leaves one line per step instead of thousands.
``ProgressBar(..., enabled=False)`` is a no-op with the same interface, so callers never branch.
"""

from __future__ import annotations

import sys
from typing import IO


class ProgressBar:
    """``with ProgressBar(total, "predict") as bar: ... bar.advance()``; ``bar.print(line)`` writes a
    message above the bar (or to ``file`` when the bar is off)."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, file: IO[str] | None = None):
        self.file = file
        self.bar = None
        self.task = None
        if enabled and total > 0:
            from rich.console import Console
            from rich.markup import escape
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            console = Console(file=file) if file is not None else Console(stderr=True)
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
            self.task = self.bar.add_task(escape(desc), total=total)

    def __enter__(self) -> "ProgressBar":
        self.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def start(self) -> None:
        if self.bar is not None:
            self.bar.start()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def describe(self, desc: str) -> None:
        if self.bar is not None:
            from rich.markup import escape

            self.bar.update(self.task, description=escape(desc))

    def print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=self.file or sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
