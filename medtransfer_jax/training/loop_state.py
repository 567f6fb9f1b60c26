"""The loop's own state besides the TrainState: phase, early stopping, best step.

It is saved as the ``meta`` JSON item of every checkpoint (checkpointing.py), so a
resumed run continues with the same counters and logs the same interval means as an
uninterrupted one. A dataclass rather than a dict of dicts: a typo is an AttributeError,
and :meth:`LoopState.from_json` rejects a checkpoint written by an incompatible version.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional

VERSION = 2


def improved(value: Optional[float], best: Optional[float], mode: str, min_delta: float) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` ('min' | 'max').

    A non-finite (or missing) value never improves, so a NaN validation loss cannot
    become the best model.
    """
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@dataclasses.dataclass
class EarlyStopping:
    """Per-phase counters: best monitored value, its step, evaluations without gain."""

    best: Optional[float] = None
    best_step: Optional[int] = None
    wait: int = 0


@dataclasses.dataclass
class Best:
    """The best evaluation of the final phase: the model that is exported and tested."""

    value: Optional[float] = None
    step: Optional[int] = None
    metric: Optional[str] = None
    metrics: Optional[Dict[str, Any]] = None


@dataclasses.dataclass
class LoopState:
    """Everything besides arrays and the data position that a resumed run needs.

    phase / phase_start: index of the current phase and the global step it began at;
    phase_done: early stopping ended it; es: its early-stopping counters; best: the
    final phase's best evaluation; last_val: the latest validation metrics (+ 'step');
    pending_train: per-step train metrics since the last log line.
    """

    phase: int = 0
    phase_start: int = 0
    phase_done: bool = False
    es: EarlyStopping = dataclasses.field(default_factory=EarlyStopping)
    best: Best = dataclasses.field(default_factory=Best)
    stopped_early: bool = False
    last_val: Optional[Dict[str, Any]] = None
    pending_train: List[Dict[str, float]] = dataclasses.field(default_factory=list)

    def start_phase(self, index: int, step: int) -> None:
        """Moves to phase ``index`` at global ``step`` with fresh early-stopping counters."""
        self.phase, self.phase_start, self.phase_done = index, step, False
        self.es = EarlyStopping()

    def record_eval(self, step: int, metrics: Dict[str, Any], monitor: str, mode: str,
                    min_delta: float, final_phase: bool) -> bool:
        """Updates the counters with one validation result; True if it is a new best of
        the final phase (the checkpoint to keep and export)."""
        self.last_val = dict(metrics, step=step)
        value = metrics[monitor]
        if not improved(value, self.es.best, mode, min_delta):
            self.es.wait += 1
            return False
        self.es = EarlyStopping(best=float(value), best_step=step, wait=0)
        if final_phase:
            self.best = Best(value=float(value), step=step, metric=monitor, metrics=dict(metrics))
        return final_phase

    def to_json(self) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), version=VERSION)

    @classmethod
    def from_json(cls, d: Dict[str, Any], where: str) -> "LoopState":
        """Parses a saved ``meta`` item; ValueError naming ``where`` if it is not ours."""
        if d.get("version") == 1:  # the dict of dicts before this class: same fields
            d = dict(d, best={k: v for k, v in d["best"].items() if k != "rank"}, version=VERSION)
        if d.get("version") != VERSION:
            raise ValueError(f"{where}: loop state version {d.get('version')!r}, expected "
                             f"{VERSION}; it was written by another version of medtransfer_jax")
        d = {k: v for k, v in d.items() if k != "version"}
        try:
            return cls(**dict(d, es=EarlyStopping(**d["es"]), best=Best(**d["best"])))
        except (TypeError, KeyError) as e:
            raise ValueError(f"{where}: malformed loop state ({e})") from None
