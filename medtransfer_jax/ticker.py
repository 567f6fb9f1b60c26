"""The progress line of one long loop, throttled: :class:`Ticker` and :func:`format_duration`.

Why: long work prints progress, so nobody stares at a silent terminal (one ResNet50 CCA
pair is ~4 minutes of forward passes on a CPU). That work lives in ``analysis/`` and
``inference/``, which must not import ``studies/`` (where the study's per-item lines
are, :mod:`medtransfer_jax.studies.progress`); so the duration format and the throttled
line live here, at the bottom, and both import them. A function that does long work
takes an optional ``progress: Ticker`` and says what it has done; the caller names the
work and decides where lines go::

    breast/fold0 imagenet vs radimagenet (pre): 128/1020 images, repeat 1/5, 40 s, ETA 4m40s
    evaluate test: 640/2000 images, 14 img/s, 46 s, ETA 1m37s

At most one line per ``interval`` seconds (default :data:`INTERVAL_S`, read when the
Ticker is made; tests set 0 to see every line), so a fast loop stays quiet.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

#: Seconds between two throttled lines of one Ticker.
INTERVAL_S = 10.0


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


def _print(line: str) -> None:
    """Prints on the first process only: every host of a multi-host evaluate or analyze
    runs the same loop, and one line per host would repeat each line N times."""
    import jax   # already loaded by whatever does the long work
    if jax.process_index() == 0:
        print(line, flush=True)


class Ticker:
    """``label: n/N unit[, rate][, detail], elapsed, ETA`` lines of one loop, throttled.

    The worker calls :meth:`start` with its total, then :meth:`update` after each step
    with what is done; ``update(..., wait=fn)`` runs ``fn`` (e.g. ``block_until_ready``
    on that step's arrays) only when a line is due, so the line counts finished work
    without syncing every step. :meth:`say` prints an unthrottled line (one per phase).
    """

    def __init__(self, label: str, *, interval: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic,
                 echo: Callable[[str], None] = _print):
        self.label, self.clock, self.echo = label, clock, echo
        self.interval = INTERVAL_S if interval is None else float(interval)
        self.start(0)

    def start(self, total: int, unit: str = "images", rate_unit: Optional[str] = None
              ) -> "Ticker":
        """A new loop of ``total`` ``unit``; ``rate_unit`` ('img/s') adds the rate."""
        self.total, self.unit, self.rate_unit = int(total), unit, rate_unit
        self.started = self.last = self.clock()
        return self

    def due(self) -> bool:
        """Whether :meth:`update` would print now."""
        return self.clock() - self.last >= self.interval

    def update(self, done: int, detail: str = "", *, wait: Optional[Callable[[], object]]
               = None, force: bool = False) -> Optional[str]:
        """Echoes (and returns) the line for ``done`` of the total when one is due (or
        ``force``); else None. ``wait`` runs first, only when a line is printed."""
        if not (force or self.due()):
            return None
        if wait is not None:
            wait()
        now = self.clock()
        elapsed = now - self.started
        left = self.total - done
        eta = 0.0 if left <= 0 else elapsed / done * left if done else math.nan
        parts = [f"{done}/{self.total} {self.unit}"]
        if self.rate_unit:
            rate = done / elapsed if elapsed > 0 else math.nan
            parts.append(f"{rate:.3g} {self.rate_unit}" if rate < 1000 else
                         f"{rate:.0f} {self.rate_unit}" if rate < math.inf else
                         f"? {self.rate_unit}")
        if detail:
            parts.append(detail)
        parts += [format_duration(elapsed), f"ETA {format_duration(eta)}"]
        return self._echo(", ".join(parts), now)

    def reset(self) -> None:
        """Restarts the interval: a line printed elsewhere (a training run's
        ``log.every_steps`` line) counts as this one's."""
        self.last = self.clock()

    def say(self, message: str) -> str:
        """Echoes ``label: message`` now (a phase finished)."""
        return self._echo(message, self.clock())

    def _echo(self, message: str, now: float) -> str:
        self.last = now
        line = f"{self.label}: {message}"
        self.echo(line)
        return line
