"""Where the train step's device time goes: a profiler trace of the jitted step, summed per op.

The H200 record (BENCHMARKS.md section 10) put the ResNet50 bf16 step at 14.8 % MFU
against a 35 % target, and the next move must follow a profile, not a guess. This runs
the same step as ``bench train`` (training/step.py, random device-resident batches),
traces ``steps`` of them with ``jax.profiler``, reads the trace back
(``jax.profiler.ProfileData``) and sums the device's op time per step:

* by category (collectives, cuDNN convolutions, matmuls, reduction fusions such as batch-norm
  statistics, elementwise fusions, copies/transposes, other), with each category's share
  of the step's wall time; the rest of the wall time is ``idle`` (the device waiting on
  the host, or gaps between kernels);
* the ops that take the most time, by name.

On a GPU the ops are the kernels of the device plane's ``XLA Ops`` line (else its
streams). On the CPU (tests) they are the XLA:CPU thunks, which run on several threads
at once, so their sum can exceed the wall time there.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import numpy as np

from medtransfer_jax import sharding
from medtransfer_jax.bench import train_throughput

#: ms and calls are per step (bench step_profile) or over the whole benchmark
#: (``--profile_ops`` on any bench); share_of_wall is of the same wall time.
COLUMNS = ["what", "ms", "share_of_wall", "calls"]
#: (category, substrings of an op name that put it there), first match wins.
CATEGORIES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("collective", ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "nccl",
                    "collective")),
    # cuDNN's kernels: fprop / dgrad / wgrad implicit GEMMs, named by their HLO op when
    # the trace has it (cudnn-conv...), else by the kernel (sm90_xmma_fprop_...).
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "cudnn")),
    ("matmul", ("gemm", "dot", "cublas", "matmul")),
    ("copy/transpose", ("copy", "transpose", "bitcast", "memcpy", "memset")),
    ("reduction fusion", ("reduce",)),
    ("elementwise fusion", ("fusion",)),
)


def category(op_name: str) -> str:
    """The category of an HLO op / kernel name (:data:`CATEGORIES`), else 'other'."""
    low = op_name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _op_events(profile) -> List[Tuple[str, float, str]]:
    """(op name, seconds, text to categorise) of every op execution in the trace: the
    kernels of a GPU/TPU plane's 'XLA Ops' line (else its stream lines), named by their
    HLO op where the event says it; on a CPU-only trace, the events with an ``hlo_op``."""
    def event(e):
        stats = dict(e.stats)
        op = str(stats.get("hlo_op") or e.name)
        return op, e.duration_ns * 1e-9, f"{op} {e.name}"

    out: List[Tuple[str, float, str]] = []
    for plane in (p for p in profile.planes if p.name.startswith("/device:")):
        lines = list(plane.lines)
        ops = [ln for ln in lines if ln.name == "XLA Ops"] or \
            [ln for ln in lines if ln.name.startswith("Stream")]
        out += [event(e) for ln in ops for e in ln.events if e.duration_ns > 0]
    if out:
        return out
    return [event(e) for plane in profile.planes for ln in plane.lines for e in ln.events
            if e.duration_ns > 0 and "hlo_op" in dict(e.stats)]


def summarize(events: Sequence[Tuple[str, float, str]], steps: int, wall_s: float,
              top: int = 12) -> List[Dict[str, Any]]:
    """Rows: the step's wall time, device busy time and idle share, then the categories
    (largest first), then the ``top`` ops by time; all per step. ``events``: (op name,
    seconds, text whose words pick the category)."""
    by_cat: Dict[str, float] = collections.defaultdict(float)
    by_op: Dict[str, float] = collections.defaultdict(float)
    calls_cat: Dict[str, int] = collections.Counter()
    calls_op: Dict[str, int] = collections.Counter()
    for name, sec, text in events:
        cat = category(text)
        by_cat[cat] += sec
        by_op[name] += sec
        calls_cat[cat] += 1
        calls_op[name] += 1
    step_s = wall_s / steps
    busy = sum(by_cat.values()) / steps

    def row(what, sec, calls=float("nan")):
        return dict(what=what, ms=sec * 1e3, share_of_wall=sec / step_s,
                    calls=calls / steps if calls == calls else calls)

    rows = [row("wall", step_s), row("device busy (sum of ops)", busy),
            row("idle (wall - busy)", max(step_s - busy, 0.0))]
    rows += [row(f"category: {c}", s / steps, calls_cat[c])
             for c, s in sorted(by_cat.items(), key=lambda kv: -kv[1])]
    rows += [row(f"op: {n}", s / steps, calls_op[n])
             for n, s in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]]
    return rows


@contextlib.contextmanager
def traced_ops(trace_dir: Optional[str] = None) -> Iterator[Dict[str, Any]]:
    """Traces the block with ``jax.profiler``; the yielded dict then holds ``events``
    (:func:`_op_events`) and ``wall_s``. The block must wait for its device work (the
    trace stops when it ends). ``trace_dir``: keep the trace there, else a temporary one."""
    from jax.profiler import ProfileData
    where = trace_dir or tempfile.mkdtemp(prefix="medtransfer_profile_")
    out: Dict[str, Any] = {}
    try:
        with jax.profiler.trace(where):
            t0 = time.perf_counter()
            yield out
            out["wall_s"] = time.perf_counter() - t0
        found = sorted(glob.glob(os.path.join(where, "**", "*.xplane.pb"), recursive=True))
        if not found:
            raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {where}")
        out["events"] = _op_events(ProfileData.from_file(found[-1]))
    finally:
        if trace_dir is None:
            shutil.rmtree(where, ignore_errors=True)


def run(*, depth: int = 50, image_size: int = 224, batch_size: int = 256,
        dtype: str = "bfloat16", width: int = 64, steps: int = 5,
        trace_dir: str | None = None) -> List[Dict[str, Any]]:
    """Traces ``steps`` train steps after two warm-up steps; returns :func:`summarize`'s rows
    (per step)."""
    mesh = sharding.make_mesh(None)
    state, step = train_throughput.make_train_state_and_step(
        mesh, depth=depth, image_size=image_size, dtype=dtype, width=width, num_classes=2)
    rng = np.random.default_rng(0)
    batch = sharding.make_global_batch(mesh, {
        "image": rng.standard_normal((batch_size, image_size, image_size, 3), np.float32),
        "label": rng.integers(0, 2, batch_size).astype(np.int32),
        "weight": np.ones(batch_size, np.float32)})
    for _ in range(2):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    with traced_ops(trace_dir) as prof:
        for _ in range(steps):
            state, m = step(state, batch)
        jax.block_until_ready(m)
    return summarize(prof["events"], steps, prof["wall_s"])
