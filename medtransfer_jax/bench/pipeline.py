"""Input-pipeline throughput: decode + resize + augment + normalise + batch, images/s.

Writes ``num_images`` random-texture JPEG or PNG files (``source_size`` px, grey like
X-rays or RGB) to a temporary folder, builds an ImageFolderSource and the training
iterator (with the studies' augmentation), and times ``num_images`` images (whole
batches) after ``warmup_batches`` batches (worker start-up and first decodes excluded),
for each output size and worker count.

    python -m medtransfer_jax.bench.pipeline --image_size=224 --fmt=jpeg
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from medtransfer_jax.data import config as data_config
from medtransfer_jax.data import pipeline, sources


def write_images(folder: str, num_images: int, size: int, fmt: str, grey: bool, seed: int = 0) -> None:
    """``num_images`` files in two class folders; textures so JPEG/PNG sizes are realistic."""
    rng = np.random.default_rng(seed)
    ext = {"jpeg": "jpg", "png": "png"}[fmt]
    for c in ("a", "b"):
        os.makedirs(os.path.join(folder, c), exist_ok=True)
    coarse = max(4, size // 16)
    for i in range(num_images):
        base = rng.integers(0, 256, (coarse, coarse) if grey else (coarse, coarse, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, np.asarray(img).shape)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        path = os.path.join(folder, "ab"[i % 2], f"{i:05d}.{ext}")
        img.save(path, quality=90) if fmt == "jpeg" else img.save(path)


def run(image_size: int = 224, worker_counts: Sequence[int] = (0, 1, 2), num_images: int = 256,
        fmt: str = "jpeg", source_size: int = 512, batch_size: int = 32, warmup_batches: int = 2,
        measure_batches: Optional[int] = None, grey: bool = True, augment: bool = True, *,
        image_sizes: Sequence[int] = ()) -> List[Dict]:
    """One row per (output size, worker count): {'workers', 'fmt', 'image_size', 'images',
    'images_per_s', ...}; 'images' is the count timed.

    ``num_images`` files are written once and every row times ``num_images`` of them
    (whole batches: ``measure_batches`` defaults to num_images // batch_size, the batch
    shrinks to num_images if that is smaller). ``image_sizes``: several output sizes from
    the same files (default ``[image_size]``).
    """
    batch_size = min(batch_size, num_images)
    measure_batches = measure_batches or num_images // batch_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_images(tmp, num_images, source_size, fmt, grey)
        src = sources.ImageFolderSource(tmp)
        aug = data_config.default_augment_config() if augment else None
        for size in tuple(image_sizes) or (image_size,):
            for workers in worker_counts:
                dt = _time_batches(src, size, batch_size, aug, workers, warmup_batches,
                                   measure_batches)
                n = measure_batches * batch_size
                rows.append({"workers": int(workers), "fmt": fmt, "image_size": size,
                             "source_size": source_size, "grey": grey, "augment": augment,
                             "images": n, "seconds": round(dt, 3),
                             "images_per_s": round(n / dt, 1)})
    return rows


def _time_batches(src, image_size, batch_size, aug, workers, warmup_batches,
                  measure_batches) -> float:
    """Seconds for ``measure_batches`` batches after ``warmup_batches`` (worker start-up
    and first decodes excluded)."""
    it = pipeline.make_train_iter(src, image_size=image_size, preprocessing="caffe",
                                  global_batch_size=batch_size, seed=0, augment=aug,
                                  process_index=0, process_count=1, worker_count=workers)
    try:
        for _ in range(warmup_batches):
            next(it)
        t0 = time.perf_counter()
        for _ in range(measure_batches):
            batch = next(it)
        dt = time.perf_counter() - t0
    finally:
        if hasattr(it, "close"):
            it.close()
    assert batch["image"].shape == (batch_size, image_size, image_size, 3)
    return dt


def format_table(rows: List[Dict]) -> str:
    head = "| format | source px | output px | augment | workers | images/s |\n|---|---|---|---|---|---|"
    lines = [f"| {r['fmt']}{' grey' if r['grey'] else ' rgb'} | {r['source_size']} | {r['image_size']} | "
             f"{'yes' if r['augment'] else 'no'} | {r['workers']} | {r['images_per_s']} |" for r in rows]
    return "\n".join([head] + lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--source_size", type=int, default=512)
    ap.add_argument("--fmt", choices=("jpeg", "png"), nargs="+", default=["jpeg", "png"])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num_images", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--measure_batches", type=int, default=None)
    ap.add_argument("--rgb", action="store_true")
    ap.add_argument("--no_augment", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for fmt in args.fmt:
        rows += run(args.image_size, args.workers, args.num_images, fmt, args.source_size, args.batch_size,
                    measure_batches=args.measure_batches, grey=not args.rgb, augment=not args.no_augment)
    print(format_table(rows))


if __name__ == "__main__":
    main()
