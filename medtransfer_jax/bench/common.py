"""Shared benchmark plumbing: timing, machine facts, tables.

Timing rules used by every benchmark here (so numbers are comparable):
* compile (first call) is timed separately from steady state;
* steady state = median of ``repeats`` timed windows of ``iters`` calls each, every
  window ending with ``block_until_ready`` on the last output;
* anything compared (JAX vs PyTorch, device vs NumPy) is measured in the same process,
  one after the other, and reported as a ratio.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Sequence

# Peak dense throughput (FLOP/s) per device for MFU. bf16 tensor-core / MXU peaks from
# vendor data sheets; float32 on GPUs uses the TF32 peak only if TF32 is enabled, so
# MFU is reported against the bf16 peak for bf16 and the fp32 (non-tensor) peak else.
PEAK_FLOPS = {
    # device_kind substring: {dtype: flop/s}
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12 / 4},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12 / 4},
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12 / 4},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12 / 4},
    "TPU v6": {"bfloat16": 918e12, "float32": 918e12 / 4},
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    for key, peaks in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def mfu_note(dtypes: Sequence[str]) -> str | None:
    """The footnote for an ``n/a`` MFU cell: no peak FLOP/s on record for this device."""
    import jax

    kind = jax.devices()[0].device_kind
    missing = [d for d in dtypes if peak_flops(kind, d) is None]
    if not missing:
        return None
    where = "on CPU" if jax.default_backend() == "cpu" else f"for {kind!r}"
    return (f"mfu: n/a {where} ({', '.join(missing)}): no peak FLOP/s on record "
            "(bench/common.py PEAK_FLOPS)")


def time_fn(fn: Callable[[], Any], *, iters: int, repeats: int = 3,
            sync: Callable[[Any], Any] = lambda x: x) -> Dict[str, float]:
    """Returns {'first_s', 'median_s' (per call), 'min_s'} for ``fn``.

    The first call (compilation for jitted code) is timed on its own.
    """
    t0 = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t0
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn()
        sync(out)
        per_call.append((time.perf_counter() - t0) / iters)
    return {"first_s": first, "median_s": statistics.median(per_call), "min_s": min(per_call)}


def machine_info() -> Dict[str, str]:
    """Facts that belong next to every number in BENCHMARKS.md."""
    import jax

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": str(os.cpu_count()),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    for mod in ("flax", "optax", "grain", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # optional
            pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-markdown table (pastes straight into BENCHMARKS.md)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


_progress_header: List[str] = []


def progress(message: str) -> None:
    """A progress line: stderr, so stdout holds only the labelled report."""
    print(message, file=sys.stderr, flush=True)


def progress_row(row: Mapping[str, Any], columns: Sequence[str] | None = None) -> None:
    """``row`` as a table line on stderr as soon as it is measured (a run stopped by a
    timeout keeps it); the column header goes first, again whenever the columns change."""
    table = format_table([row], columns).splitlines()
    if table[0] != (_progress_header or [None])[0]:
        _progress_header[:] = table[:1]
        progress("\n".join(table[:2]))
    progress(table[-1])


def print_report(title: str, rows: List[Mapping[str, Any]], columns=None,
                 command: str | None = None, notes: Sequence[str] = ()):
    """The report on stdout: title, machine facts, the table, then ``notes`` (footnotes)."""
    print(f"\n## {title}\n")
    for k, v in machine_info().items():
        print(f"- {k}: {v}")
    print(f"- command: `{command or ' '.join(sys.argv)}`\n")
    print(format_table(rows, columns))
    for note in notes:
        print(f"\n{note}")
    sys.stdout.flush()


def git_revision() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"],
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"
