"""JAX's persistent compilation cache, on by default, and compile time per run.

A study is 175 fine-tunes of a handful of shapes. Without a cache every run (and every
restart after a preemption) recompiles the same ResNet50 train/eval steps; with it a
second run of the same shapes reads the executables from disk. The cache directory is
``$MEDTRANSFER_XLA_CACHE`` or ``~/.cache/medtransfer_jax/xla`` (``--xla_cache_dir`` in the
mains; '' disables it); an explicit ``JAX_COMPILATION_CACHE_DIR`` wins.

:class:`CompileTimer` sums JAX's own compile-duration events (tracing, lowering, backend
compile or cache retrieval) while it is active, so a run can log what compilation cost it.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import jax

DEFAULT_DIR = os.environ.get("MEDTRANSFER_XLA_CACHE", "~/.cache/medtransfer_jax/xla")
#: JAX's duration events that make up "compilation" as a user feels it.
_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
           "/jax/core/compile/jaxpr_to_mlir_module_duration",
           "/jax/core/compile/backend_compile_duration")

_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_total = [0.0]
_count = [0]
_hits = [0]
_listening = [False]


def enable(cache_dir: Optional[str] = DEFAULT_DIR, min_compile_time_s: float = 0.5) -> str:
    """Turns the persistent cache on at ``cache_dir`` (unless JAX already has one set).

    Returns the directory in use ('' when disabled). Call before the first compilation.
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if not cache_dir:
        return ""
    path = os.path.expanduser(cache_dir)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    return path


def _listener(event: str, duration: float, **_):
    if event in _EVENTS:
        with _lock:
            _total[0] += float(duration)
            if event == _EVENTS[-1]:
                _count[0] += 1


def _hit_listener(event: str, **_):
    if event == _HIT_EVENT:
        with _lock:
            _hits[0] += 1


def _listen():
    with _lock:
        if _listening[0]:
            return
        _listening[0] = True
    jax.monitoring.register_event_duration_secs_listener(_listener)
    jax.monitoring.register_event_listener(_hit_listener)


class CompileTimer:
    """``with CompileTimer() as t: ...`` -> ``t.seconds`` spent compiling in the block,
    ``t.programs`` backend compilations (cache hits included) and ``t.cache_hits`` (programs
    read from the persistent cache) in this process."""

    def __init__(self):
        _listen()
        self.seconds, self.programs, self.cache_hits = 0.0, 0, 0
        self.start()

    def start(self) -> "CompileTimer":
        with _lock:
            self._t0, self._n0, self._h0 = _total[0], _count[0], _hits[0]
        return self

    def elapsed(self):
        """(seconds, programs, persistent-cache hits) since :meth:`start`."""
        with _lock:
            return _total[0] - self._t0, _count[0] - self._n0, _hits[0] - self._h0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.seconds, self.programs, self.cache_hits = self.elapsed()
        return False
