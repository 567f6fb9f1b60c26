"""What a person watching a study sees: one line per finished item, the stage and overall ETA.

    run 7/175 breast/imagenet/fold2: test AUC 0.912, 41 s, ETA 1h12m
    [study] stage 2/7 finetune (175 runs): stage ETA 1h12m, overall ETA 1h31m
    representations 3/350 breast/fold0 imagenet vs radimagenet (pre): mean paper_cca
        0.712, 40 s, stage ETA 3h51m, overall ETA 4h02m   (one line)

The analysis stages' item loops go through :class:`StageItems` (one line per finished
item, its seconds fed to the cost model).

:class:`Progress` alone (no cost model) gives (items left) x (mean seconds per item
finished in this session) / (items run at once); items skipped because they were done
earlier do not count towards the mean.

The study's ETA is a cost model: each stage's work is counted before it starts in units
the study knows (:class:`StageWork`: 224-px training-image equivalents per fine-tuning
run, CCA pair x repeat x image, prediction-file pairs, parameters whose filters are
analysed, ...), and each stage's seconds per unit is measured on the items this workdir
has finished (:class:`Rates`, ``WORKDIR/stages/rates.json``, so a resumed study keeps
them). A stage not timed yet uses a prior (:data:`PRIORS`); fine-tuning has none, so
before its first run has finished the overall ETA is '?'.
The overall ETA is the sum of the ETAs of the stages left.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Callable, Dict, Iterator, Optional, Sequence

from medtransfer_jax import paths
from medtransfer_jax.ticker import format_duration
from medtransfer_jax.studies import tables

#: The stages of a study, in order (the runner runs them; the cost model counts them).
STAGES = ("sources", "finetune", "representations", "predictions", "filters", "robustness",
          "report")
#: Where a study keeps its measured rates: ``WORKDIR/stages/rates.json``.
RATES_FILE = ("stages", "rates.json")
#: A stage's seconds per unit before this workdir has timed it: ``("vs_finetune", r)`` =
#: r x the fine-tuning rate this workdir measured (stages whose time is forward passes
#: on the accelerator, so they speed up with it), ``("seconds", s)`` = s seconds per unit
#: (host-side stages: file reading, NumPy, plotting). Measured on the demo study
#: (``python -m medtransfer_jax.study``, 2026-11-26, two runs on this project's loaded
#: 2-core CPU): fine-tuning 0.37 / 0.54 s per 224-px image equivalent, representations
#: 1.82 / 1.51 x that per pair x repeat x 224-px image as counted (an upper bound of the
#: stimuli: the demo used ~39 images where it counts 77); BENCHMARKS.md sections 1 and 4
#: give 0.95 for ResNet50 per image actually forwarded (4 forwards x 0.105 s / 0.44 s).
#: Filters: section 9 (pre vs fine-tuned ResNet50, 47 M parameters in 18.7 s). A rough
#: prior, replaced by the stage's own rate once it has run in the workdir.
PRIORS = {"sources": ("seconds", 12.9), "representations": ("vs_finetune", 1.7),
          "predictions": ("seconds", 0.036), "filters": ("seconds", 0.40),
          "robustness": ("seconds", 0.061), "report": ("seconds", 0.33)}


class Progress:
    """Counts finished items of one stage and formats the progress lines.

    ``eta_fn``: the study's stage ETA (``StudyProgress.stage_eta``) instead of the mean
    of the items timed here; with ``overall_fn`` too, a line ends ``stage ETA 7m40s,
    overall ETA 1h02m`` (the analysis stages, whose lines carry both)."""

    def __init__(self, kind: str, total: int, *, done_before: int = 0, parallel: int = 1,
                 clock: Callable[[], float] = time.time, echo: Optional[Callable] = print,
                 eta_fn: Optional[Callable[[], float]] = None,
                 overall_fn: Optional[Callable[[], float]] = None):
        self.kind, self.total, self.parallel = kind, total, max(1, int(parallel))
        self.eta_fn, self.overall_fn = eta_fn, overall_fn
        self.finished = done_before
        self.timed = 0
        self.seconds = 0.0
        self.clock = clock
        self.echo = echo
        self.started = clock()

    def eta(self) -> float:
        """Seconds left in this stage (NaN before the first timed item)."""
        if self.eta_fn is not None:
            return self.eta_fn()
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
        eta = f"ETA {format_duration(self.eta())}"
        if self.overall_fn is not None:
            eta = f"stage {eta}, overall ETA {format_duration(self.overall_fn())}"
        line = (f"{self.kind} {self.finished}/{self.total} {name}: "
                + (f"{detail}, " if detail else "") + f"{format_duration(seconds)}, {eta}")
        if self.echo:
            self.echo(line, flush=True)
        return line


@dataclasses.dataclass
class StageWork:
    """What one stage has left to do, counted before it starts.

    ``count``/``noun``: the label, '(12 pairs)'; ``untimed``: cost units not timed item by
    item (a stage timed as a whole: the report, the filters of a sources-only study);
    ``items``: units of the items timed one by one, by name (the runs of a stage, an
    analysis stage's :class:`StageItems`); ``parallel``: items run at once. NaN units:
    unknown (e.g. a run config that does not load), so the ETA says '?'.
    """
    count: int
    noun: str
    untimed: float = 0.0
    items: Dict[str, float] = dataclasses.field(default_factory=dict)
    parallel: int = 1

    @property
    def units(self) -> float:
        """Cost units left."""
        return self.untimed + sum(self.items.values())

    @property
    def label(self) -> str:
        return f"{self.count} {self.noun}"


def _rate_entry(entry) -> Optional[dict]:
    """A rates.json entry as numbers, or None when it cannot be one."""
    try:
        out = dict(seconds=float(entry["seconds"]), units=float(entry["units"]),
                   items=int(entry.get("items", 0)))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    ok = all(math.isfinite(v) for v in out.values()) and out["units"] > 0
    return out if ok else None


class Rates:
    """Seconds per unit of each stage measured in one workdir, persisted as JSON.

    ``{stage: {"seconds": s, "units": u, "items": n}}``: sums over every timed item of
    every session, written atomically after each item (``tables.write_json``).
    """

    def __init__(self, path: Optional[str] = None, measured: Optional[dict] = None):
        self.path = path
        self.measured: Dict[str, dict] = dict(measured or {})

    @classmethod
    def load(cls, path: Optional[str]) -> "Rates":
        """The rates at ``path``, or none yet (a missing or unreadable file is no rate, and
        an entry without finite seconds and units > 0 is dropped: they are only an ETA)."""
        if path and paths.exists(path):
            try:
                data = tables.read_json(path)
                entries = {k: _rate_entry(v) for k, v in data.get("stages", {}).items()}
                return cls(path, {k: v for k, v in entries.items() if v})
            except (ValueError, AttributeError, TypeError) as e:
                logging.warning("ignoring unreadable study rates %s (%s)", path, e)
        return cls(path)

    def add(self, stage: str, seconds: float, units: float, items: int = 1) -> None:
        """Adds ``seconds`` spent on ``units`` of ``stage`` and saves (if it has a path)."""
        if not (units > 0 and math.isfinite(units) and math.isfinite(seconds)):
            return
        m = self.measured.setdefault(stage, {"seconds": 0.0, "units": 0.0, "items": 0})
        m["seconds"] += max(float(seconds), 0.0)
        m["units"] += float(units)
        m["items"] += int(items)
        if self.path:
            tables.write_json(self.path, {"stages": self.measured})

    def rate(self, stage: str) -> float:
        """Seconds per unit of ``stage``: measured, else its prior (:data:`PRIORS`),
        else NaN."""
        m = self.measured.get(stage)
        if m:
            return m["seconds"] / m["units"]
        kind, value = PRIORS.get(stage, (None, math.nan))
        ft = self.measured.get("finetune")
        if kind == "vs_finetune":
            return value * ft["seconds"] / ft["units"] if ft else math.nan
        return value

    def source(self, stage: str) -> str:
        """'measured' | 'prior' | 'none': where :meth:`rate` comes from."""
        if stage in self.measured:
            return "measured"
        return "prior" if math.isfinite(self.rate(stage)) else "none"


def stage_eta(work: StageWork, rates: Rates, stage: str) -> float:
    """Seconds ``work`` of ``stage`` will take at ``rates`` (0 with nothing left)."""
    if work.units == 0:
        return 0.0
    return work.units * rates.rate(stage) / max(1, work.parallel)


class StudyProgress:
    """The stage and overall ETA of a running study; prints the ``[study] stage`` lines.

    ``work``: {stage: StageWork} of the stages this session will run, in order (a stage
    done earlier is left out). :meth:`start`, :meth:`item_done` and :meth:`finish` record
    what finished; each finished item's seconds and units go to ``rates`` at once, so an
    interrupted study keeps what it measured.
    """

    def __init__(self, work: Dict[str, StageWork], rates: Rates, *,
                 echo: Optional[Callable] = print):
        self.work, self.rates, self.echo = dict(work), rates, echo
        self.finished: set = set()
        self.stage: Optional[str] = None
        self.position = ""
        self._timed_s = 0.0

    def stage_eta(self, stage: Optional[str] = None) -> float:
        """Seconds left in ``stage`` (default: the current one); NaN when unknown."""
        stage = stage or self.stage
        if stage in self.finished or stage not in self.work:
            return 0.0
        return stage_eta(self.work[stage], self.rates, stage)

    def overall_eta(self) -> float:
        """Sum of the ETAs of the stages not finished (NaN if any of them is unknown)."""
        return sum(self.stage_eta(s) for s in self.work)

    def line(self, state: str = "") -> str:
        """``[study] stage 2/7 finetune (175 runs): stage ETA 1h12m, overall ETA 1h31m``;
        with a ``state``: ``[study] stage 3/7 representations: running (12 pairs), ...``."""
        head = f"[study] stage {self.position} {self.stage}"
        label = self.work[self.stage].label
        return (f"{head}: {state} ({label}), " if state else f"{head} ({label}): ") + (
            f"stage ETA {format_duration(self.stage_eta())}, "
            f"overall ETA {format_duration(self.overall_eta())}")

    def _say(self, line: str) -> str:
        if self.echo:
            self.echo(line, flush=True)
        return line

    def start(self, stage: str, index: int, total: int) -> str:
        """Enters ``stage`` (``index``/``total`` of this session) and prints its line."""
        self.stage, self.position, self._timed_s = stage, f"{index}/{total}", 0.0
        return self._say(self.line("running"))

    def record(self, name: str, seconds: float) -> bool:
        """Records one finished item of the current stage (its units from
        ``StageWork.items``); False for an item the stage does not count."""
        w = self.work.get(self.stage)
        units = w.items.pop(name, None) if w else None
        if units is None:
            return False
        self.rates.add(self.stage, seconds, units)
        self._timed_s += seconds
        return True

    def drop(self, name: str) -> None:
        """An item of the current stage done earlier (its outputs exist): no work left
        for it, and no rate from it."""
        w = self.work.get(self.stage)
        if w is not None:
            w.items.pop(name, None)

    def echo_line(self) -> str:
        """Prints (and returns) the current stage's ETA line."""
        return self._say(self.line())

    def item_done(self, name: str, seconds: float) -> Optional[str]:
        """:meth:`record` and print the stage line; None for an item not counted."""
        return self.echo_line() if self.record(name, seconds) else None

    def skip(self, stage: str) -> None:
        """``stage`` will not run in this session (done earlier): nothing left, no rate."""
        self.finished.add(stage)

    def finish(self, stage: str, seconds: float) -> None:
        """Ends ``stage`` after ``seconds`` of wall time: the units not timed item by item
        (a stage timed as a whole) become one measurement of the time not spent on timed
        items; the overhead of a stage whose items were all timed is not counted."""
        w = self.work.get(stage)
        if w is not None and w.untimed > 0:
            self.rates.add(stage, seconds - self._timed_s / max(1, w.parallel), w.untimed)
            w.untimed = 0.0
        self.finished.add(stage)


class Item:
    """One item of a :meth:`StageItems.item` block; the body sets ``detail`` to the
    item's headline number ('mean paper_cca 0.71'), shown in its line."""

    def __init__(self, name: str):
        self.name, self.detail = name, ""


class StageItems:
    """The progress of one analysis stage's item loop, all in one place.

    ``names``: the stage's items in order, as ``preflight.stage_work`` names them (so
    each item's seconds go to the cost model with that item's units); ``skip``: those
    whose outputs exist, which count towards n/N but neither towards a rate nor towards
    the work left. ``tracker``: the running study's :class:`StudyProgress` (the line
    shows its stage and overall ETA), or None outside a study (the ETA is then the mean
    of the items timed here). A loop of one item prints no line (its stage line says
    it all) but is still timed::

        items = StageItems("filters", study.tracker, names, skip=done)
        for name in names_left:
            with items.item(name) as it:
                ...
                it.detail = f"mean drift {d:.2f}"
    """

    def __init__(self, kind: str, tracker: Optional[StudyProgress], names: Sequence[str], *,
                 skip: Sequence[str] = (), clock: Callable[[], float] = time.time,
                 echo: Optional[Callable] = print):
        names, skip = list(names), set(skip)
        skipped = [n for n in names if n in skip]
        if tracker is not None:
            for n in skipped:
                tracker.drop(n)
        self.tracker = tracker
        self.progress = Progress(
            kind, len(names), done_before=len(skipped), clock=clock,
            echo=echo if len(names) > 1 else None,
            eta_fn=tracker.stage_eta if tracker else None,
            overall_fn=tracker.overall_eta if tracker else None)

    @contextlib.contextmanager
    def item(self, name: str) -> Iterator[Item]:
        """Times the block as item ``name``; when it ends without an error, records its
        seconds (``StudyProgress.record``) and prints its line."""
        it, t0 = Item(name), self.progress.clock()
        yield it
        seconds = self.progress.clock() - t0
        if self.tracker is not None:
            self.tracker.record(name, seconds)
        self.progress.item_done(name, seconds, it.detail)
