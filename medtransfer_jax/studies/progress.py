"""What a person watching a study sees: one line per finished item with the stage's ETA.

    run 7/175 breast/imagenet/fold2: test AUC 0.912, 41 s, ETA 1h12m

The ETA is (items left) x (mean seconds per item finished in this session) / (items run
at once); items skipped because they were done earlier do not count towards the mean.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional


def format_duration(seconds: float) -> str:
    """41 -> '41 s', 250 -> '4m10s', 4320 -> '1h12m'; NaN/inf -> '?'."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Counts finished items of one stage and formats the progress lines."""

    def __init__(self, kind: str, total: int, *, done_before: int = 0, parallel: int = 1,
                 clock: Callable[[], float] = time.time, echo: Optional[Callable] = print):
        self.kind, self.total, self.parallel = kind, total, max(1, int(parallel))
        self.finished = done_before
        self.timed = 0
        self.seconds = 0.0
        self.clock = clock
        self.echo = echo
        self.started = clock()

    def eta(self) -> float:
        """Seconds left in this stage (NaN before the first timed item)."""
        left = self.total - self.finished
        if left <= 0:
            return 0.0
        if not self.timed:
            return float("nan")
        return left * (self.seconds / self.timed) / self.parallel

    def item_done(self, name: str, seconds: float, detail: str = "") -> str:
        """Records one finished item (``seconds`` of work) and returns/echoes its line."""
        self.finished += 1
        self.timed += 1
        self.seconds += seconds
        line = (f"{self.kind} {self.finished}/{self.total} {name}: "
                + (f"{detail}, " if detail else "")
                + f"{format_duration(seconds)}, ETA {format_duration(self.eta())}")
        if self.echo:
            self.echo(line, flush=True)
        return line
