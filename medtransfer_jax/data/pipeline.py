"""grain input pipelines: decode, resize, 3 channels, augment, normalise, batch, shard.

Train (infinite, reshuffled every epoch)::

    range(N) -seed-> shuffle -> repeat -> random_map(read + resize + augment)
             -> [process_index::process_count] -> batch(B / P) -> map(normalise)
             -> to_iter_dataset -> (mp_prefetch with worker_count processes)

The random augmentation of stream element ``n`` is seeded by ``(seed, n)`` (grain's
``random_map``), and the shuffle by ``(seed, epoch)``, so the data order and the
augmented pixels are a pure function of the seed: the same on every run, any number of
worker processes, and after restoring the iterator state (``it.get_state()`` /
``it.set_state(state)``, or orbax via ``grain.checkpoint.CheckpointSave(it)``).

Sharding slices the *global* shuffled stream, so process ``p`` of ``P`` gets elements
``p, p + P, ...`` and the union of the per-process batches at step ``s`` is the same set
of examples whatever ``P`` is.

Eval (finite): every example exactly once across all processes, fixed batch shape,
the tail padded with ``weight=0, index=-1``.

Augmentation follows the studies' Keras ``ImageDataGenerator`` (rotation, shift, zoom,
shear, fill 'nearest', horizontal flip), applied at the output resolution with PIL's
bilinear affine transform (``affine_warp`` is the NumPy reference it is tested against).
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import grain
import numpy as np
from PIL import Image

from medtransfer_jax import preprocessing
from medtransfer_jax.data.base import DataError
from medtransfer_jax.data.config import default_augment_config

log = logging.getLogger(__name__)

_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "lanczos": Image.LANCZOS, "area": Image.BOX}
_AUG_DEFAULTS = dict(enabled=True, flip=False, vflip=False, rotation_deg=0.0, shift=0.0, zoom=0.0,
                     shear=0.0, crop=0.0, fill="nearest")


# ---------------------------------------------------------------------------------------
# Per-image operations (NumPy / PIL; all take and return uint8)
# ---------------------------------------------------------------------------------------

def resize(image: np.ndarray, size: int, method: str = "bilinear") -> np.ndarray:
    """uint8 (H, W) or (H, W, C) -> uint8 (size, size[, C]); no-op when already that size."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise DataError(f"pipeline expects uint8 images, got {image.dtype} with shape {image.shape}")
    if image.shape[0] == size and image.shape[1] == size:
        return image
    if method not in _RESAMPLE:
        raise ValueError(f"Unknown resize method {method!r}; choose one of {tuple(_RESAMPLE)}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return np.asarray(Image.fromarray(image).resize((size, size), _RESAMPLE[method]))


def augment_params(rng: np.random.Generator, cfg: Mapping[str, Any], size: Tuple[int, int]):
    """Draws one random transform: (flip_h, flip_v, M (2, 2) output->input, t (2,) pixels (y, x)).

    M composes rotation, shear and zoom about the image centre (Keras applies the same
    kinds of transform; its zoom factor > 1 means zooming *out*, as here).
    """
    h, w = size
    flip_h = bool(cfg["flip"]) and rng.random() < 0.5
    flip_v = bool(cfg["vflip"]) and rng.random() < 0.5
    theta = np.deg2rad(rng.uniform(-1, 1) * float(cfg["rotation_deg"]))
    shear = np.deg2rad(rng.uniform(-1, 1) * float(cfg["shear"]))
    zy, zx = 1.0 + rng.uniform(-1, 1, size=2) * float(cfg["zoom"])
    ty, tx = rng.uniform(-1, 1, size=2) * float(cfg["shift"]) * np.array([h, w])
    crop = float(cfg["crop"])
    if crop > 0:  # random-resized crop: a square of side s*size somewhere inside the image
        s = rng.uniform(1 - crop, 1.0)
        zy, zx = zy * s, zx * s
        ty += rng.uniform(-1, 1) * (1 - s) * h / 2
        tx += rng.uniform(-1, 1) * (1 - s) * w / 2
    # (row, col) coordinates: rotation, then shear, then zoom (all output -> input).
    c, s_ = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s_], [s_, c]])
    shr = np.array([[1.0, 0.0], [np.tan(shear), 1.0]]) if shear else np.eye(2)
    zoom = np.diag([zy, zx])
    return flip_h, flip_v, rot @ shr @ zoom, np.array([ty, tx])


@functools.lru_cache(maxsize=8)
def _centred_grid(h: int, w: int):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy - (h - 1) / 2.0, xx - (w - 1) / 2.0


def affine_warp(image: np.ndarray, matrix: np.ndarray, shift: np.ndarray, fill: str = "nearest") -> np.ndarray:
    """Bilinear resampling: output pixel p reads input at centre + matrix @ (p - centre) + shift.

    image: uint8 (H, W) or (H, W, C). fill: 'nearest' replicates the edge (Keras
    fill_mode='nearest'), 'constant' fills zeros. Returns uint8 of the same shape.
    """
    h, w = image.shape[:2]
    dy, dx = _centred_grid(h, w)
    sy = (h - 1) / 2.0 + matrix[0, 0] * dy + matrix[0, 1] * dx + shift[0]
    sx = (w - 1) / 2.0 + matrix[1, 0] * dy + matrix[1, 1] * dx + shift[1]
    outside = None
    if fill == "constant":
        outside = (sy < -0.5) | (sy > h - 0.5) | (sx < -0.5) | (sx > w - 0.5)
    elif fill != "nearest":
        raise ValueError(f"augment.fill must be 'nearest' or 'constant', got {fill!r}")
    sy = np.clip(sy, 0, h - 1)
    sx = np.clip(sx, 0, w - 1)
    y0 = np.floor(sy).astype(np.int32)
    x0 = np.floor(sx).astype(np.int32)
    wy = (sy - y0).astype(np.float32)
    wx = (sx - x0).astype(np.float32)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    img = image.astype(np.float32)
    if img.ndim == 3:
        wy, wx = wy[..., None], wx[..., None]
    top = img[y0, x0] * (1 - wx) + img[y0, x1] * wx
    bot = img[y1, x0] * (1 - wx) + img[y1, x1] * wx
    out = top * (1 - wy) + bot * wy
    if outside is not None:
        out[outside] = 0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def affine_warp_pil(image: np.ndarray, matrix: np.ndarray, shift: np.ndarray, fill: str = "nearest") -> np.ndarray:
    """Same mapping as :func:`affine_warp`, done by PIL's C affine transform (~10x faster).

    'nearest' fill: the image is edge-padded by enough pixels that every sampled
    coordinate lands inside the padding, which is what edge replication means.
    """
    h, w = image.shape[:2]
    # Output -> input in PIL's (x, y) coordinates with pixel centres at i + 0.5.
    a, b = matrix[1, 1], matrix[1, 0]
    d, e = matrix[0, 1], matrix[0, 0]
    c = w / 2.0 - a * w / 2.0 - b * h / 2.0 + shift[1]
    f = h / 2.0 - d * w / 2.0 - e * h / 2.0 + shift[0]
    if fill == "nearest":
        corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], np.float64)
        xs = a * corners[:, 0] + b * corners[:, 1] + c
        ys = d * corners[:, 0] + e * corners[:, 1] + f
        m = int(np.ceil(max(0.0, -xs.min(), -ys.min(), xs.max() - w, ys.max() - h))) + 2
        pad = ((m, m), (m, m)) + (((0, 0),) if image.ndim == 3 else ())
        src = np.pad(image, pad, mode="edge")
        c, f = c + m, f + m
    elif fill == "constant":
        src = image
    else:
        raise ValueError(f"augment.fill must be 'nearest' or 'constant', got {fill!r}")
    out = Image.fromarray(src).transform((w, h), Image.AFFINE, (a, b, c, d, e, f), resample=Image.BILINEAR,
                                         fillcolor=0)
    return np.asarray(out)


def augment_image(image: np.ndarray, rng: np.random.Generator, cfg: Mapping[str, Any]) -> np.ndarray:
    """Random flip + affine (rotation / shear / zoom / shift / crop) of a uint8 image."""
    flip_h, flip_v, matrix, shift = augment_params(rng, cfg, image.shape[:2])
    if flip_h:
        image = image[:, ::-1]
    if flip_v:
        image = image[::-1]
    if not (np.allclose(matrix, np.eye(2)) and not shift.any()):
        if image.ndim == 3 and image.shape[-1] not in (3, 4):
            image = affine_warp(image, matrix, shift, cfg["fill"])
        else:
            image = affine_warp_pil(image, matrix, shift, cfg["fill"])
    return np.ascontiguousarray(image)


def _augment_cfg(augment) -> Optional[Dict[str, Any]]:
    """None / False / {'enabled': False} -> None; otherwise a dict with every key filled."""
    if augment is None or augment is False:
        return None
    if augment is True:
        augment = default_augment_config()
    items = dict(augment.items()) if hasattr(augment, "items") else dict(augment)
    unknown = set(items) - set(_AUG_DEFAULTS)
    if unknown:
        raise ValueError(f"Unknown augment option(s) {sorted(unknown)}; known: {sorted(_AUG_DEFAULTS)}")
    cfg = dict(_AUG_DEFAULTS, **items)
    if not cfg["enabled"]:
        return None
    return cfg


# ---------------------------------------------------------------------------------------
# grain transforms (module-level classes so they pickle into worker processes)
# ---------------------------------------------------------------------------------------

class _ReadExample:
    """index -> {'image': uint8 (S, S, 3), 'label', 'index', 'weight'}; augments when rng is given."""

    def __init__(self, source, image_size: int, augment: Optional[Dict[str, Any]], resize_method: str):
        self.source = source
        self.image_size = int(image_size)
        self.augment = augment
        self.resize_method = resize_method

    def _read(self, index: int, rng: Optional[np.random.Generator]):
        record = self.source[index]
        image = resize(record["image"], self.image_size, self.resize_method)
        if rng is not None and self.augment is not None:
            image = augment_image(image, rng, self.augment)
        image = preprocessing.to_three_channels(image)
        return {"image": image, "label": np.int32(record["label"]), "index": np.int32(index),
                "weight": np.float32(1.0)}

    def random_map(self, index, rng: np.random.Generator):
        return self._read(int(index), rng)

    def map(self, index):
        index = int(index)
        if index < 0:  # eval padding
            s = self.image_size
            return {"image": np.zeros((s, s, 3), np.uint8), "label": np.int32(0),
                    "index": np.int32(-1), "weight": np.float32(0.0)}
        return self._read(index, None)


class _RandomRead(grain.transforms.RandomMap):
    def __init__(self, reader: _ReadExample):
        self.reader = reader

    def random_map(self, element, rng):
        return self.reader.random_map(element, rng)


class _Normalize(grain.transforms.Map):
    """Batch of uint8 images -> float32 normalised with the checkpoint's preprocessing mode."""

    def __init__(self, mode: str):
        if mode not in preprocessing.MODES:
            raise ValueError(f"Unknown preprocessing {mode!r}; choose one of {preprocessing.MODES} "
                             "(it comes from the source checkpoint's metadata.preprocessing).")
        self.mode = mode

    def map(self, batch):
        batch = dict(batch)
        batch["image"] = preprocessing.normalize(batch["image"], self.mode)
        return batch


def _process_layout(global_batch_size: int, process_index, process_count) -> Tuple[int, int, int]:
    if process_index is None or process_count is None:
        import jax  # local: the data package must import without touching devices
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, {process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be divisible by the process "
                         f"count {process_count}")
    return int(process_index), int(process_count), global_batch_size // process_count


def _read_options(worker_count: int, read_threads: Optional[int], batch_size: int) -> grain.ReadOptions:
    # Elements here are whole batches, so a small buffer is plenty (grain's default of 500
    # would hold hundreds of batches in memory).
    threads = (1 if worker_count else 2) if read_threads is None else read_threads
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads * 2))


def _maybe_mp(ds, worker_count: int, worker_buffer_size: int):
    if worker_count and worker_count > 0:
        # grain's worker processes read absl flags; outside an absl app (tests, notebooks)
        # nothing parsed them, so use their defaults.
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count),
                                                         per_worker_buffer_size=worker_buffer_size))
    return ds


def make_train_dataset(source, image_size: int = 64, preprocessing: str = "unit",
                       global_batch_size: int = 32, seed: int = 0, augment=None,
                       process_index: Optional[int] = None, process_count: Optional[int] = None,
                       worker_count: int = 0, resize_method: str = "bilinear",
                       read_threads: Optional[int] = None, worker_buffer_size: int = 2) -> grain.IterDataset:
    """The training pipeline as a grain IterDataset (see :func:`make_train_iter`)."""
    n = len(source)
    if n == 0:
        raise DataError("make_train_iter: the training source is empty (check the dataset root, "
                        "the fold CSVs or the confounder sampling).")
    pi, pc, b = _process_layout(global_batch_size, process_index, process_count)
    reader = _ReadExample(source, image_size, _augment_cfg(augment), resize_method)
    ds = grain.MapDataset.range(n).seed(int(seed)).shuffle().repeat()
    ds = ds.random_map(_RandomRead(reader))
    if pc > 1:
        ds = ds[pi::pc]
    ds = ds.batch(b, drop_remainder=True).map(_Normalize(preprocessing))
    ds = ds.to_iter_dataset(_read_options(worker_count, read_threads, b))
    return _maybe_mp(ds, worker_count, worker_buffer_size)


def make_train_iter(source, image_size: int = 64, preprocessing: str = "unit",
                    global_batch_size: int = 32, seed: int = 0, augment=None,
                    process_index: Optional[int] = None, process_count: Optional[int] = None,
                    worker_count: int = 0, resize_method: str = "bilinear",
                    read_threads: Optional[int] = None, worker_buffer_size: int = 2):
    """Infinite training iterator over ``source`` (a grain DatasetIterator).

    Yields per-process batches (b = global_batch_size // process_count):
      {'image': float32 (b, image_size, image_size, 3) normalised with ``preprocessing``,
       'label': int32 (b,), 'weight': float32 (b,) ones, 'index': int32 (b,) into source}.
    ``augment``: a ConfigDict/dict like ``default_augment_config()``, or None for none.
    State: ``it.get_state()`` / ``it.set_state(state)`` resume the same order (same
    ``worker_count`` required); grain's orbax handler saves it with a checkpoint.
    """
    ds = make_train_dataset(source, image_size=image_size, preprocessing=preprocessing,
                            global_batch_size=global_batch_size, seed=seed, augment=augment,
                            process_index=process_index, process_count=process_count,
                            worker_count=worker_count, resize_method=resize_method,
                            read_threads=read_threads, worker_buffer_size=worker_buffer_size)
    return iter(ds)


class _PadIndex(grain.transforms.Map):
    def __init__(self, n: int):
        self.n = n

    def map(self, i):
        return int(i) if i < self.n else -1


class _EvalRead(grain.transforms.Map):
    def __init__(self, reader: _ReadExample):
        self.reader = reader

    def map(self, element):
        return self.reader.map(element)


def make_eval_dataset(source, image_size: int = 64, preprocessing: str = "unit",
                      global_batch_size: int = 32, process_index: Optional[int] = None,
                      process_count: Optional[int] = None, worker_count: int = 0,
                      resize_method: str = "bilinear", read_threads: Optional[int] = None,
                      worker_buffer_size: int = 2) -> grain.IterDataset:
    """The eval pipeline as a grain IterDataset (see :func:`make_eval_iter`)."""
    pi, pc, b = _process_layout(global_batch_size, process_index, process_count)
    n = len(source)
    padded = max(1, math.ceil(n / global_batch_size)) * global_batch_size
    reader = _ReadExample(source, image_size, None, resize_method)
    ds = grain.MapDataset.range(padded).map(_PadIndex(n))
    if pc > 1:
        ds = ds[pi::pc]
    ds = ds.map(_EvalRead(reader)).batch(b, drop_remainder=True).map(_Normalize(preprocessing))
    ds = ds.to_iter_dataset(_read_options(worker_count, read_threads, b))
    return _maybe_mp(ds, worker_count, worker_buffer_size)


def make_eval_iter(source, image_size: int = 64, preprocessing: str = "unit",
                   global_batch_size: int = 32, process_index: Optional[int] = None,
                   process_count: Optional[int] = None, worker_count: int = 0,
                   resize_method: str = "bilinear", read_threads: Optional[int] = None,
                   worker_buffer_size: int = 2):
    """One pass over ``source``: every example exactly once across all processes.

    Same keys and shapes as :func:`make_train_iter`; ``ceil(N / global_batch_size)``
    batches per process (at least one), the tail padded with zero images, ``weight 0``
    and ``index -1``. Process ``p`` holds global positions ``p, p + P, ...`` of each
    global batch. No augmentation.
    """
    return iter(make_eval_dataset(source, image_size=image_size, preprocessing=preprocessing,
                                  global_batch_size=global_batch_size, process_index=process_index,
                                  process_count=process_count, worker_count=worker_count,
                                  resize_method=resize_method, read_threads=read_threads,
                                  worker_buffer_size=worker_buffer_size))


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Batches per process that :func:`make_eval_iter` yields."""
    return max(1, math.ceil(num_examples / global_batch_size))
