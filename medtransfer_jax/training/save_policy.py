"""When a run writes a checkpoint, and how the best model waits on the device until then.

Saving at every evaluation cost most of a short epoch: about 90 % of the scaled-down
grid's epoch on the CPU (BENCHMARKS.md section 8; orbax writes a directory tree per save,
whatever the model size), and a 175-run study evaluates every epoch. So a run now saves

* at an evaluation when ``checkpoint.every_secs`` have passed since its last save (0:
  at every evaluation, the old behaviour);
* every ``checkpoint.every_steps`` steps, at each phase's end (and early stop), and on
  SIGTERM or a preemption notice (then it stops);

and a new best between saves is copied on the device (:class:`BestSnapshot`: the state,
the data position and the loop state *of that step*) and written, as its own protected
checkpoint, just before the next save. So the checkpoints on disk are exactly those the
old policy would have written at those steps, and the final export takes the best from
the device instead of restoring it. A hard kill (SIGKILL, power loss) loses at most the
steps since the last save; resume is bit-exact from any checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

#: One program per state structure: a device-side copy (the train step donates its input).
_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


class _FrozenIteratorState:
    """The data position of an earlier step, in the shape grain's checkpoint handler saves
    (``get_state() -> bytes``; a DatasetIterator's dict is stored as the same JSON)."""

    def __init__(self, state):
        self._bytes = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._bytes


@dataclasses.dataclass
class BestSnapshot:
    """The best step's state (a device copy), data position and loop-state JSON."""

    step: int
    state: Any
    iterator: _FrozenIteratorState
    meta: Dict[str, Any]
    saved: bool = False

    @classmethod
    def take(cls, step: int, state, train_iter, meta: Dict[str, Any]) -> "BestSnapshot":
        return cls(int(step), _copy(state), _FrozenIteratorState(train_iter.get_state()),
                   meta)


def time_due(every_secs: float, last_save: float) -> bool:
    """Whether an evaluation should save: ``every_secs`` <= 0, or that long since the last
    save (``time.monotonic()`` seconds). All processes follow process 0's clock, so a
    multi-host save (a collective) starts everywhere or nowhere."""
    due = every_secs <= 0 or time.monotonic() - last_save >= every_secs
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
    return due


def save_pending_best(ckpt, snapshot: Optional[BestSnapshot], best_step: Optional[int],
                      step: int) -> None:
    """Writes ``snapshot`` as its own checkpoint before the save at ``step``, if it is still
    the best, older than ``step`` and not on disk yet."""
    if (snapshot is None or snapshot.saved or snapshot.step != best_step
            or snapshot.step >= step):
        return
    ckpt.save(snapshot.step, snapshot.state, snapshot.iterator, snapshot.meta,
              protect=snapshot.step)
    snapshot.saved = True
