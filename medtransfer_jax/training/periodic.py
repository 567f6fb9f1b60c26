"""Small big_vision-style helpers the loop is written with: metric writers, throughput /
ETA, a profiler window, the SIGTERM flag and the hook interface tests use.

(clu's ``metric_writers`` import TensorFlow at package import, so the JSONL + tensorboardX
writer lives here instead; it has the same ``write_scalars(step, dict)`` shape.)
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from typing import Any, Dict, Optional, Protocol, Sequence

import jax
import numpy as np
from absl import logging

from medtransfer_jax import interrupts, paths


def _import_summary_writer():
    """tensorboardX's SummaryWriter without importing torch.

    ``tensorboardX.writer`` runs ``try: import torch`` at import only to accept torch
    tensors; we log floats, and loading torch costs ~1.5 s of the demo's ~25 s on a
    2-core CPU. torch is hidden for that one import unless something loaded it already.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter as writer_cls
        return writer_cls
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter as writer_cls
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return writer_cls


SummaryWriter = _import_summary_writer()

METRICS_FILE = "metrics.jsonl"


def every(step: int, n: int) -> bool:
    """True every ``n`` steps (never for n <= 0)."""
    return n > 0 and step % n == 0


class MetricWriter:
    """``metrics.jsonl`` (one JSON per event) + TensorBoard scalars, on process 0 only.

    On resume, events after ``resume_step`` (and any final evaluation) are dropped from the
    JSONL first: the resumed run recomputes them identically, so the file ends up the same
    as an uninterrupted run's. The JSONL goes through :mod:`medtransfer_jax.paths` (a
    ``gs://`` workdir stays a bucket path; there each write rewrites the object, fine at
    one event per ``log.every_steps``); TensorBoard gets the logdir as a string, which
    tensorboardX writes to ``gs://`` itself (with ``google-cloud-storage`` installed).
    Other processes write nothing: one writer per shared file.
    """

    def __init__(self, workdir: paths.PathLike, resume_step: Optional[int]):
        self.enabled = jax.process_index() == 0
        self.path = paths.join(workdir, METRICS_FILE)
        self.tb = None
        if not self.enabled:
            return
        keep = _events_up_to(self.path, resume_step) if resume_step is not None else []
        paths.write_text_atomic(self.path, "".join(keep))
        self.tb = SummaryWriter(paths.to_str(paths.join(workdir, "tb")), flush_secs=30,
                                purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, split: str, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "split": split, "time": time.time()}
        rec.update({k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
                    for k, v in values.items()})
        paths.append_text(self.path, json.dumps(rec, default=str) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(v):
                self.tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _events_up_to(path: paths.PathLike, step: int) -> list:
    """Lines of a metrics JSONL with step <= ``step`` and no final evaluation."""
    if not paths.exists(path):
        return []
    keep = []
    for line in paths.read_text(path).splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= step and not str(rec.get("split", "")).startswith("final_"):
            keep.append(line if line.endswith("\n") else line + "\n")
    return keep


class Throughput:
    """Images/s since the last report (the first step, which compiles, is excluded) and
    the ETA of ``remaining`` steps at that rate."""

    def __init__(self, global_batch: int):
        self.gbs = global_batch
        self.t0, self.steps, self.compiled = time.time(), 0, False

    def tick(self, metrics: Any) -> None:
        if not self.compiled:
            jax.block_until_ready(metrics)
            self.t0, self.compiled = time.time(), True
        else:
            self.steps += 1

    def report(self, remaining: int) -> Dict[str, float]:
        out = self.peek(remaining)
        self.t0, self.steps = time.time(), 0
        return out

    def peek(self, remaining: int) -> Dict[str, float]:
        """:meth:`report` without starting a new interval (a heartbeat line)."""
        dt = time.time() - self.t0
        ips = self.steps * self.gbs / dt if dt > 0 and self.steps else float("nan")
        eta = remaining * self.gbs / ips if np.isfinite(ips) and ips > 0 else float("nan")
        return {"img_per_s": ips, "eta_s": eta}


class Stages:
    """Seconds per named stage of a run, for ``results.json``'s ``timing``: where a run's
    fixed cost goes (data decode, integrity check, model init, evaluation, checkpoint
    saves, final predictions), so a study's per-run overhead is measured, not guessed.

    ``with stages("eval"): ...`` adds the block's wall time to ``eval``.
    """

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


class Profiler:
    """A ``jax.profiler`` trace of ``num_steps`` steps starting after step ``start``
    (``log.profile_steps`` / ``log.profile_start``), written to ``logdir`` for TensorBoard
    / Perfetto. Process 0 only; a no-op with num_steps=0."""

    def __init__(self, logdir: str, start: int, num_steps: int):
        self.logdir, self.start, self.stop = logdir, int(start), int(start) + int(num_steps)
        self.enabled = num_steps > 0 and jax.process_index() == 0
        self.active = False

    def after_step(self, step: int, state: Any) -> None:
        if not self.enabled:
            return
        if self.start <= step < self.stop and not self.active:  # a resumed run: from here
            jax.profiler.start_trace(self.logdir)
            self.active, self.first = True, step + 1
        elif step >= self.stop and self.active:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active, self.enabled = False, False
            logging.info("profile of steps %d..%d written to %s", self.first, step,
                         self.logdir)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


class Hook(Protocol):
    """Callbacks the loop calls; tests pass some in (fault injection) to interrupt a run at
    a chosen point without any test code in the production path. Every method optional."""

    def after_step(self, step: int, state: Any) -> None: ...

    def after_save(self, step: int) -> None: ...


def call_hooks(hooks: Sequence[Any], name: str, *args) -> None:
    for hook in hooks:
        fn = getattr(hook, name, None)
        if fn is not None:
            fn(*args)


class StopFlag:
    """Turns SIGTERM into a flag checked after each step (single-process runs only;
    multi-host runs rely on JAX's preemption sync point, which all hosts agree on).

    Inside a study/sweep (``medtransfer_jax.interrupts.graceful``) the outer handler is
    chained, so the study stops after this run too; and a stop requested there (Ctrl-C,
    or SIGTERM while this loop runs in a worker thread, where no handler can be
    installed) reads as this flag.
    """

    def __init__(self):
        self._signal: Optional[int] = None
        self._previous = None
        self._single = False

    @property
    def signal(self) -> Optional[int]:
        if self._signal is None and self._single:
            return interrupts.requested()
        return self._signal

    def install(self) -> "StopFlag":
        self._single = jax.process_count() == 1
        if not self._single or threading.current_thread() is not threading.main_thread():
            return self
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self._signal = signum
        logging.warning("received signal %d: will save a checkpoint after this step and stop",
                        signum)
        if callable(self._previous):  # an outer study/sweep stops after this run too
            self._previous(signum, frame)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
