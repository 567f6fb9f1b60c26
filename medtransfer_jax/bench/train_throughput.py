"""ResNet train-step throughput: images/s, step time, compile time, MFU; vs PyTorch.

Benchmarks the project's own jitted step (training/step.py) over a data mesh of
``num_devices`` devices, on random device-resident batches (so the input pipeline is
excluded; bench/pipeline.py measures that separately). FLOPs per step are counted on the
step's jaxpr by ``jax.experimental.roofline`` (every convolution and matrix product, the
backward pass included), so MFU = flops/step / step_time / peak is the model's own
arithmetic on any backend. XLA's cost analysis is only the fallback: on GPU it undercounts,
the compiled program's convolutions being cuDNN custom calls that count 0 FLOPs, and with
jax 0.11.2 the lowered program's too (0.40 instead of 22.2 GFLOP per 224 px image on an
H200, which read as an MFU of 0.27 %).
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medtransfer_jax.bench import common, torch_reference
from medtransfer_jax.models import resnet
from medtransfer_jax.training import optim, state as state_lib, step as step_lib
from medtransfer_jax import sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _train_cfg(lr: float = 1e-3) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(optimizer="adam", lr=lr, schedule="constant"))


def program_flops(program) -> Optional[float]:
    """FLOPs of one call of a lowered or compiled XLA program (None if XLA won't say)."""
    try:
        analysis = program.cost_analysis()
    except Exception:
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return None
    flops = analysis.get("flops")
    return float(flops) if flops and flops > 0 else None


@contextlib.contextmanager
def _quiet_roofline():
    """roofline logs a multi-line warning for each primitive it has no rule for (reshard,
    which moves no arithmetic): kept out of the bench's output. Every logger is held at
    ERROR for the count (jax 0.10 logs it through absl's; on the H200's jax 0.11.2 it got
    past a level set on absl's alone)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def model_flops(fn, *args) -> Optional[float]:
    """FLOPs of one call of ``fn(*args)`` over the whole mesh, counted on its jaxpr (the
    same on every backend); None if the count fails."""
    from jax.experimental import roofline
    try:
        with _quiet_roofline():
            _, result = roofline.roofline(fn)(*args)
    except Exception:  # an experimental API: fall back to XLA's cost analysis
        return None
    return float(result.unfused_flops) if result.unfused_flops > 0 else None


def make_train_state_and_step(mesh, *, depth: int, image_size: int, dtype: str, width: int,
                              num_classes: int = 2, layout: str = "keras_v1"):
    """(sharded TrainState, jitted train step) of the project's own step: Adam, dropout 0.5,
    a ``num_classes`` head, random weights; what every train-step benchmark times."""
    model = resnet.ResNet(depth=depth, layout=layout, num_classes=num_classes, width=width,
                          dropout_rate=0.5, dtype=DTYPES[dtype])
    variables = resnet.init_variables(model, jax.random.key(0), image_size)
    tx = optim.make_optimizer(_train_cfg(), variables["params"], "none", total_steps=1000)
    make_sh = functools.partial(sharding.state_shardings, mesh)
    state, state_sh = state_lib.create_sharded_state(
        variables, tx, jax.random.key_data(jax.random.key(1)), make_sh)
    return state, step_lib.make_train_step(model, tx, mesh, state_sh, num_classes=num_classes)


def bench_jax_step(*, depth: int = 50, image_size: int = 224, batch_size: int = 32,
                   dtype: str = "float32", num_devices: Optional[int] = None,
                   width: int = 64, num_classes: int = 2, iters: int = 3,
                   repeats: int = 2, layout: str = "keras_v1") -> Dict[str, Any]:
    """Times the project's train step; returns a table row."""
    mesh = sharding.make_mesh(num_devices)
    state, train_step = make_train_state_and_step(mesh, depth=depth, image_size=image_size,
                                                  dtype=dtype, width=width,
                                                  num_classes=num_classes, layout=layout)

    rng = np.random.default_rng(0)
    batch = sharding.make_global_batch(mesh, {
        "image": rng.standard_normal((batch_size, image_size, image_size, 3), np.float32),
        "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
        "weight": np.ones(batch_size, np.float32)})

    import time
    t0 = time.perf_counter()
    lowered = train_step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    # The jaxpr's count first; XLA's lowered program is the global computation and the
    # compiled one is per device (both undercount convolutions on GPU).
    flops = (model_flops(train_step, state, batch) or program_flops(lowered)
             or (program_flops(compiled) or 0.0) * mesh.size or None)

    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics["loss"]

    t = common.time_fn(run, iters=iters, repeats=repeats, sync=lambda x: x.block_until_ready())
    step_s = t["median_s"]
    kind = jax.devices()[0].device_kind
    peak = common.peak_flops(kind, dtype)
    n_dev = mesh.size
    row = dict(framework="jax", depth=depth, image_size=image_size, batch=batch_size,
               dtype=dtype, devices=n_dev, compile_s=compile_s, step_ms=step_s * 1e3,
               img_per_s=batch_size / step_s,
               gflop_per_img=(flops / batch_size / 1e9) if flops else float("nan"),
               # "n/a": no peak on record (common.mfu_note) or no FLOP count from XLA
               mfu=(flops / step_s / (peak * n_dev)) if (flops and peak) else "n/a")
    return row


def bench_torch_step(*, depth: int = 50, image_size: int = 224, batch_size: int = 32,
                     dtype: str = "float32", num_classes: int = 2, iters: int = 3,
                     repeats: int = 2, compile: bool = False) -> Optional[Dict[str, Any]]:
    if not torch_reference.available():
        common.progress("torch/torchvision not installed: skipping the PyTorch comparison "
                        "(pip install -e .[test]).")
        return None
    t = torch_reference.time_train_step(batch_size=batch_size, image_size=image_size,
                                        dtype=dtype, num_classes=num_classes, iters=iters,
                                        repeats=repeats, depth=depth, compile=compile)
    return dict(framework="torch.compile" if compile else "torch", depth=depth,
                image_size=image_size, batch=batch_size,
                dtype=dtype, devices=1, compile_s=t["first_s"], step_ms=t["median_s"] * 1e3,
                img_per_s=batch_size / t["median_s"], gflop_per_img=float("nan"),
                mfu="n/a")  # no FLOP count for the torch step


def run(*, depth: int = 50, image_sizes: Sequence[int] = (224,),
        batch_sizes: Sequence[int] = (16,), dtypes: Sequence[str] = ("float32",),
        device_counts: Sequence[Optional[int]] = (None,), compare_torch: bool = True,
        iters: int = 3, repeats: int = 2, width: int = 64,
        torch_compile: bool = False) -> List[Dict[str, Any]]:
    """Grid over image size x batch x dtype x device count; torch row + ratio per cell.

    torch.compile rows come last, after every JAX and eager-torch cell: its compilation
    is the slowest part, and a run stopped by a timeout should lose only those rows."""
    rows, cells = [], []
    for size in image_sizes:
        for bs in batch_sizes:
            for dt in dtypes:
                for nd in device_counts:
                    row = bench_jax_step(depth=depth, image_size=size, batch_size=bs,
                                         dtype=dt, num_devices=nd, iters=iters,
                                         repeats=repeats, width=width)
                    rows.append(row)
                    common.progress_row(row, COLUMNS)
                cells.append((size, bs, dt))
                _torch_row(rows, size, bs, dt, compiled=False, depth=depth, width=width,
                           compare_torch=compare_torch, iters=iters, repeats=repeats)
    if torch_compile:
        for size, bs, dt in cells:
            _torch_row(rows, size, bs, dt, compiled=True, depth=depth, width=width,
                       compare_torch=compare_torch, iters=iters, repeats=repeats)
    return rows


def _torch_row(rows, size, bs, dt, *, compiled, depth, width, compare_torch, iters, repeats):
    """Appends the torchvision row of one cell, with the JAX/torch ratio (the JAX row
    carries the ratio to eager torch)."""
    if not (compare_torch and width == 64):
        return
    trow = bench_torch_step(depth=depth, image_size=size, batch_size=bs, dtype=dt,
                            iters=iters, repeats=repeats, compile=compiled)
    if not trow:
        return
    jax_1dev = [r for r in rows if r["framework"] == "jax" and r["image_size"] == size
                and r["batch"] == bs and r["dtype"] == dt][0]
    trow["jax_speedup"] = jax_1dev["img_per_s"] / trow["img_per_s"]
    if not compiled:
        jax_1dev["jax_speedup"] = trow["jax_speedup"]
    rows.append(trow)
    common.progress_row(trow, COLUMNS)


COLUMNS = ["framework", "depth", "image_size", "batch", "dtype", "devices", "compile_s",
           "step_ms", "img_per_s", "gflop_per_img", "mfu", "jax_speedup"]
