"""Device-resident input vs a batch already in device memory: what the input costs a step.

Both variants run the project's jitted train step on the same model and batch size, in
the same process, one after the other:

* ``in_memory``: one fixed, already-normalised float batch on the mesh (the upper bound:
  no input work at all);
* ``device_cache``: each step sends only int32 indices; the uint8 split on the device is
  gathered, augmented (the studies' flip + affine warp) and normalised in jit
  (data/device_cache.py), then the train step runs.

The ratio ``device_cache / in_memory`` step time is the cost of the input path (target
on a GPU: < 1.05).
"""
from __future__ import annotations

from typing import Any, Dict, List

import jax
import numpy as np

from medtransfer_jax.bench import common
from medtransfer_jax.bench.train_throughput import make_train_state_and_step
from medtransfer_jax.data import device_cache
from medtransfer_jax.data.config import default_augment_config
from medtransfer_jax import sharding

COLUMNS = ["input", "depth", "image_size", "batch", "dtype", "devices", "cache_mb",
           "compile_s", "step_ms", "img_per_s", "vs_in_memory"]


def run(*, depth: int = 50, image_size: int = 224, batch_size: int = 32,
        dtype: str = "float32", num_examples: int = 512, width: int = 64,
        iters: int = 3, repeats: int = 2) -> List[Dict[str, Any]]:
    mesh = sharding.make_mesh()
    state, train_step = make_train_state_and_step(mesh, depth=depth, image_size=image_size,
                                                  dtype=dtype, width=width)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_examples, image_size, image_size, 1), np.uint8)
    labels = rng.integers(0, 2, num_examples).astype(np.int32)
    cache = device_cache.DeviceCache(images, labels, mesh)
    batch_fn = cache.make_batch_fn("caffe", augment=default_augment_config(), seed=0)
    order = device_cache.TrainOrder(num_examples, batch_size, seed=0)
    fixed = jax.device_get(batch_fn(order.indices(0), 0))
    fixed = sharding.make_global_batch(mesh, {k: fixed[k] for k in ("image", "label", "weight")})

    holder = {"state": state, "step": 0}

    def in_memory():
        holder["state"], m = train_step(holder["state"], fixed)
        return m["loss"]

    def cached():
        s = holder["step"]
        holder["step"] += 1
        b = batch_fn(order.indices(s), s)
        holder["state"], m = train_step(holder["state"],
                                        {k: b[k] for k in ("image", "label", "weight")})
        return m["loss"]

    rows = []
    base_ms = None
    for name, fn in (("in_memory", in_memory), ("device_cache", cached)):
        t = common.time_fn(fn, iters=iters, repeats=repeats, sync=lambda x: x.block_until_ready())
        step_ms = t["median_s"] * 1e3
        base_ms = step_ms if base_ms is None else base_ms
        rows.append(dict(input=name, depth=depth, image_size=image_size, batch=batch_size,
                         dtype=dtype, devices=mesh.size,
                         cache_mb=cache.nbytes / 2 ** 20 if name == "device_cache" else 0.0,
                         compile_s=t["first_s"], step_ms=step_ms,
                         img_per_s=batch_size / t["median_s"], vs_in_memory=step_ms / base_ms))
        common.progress_row(rows[-1], COLUMNS)
    return rows
