"""How train-step time and CCA time grow: batch size, image size, datapoints, neurons.

Each sweep varies one parameter around a base point and reports the steady-state time,
its ratio to the sweep's first point (``rel_time``) and the ratio the FLOP count
predicts (``flop_ratio``: linear in batch and n, quadratic in image side, ~quadratic in
neurons for the QR-based CCA at n >> p). ``rel_time`` well below ``flop_ratio`` means
the small points are overhead-bound (dispatch, under-filled device).

The defaults (ResNet18, 32-64 px, p <= 256) finish in ~2-3 minutes on a 2-core CPU; pass
larger grids on an accelerator.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import jax

from medtransfer_jax.bench import common, similarity, train_throughput

COLUMNS = ["what", "varied", "batch", "image_size", "neurons", "datapoints", "time_ms",
           "compile_s", "per_s", "rel_time", "flop_ratio"]


def _row(what, varied, **kw) -> Dict[str, Any]:
    row = dict(what=what, varied=varied, batch="", image_size="", neurons="", datapoints="")
    row.update(kw)
    return row


def _relative(rows: List[Dict[str, Any]], key: str, power: float) -> None:
    """Fills rel_time / flop_ratio against the first row of one sweep."""
    t0, x0 = rows[0]["time_ms"], rows[0][key]
    for r in rows:
        r["rel_time"] = r["time_ms"] / t0
        r["flop_ratio"] = (r[key] / x0) ** power


def run(width: int = 64, depth: int = 18, *, batch_sizes: Sequence[int] = (2, 4, 8),
        image_sizes: Sequence[int] = (32, 64), base_batch: int = 4, base_image: int = 32,
        neurons: Sequence[int] = (64, 128, 256), datapoints: Sequence[int] = (2500, 10000, 40000),
        base_neurons: int = 128, base_datapoints: int = 10000, method: str = "mean_cca",
        iters: int = 2, repeats: int = 2, route: str = "qr") -> List[Dict[str, Any]]:
    """Train sweeps (batch at ``base_image``, image size at ``base_batch``) on one device,
    then CCA sweeps (neurons at ``base_datapoints``, datapoints at ``base_neurons``) on
    ``route`` (default the QR route, whose ~n p^2 growth the FLOP ratios describe)."""
    rows: List[Dict[str, Any]] = []
    cache: Dict[tuple, Dict[str, Any]] = {}  # shared base points are measured once

    def train(bs, size):
        if ("train", bs, size) not in cache:
            cache[("train", bs, size)] = train_throughput.bench_jax_step(
                depth=depth, image_size=size, batch_size=bs, width=width, num_devices=1,
                iters=iters, repeats=repeats)
        return cache[("train", bs, size)]

    for varied, points, key, power in (("batch", [(b, base_image) for b in batch_sizes],
                                        "batch", 1.0),
                                       ("image_size", [(base_batch, s) for s in image_sizes],
                                        "image_size", 2.0)):
        sweep = []
        for bs, size in points:
            t = train(bs, size)
            sweep.append(_row("train", varied, batch=bs, image_size=size,
                              time_ms=t["step_ms"], compile_s=t["compile_s"],
                              per_s=t["img_per_s"]))
            common.progress_row(sweep[-1], COLUMNS)
        if sweep:
            _relative(sweep, key, power)
        rows += sweep

    for varied, points, key, power in (("neurons", [(p, base_datapoints) for p in neurons],
                                        "neurons", 2.0),
                                       ("datapoints", [(base_neurons, n) for n in datapoints],
                                        "datapoints", 1.0)):
        sweep = []
        for p, n in points:
            if ("cca", p, n) not in cache:
                X, Y = similarity.make_data(n, p)
                cache[("cca", p, n)] = similarity.time_pair(
                    X, Y, jax.device_put(X), jax.device_put(Y), method, route, repeats=repeats,
                    baseline=False)
            t = cache[("cca", p, n)]
            sweep.append(_row(f"cca ({method})", varied, neurons=p, datapoints=n,
                              time_ms=t["jax_s"] * 1e3, compile_s=t["compile_s"],
                              per_s=n / t["jax_s"]))
            common.progress_row(sweep[-1], COLUMNS)
        if sweep:
            _relative(sweep, key, power)
        rows += sweep
    return rows
