"""A new process's data start: the integrity check and the decode + resize of its splits,
with the on-disk decode store off, empty (the first process) and filled (every later one).

This is the fixed cost that ``study --mode=subprocess``, ``sweep`` and a run restarted
after a preemption pay per run (an in-process study pays it once per target, through the
decode memo). Writes ``num_images`` textured image files of ``source_size`` px (grey like
X-rays, JPEG or PNG) in two class folders, splits them 70/15/15 like a fold, and times
each mode as a new process starts it: an empty decode memo, no file known to be readable.
The three modes alternate in each of ``repeats`` rounds (a fresh store each round); the
median round is reported.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Dict, List, Sequence

import numpy as np

from medtransfer_jax.bench import pipeline as pipeline_bench
from medtransfer_jax.data import as_new_process, device_cache, integrity, sources
from medtransfer_jax.data.base import DatasetSplits, SubsetSource

COLUMNS = ["store", "images", "source_px", "image_size", "check_s", "decode_s", "total_s",
           "img_per_s", "vs_off"]
MODES = ("off", "empty", "filled")


def _splits(src) -> DatasetSplits:
    order = np.random.default_rng(0).permutation(len(src))
    a, b = int(0.7 * len(src)), int(0.85 * len(src))
    part = lambda idx: SubsetSource(src, np.sort(idx))  # noqa: E731
    return DatasetSplits(train=part(order[:a]), val=part(order[a:b]), test=part(order[b:]),
                         num_classes=len(src.class_names), class_names=src.class_names,
                         name="bench")


def _start(splits: DatasetSplits, image_size: int) -> Dict[str, float]:
    t0 = time.perf_counter()
    integrity.check_splits(splits)
    t1 = time.perf_counter()
    for part in (splits.train, splits.val, splits.test):
        device_cache.decode_split(part, image_size)
    t2 = time.perf_counter()
    return {"check_s": t1 - t0, "decode_s": t2 - t1, "total_s": t2 - t0}


def run(num_images: int = 512, source_size: int = 1024, image_sizes: Sequence[int] = (224,),
        fmt: str = "jpeg", repeats: int = 3, grey: bool = True) -> List[Dict]:
    """One row per (image size, mode): seconds of the check, the decode and both."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        pipeline_bench.write_images(folder, num_images, source_size, fmt, grey)
        for size in image_sizes:
            times = {m: [] for m in MODES}
            for r in range(repeats):
                root = os.path.join(tmp, f"store-{size}-{r}")
                for mode in MODES:
                    with as_new_process("" if mode == "off" else root):
                        splits = _splits(sources.ImageFolderSource(folder))
                        times[mode].append(_start(splits, size))
            off = statistics.median(t["total_s"] for t in times["off"])
            for mode in MODES:
                med = {k: statistics.median(t[k] for t in times[mode])
                       for k in ("check_s", "decode_s", "total_s")}
                rows.append({"store": mode, "images": num_images, "source_px": source_size,
                             "image_size": size, **{k: round(v, 3) for k, v in med.items()},
                             "img_per_s": round(num_images / med["total_s"], 1),
                             "vs_off": round(med["total_s"] / off, 3)})
    return rows


NOTE = ("check_s: the integrity check (every file verified and decoded once); decode_s: "
        "every split decoded and resized for data.cache=device|host; 'off': "
        "MEDTRANSFER_DECODE_CACHE=''; 'empty': a first process, which also writes the store; "
        "'filled': any later process; vs_off: total_s / off's total_s, same run")
