"""Device-resident data: decode + resize once, keep uint8 on the devices, augment in jit.

The studies' datasets are small (480 - 10,015 images at 96 - 256 px: at most ~2 GB as
uint8 RGB, ~0.7 GB grey), so an accelerator spends most of a fine-tune waiting on a
host pipeline that decodes and warps the same images every epoch. Here the split is
decoded and resized once (a thread pool; PIL releases the GIL), stored as one uint8
array on the mesh, and each training step only sends the *indices* of its batch:

    step s -> indices  = order.indices(s)            (host; a pure function of seed, s)
           -> images   = cache.images[indices]       (device gather)
           -> augment  = flip + affine warp, nearest fill (device, per-image params from
                         fold_in(key(seed), s))
           -> normalise with the weights' preprocessing mode (device)

Because the order and the augmentation are functions of ``(seed, step)``, the whole
iterator state is the next step number: a checkpoint stores ``{"step": s}`` and a
resumed run sees the same batches bit for bit.

The warp is the same mapping as :func:`medtransfer_jax.data.pipeline.affine_warp` (the
NumPy reference): output pixel p reads the input at ``centre + M (p - centre) + t``,
bilinear, coordinates clamped to the image (Keras ``fill_mode='nearest'``). The random
transform has the same distribution as :func:`pipeline.augment_params` (drawn with
``jax.random`` instead of NumPy, so the pixels differ from the grain path's; the
distribution is what the studies specify).

Multi-host: every process decodes the whole split (it is small) and the array is
replicated; the gather then produces a global batch sharded over the ``data`` axis,
identical whatever the number of processes.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medtransfer_jax import preprocessing
from medtransfer_jax.data import decode_memo, decode_store, pipeline
from medtransfer_jax.data.base import DataError, Source

log = logging.getLogger(__name__)

CACHE_MODES = ("none", "host", "device")
#: Refuse to place more than this fraction of one device's memory (the model, optimizer
#: state and activations need the rest).
MAX_DEVICE_FRACTION = 0.4


# ---------------------------------------------------------------------------- decode

def decode_split(source, image_size: int, resize_method: str = "bilinear",
                 num_threads: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Reads, resizes and stacks every example of ``source``.

    Returns (images uint8 (N, S, S, C) with C = 1 for grey sources else 3, labels int32 (N,)).
    Grey stays one channel on the device (a third of the memory); it is replicated to
    three channels inside the jitted batch function. Each resized image is read through
    the process's decode memo (``decode_memo.MEMO``), so the next run over the same
    images (another fold, source or seed of a study) does not decode them again, and
    through the on-disk store (``decode_store.STORE``), so the next *process* does not
    either.
    """
    n = len(source)
    if n == 0:
        raise DataError("device cache: the split is empty (check the dataset root, fold CSVs "
                        "or confounder sampling).")
    size = int(image_size)
    store = decode_store.STORE
    reads_before, decoded = store.reads, []

    def decode(i):
        decoded.append(i)   # list.append is atomic: the count of real decodes
        img = pipeline.resize(np.asarray(source.load_image(i)), size, resize_method)
        if img.ndim == 2:
            img = img[..., None]
        return img[..., :3] if img.shape[-1] == 4 else img

    def read(i):
        i = int(i)
        key = source.image_key(i)
        img = decode_memo.MEMO.get(
            None if key is None else (key, size, resize_method),
            lambda: store.get(key, size, resize_method, lambda: decode(i)))
        return img, int(source.labels[i])

    t0 = time.perf_counter()
    threads = num_threads or min(32, (os.cpu_count() or 2) * 2)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        out = list(pool.map(read, range(n)))
    from_disk = store.reads - reads_before
    if decoded or from_disk:
        log.info("decoded %d of %d images at %d px, read %d from the decode cache (%s), "
                 "in %.1f s", len(decoded), n, size, from_disk, store.folder or "off",
                 time.perf_counter() - t0)
    channels = {img.shape[-1] for img, _ in out}
    c = 1 if channels == {1} else 3
    images = np.empty((n, size, size, c), np.uint8)
    for i, (img, _) in enumerate(out):
        images[i] = img if img.shape[-1] == c else np.repeat(img, 3, axis=-1)
    labels = np.asarray([lab for _, lab in out], np.int32)
    return images, labels


# ---------------------------------------------------------------------------- order

@dataclasses.dataclass
class TrainOrder:
    """The infinite, epoch-reshuffled stream of example indices, as a pure function.

    Element n of the stream is ``perm(n // N)[n % N]`` with ``perm(e)`` a permutation
    seeded by ``(seed, e)``; step s takes elements ``[s B, (s + 1) B)``. Its checkpoint
    state is the next step, so resume needs no saved buffers.
    """

    num_examples: int
    global_batch_size: int
    seed: int = 0
    step: int = 0

    def __post_init__(self):
        if self.num_examples <= 0 or self.global_batch_size <= 0:
            raise DataError(f"TrainOrder: need num_examples > 0 and global_batch_size > 0, "
                            f"got {self.num_examples} and {self.global_batch_size}")
        self._perms: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([int(self.seed), int(epoch)])
            self._perms[epoch] = rng.permutation(self.num_examples).astype(np.int32)
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """int32 (global_batch_size,) example indices of training step ``step``."""
        n, b = self.num_examples, self.global_batch_size
        pos = np.arange(step * b, (step + 1) * b, dtype=np.int64)
        epochs = pos // n
        out = np.empty(b, np.int32)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[pos[sel] % n]
        return out

    def __next__(self) -> np.ndarray:
        idx = self.indices(self.step)
        self.step += 1
        return idx

    def __iter__(self):
        return self

    def get_state(self) -> Dict[str, int]:
        return {"step": int(self.step), "seed": int(self.seed),
                "num_examples": int(self.num_examples),
                "global_batch_size": int(self.global_batch_size)}

    def set_state(self, state: Mapping[str, int]) -> None:
        for key in ("seed", "num_examples", "global_batch_size"):
            if key in state and int(state[key]) != int(getattr(self, key)):
                raise DataError(f"device-cache order state has {key}={state[key]} but this run "
                                f"has {getattr(self, key)}; the checkpoint belongs to another "
                                "config (use the original config or a fresh --workdir).")
        self.step = int(state["step"])


# ---------------------------------------------------------------------------- augmentation

def _aug_cfg(augment) -> Optional[Dict[str, Any]]:
    return pipeline._augment_cfg(augment)  # one parser of the augment options


@functools.lru_cache(maxsize=16)
def _batch_program(preprocessing_mode: str, cfg_json: str, mesh, data_axis: str):
    """The jitted batch function of one (normalisation, augmentation, mesh): shared by every
    split and run of a process, with the seed a traced argument, so a study's runs do not
    re-trace it. The split's arrays are arguments too (one compile per split size)."""
    cfg = json.loads(cfg_json)
    sharded = NamedSharding(mesh, P(data_axis))

    def batch_fn(images, labels, indices, step, seed):
        valid = indices >= 0
        safe = jnp.where(valid, indices, 0)
        x = jnp.take(images, safe, axis=0)
        if cfg is not None:
            key = jax.random.fold_in(jax.random.key(seed), step)
            x = augment_batch(x, key, cfg)
        x = jax.lax.with_sharding_constraint(x, sharded)
        return {"image": preprocessing.normalize_grey_or_rgb(x, preprocessing_mode),
                "label": jnp.take(labels, safe), "weight": valid.astype(jnp.float32),
                "index": indices}

    return jax.jit(batch_fn, out_shardings=sharded)


def random_params(key: jax.Array, batch: int, cfg: Mapping[str, Any], size: Tuple[int, int]):
    """Per-image random transforms with :func:`pipeline.augment_params`' distribution.

    Returns (flip_h bool (B,), flip_v bool (B,), M float32 (B, 2, 2) output->input,
    t float32 (B, 2) pixels (y, x)).
    """
    h, w = size
    k = jax.random.split(key, 8)
    u = lambda kk, shape=(batch,): jax.random.uniform(kk, shape, jnp.float32, -1.0, 1.0)
    flip_h = (jax.random.uniform(k[0], (batch,)) < 0.5) & bool(cfg["flip"])
    flip_v = (jax.random.uniform(k[1], (batch,)) < 0.5) & bool(cfg["vflip"])
    theta = jnp.deg2rad(u(k[2]) * float(cfg["rotation_deg"]))
    shear = jnp.deg2rad(u(k[3]) * float(cfg["shear"]))
    zoom = 1.0 + u(k[4], (batch, 2)) * float(cfg["zoom"])
    shift = u(k[5], (batch, 2)) * float(cfg["shift"]) * jnp.asarray([h, w], jnp.float32)
    crop = float(cfg["crop"])
    if crop > 0:
        s = jax.random.uniform(k[6], (batch,), jnp.float32, 1 - crop, 1.0)
        zoom = zoom * s[:, None]
        shift = shift + u(k[7], (batch, 2)) * (1 - s)[:, None] * jnp.asarray([h, w],
                                                                            jnp.float32) / 2
    c, sn = jnp.cos(theta), jnp.sin(theta)
    rot = jnp.stack([jnp.stack([c, -sn], -1), jnp.stack([sn, c], -1)], -2)
    shr = jnp.stack([jnp.stack([jnp.ones_like(shear), jnp.zeros_like(shear)], -1),
                     jnp.stack([jnp.tan(shear), jnp.ones_like(shear)], -1)], -2)
    zm = jax.vmap(jnp.diag)(zoom)
    return flip_h, flip_v, rot @ shr @ zm, shift


def warp(images: jax.Array, matrix: jax.Array, shift: jax.Array,
         fill: str = "nearest") -> jax.Array:
    """Bilinear affine warp of a batch, the mapping of :func:`pipeline.affine_warp`.

    images: (B, H, W, C) any real dtype in [0, 255]; matrix (B, 2, 2); shift (B, 2).
    Returns float32 (B, H, W, C), not rounded (the NumPy reference rounds to uint8).
    """
    b, h, w, _ = images.shape
    dy = jnp.arange(h, dtype=jnp.float32)[:, None] - (h - 1) / 2.0
    dx = jnp.arange(w, dtype=jnp.float32)[None, :] - (w - 1) / 2.0
    m = matrix.astype(jnp.float32)
    sy = (h - 1) / 2.0 + m[:, 0, 0, None, None] * dy + m[:, 0, 1, None, None] * dx \
        + shift[:, 0, None, None]
    sx = (w - 1) / 2.0 + m[:, 1, 0, None, None] * dy + m[:, 1, 1, None, None] * dx \
        + shift[:, 1, None, None]
    if fill == "constant":
        outside = (sy < -0.5) | (sy > h - 0.5) | (sx < -0.5) | (sx > w - 0.5)
    elif fill != "nearest":
        raise ValueError(f"augment.fill must be 'nearest' or 'constant', got {fill!r}")
    sy = jnp.clip(sy, 0, h - 1)
    sx = jnp.clip(sx, 0, w - 1)
    y0 = jnp.floor(sy).astype(jnp.int32)
    x0 = jnp.floor(sx).astype(jnp.int32)
    wy = (sy - y0)[..., None]
    wx = (sx - x0)[..., None]
    y1 = jnp.minimum(y0 + 1, h - 1)
    x1 = jnp.minimum(x0 + 1, w - 1)
    img = images.astype(jnp.float32)
    bi = jnp.arange(b)[:, None, None]
    top = img[bi, y0, x0] * (1 - wx) + img[bi, y0, x1] * wx
    bot = img[bi, y1, x0] * (1 - wx) + img[bi, y1, x1] * wx
    out = top * (1 - wy) + bot * wy
    if fill == "constant":
        out = jnp.where(outside[..., None], 0.0, out)
    return out


def augment_batch(images: jax.Array, key: jax.Array, cfg: Mapping[str, Any]) -> jax.Array:
    """Random flips + affine warp of a uint8 batch (B, H, W, C) -> float32 in [0, 255]."""
    b, h, w, _ = images.shape
    flip_h, flip_v, matrix, shift = random_params(key, b, cfg, (h, w))
    x = images.astype(jnp.float32)
    x = jnp.where(flip_h[:, None, None, None], x[:, :, ::-1], x)
    x = jnp.where(flip_v[:, None, None, None], x[:, ::-1], x)
    # Keras/NumPy reference rounds the warped pixels to uint8; do the same so the model
    # sees the same value grid as the grain path.
    return jnp.clip(jnp.round(warp(x, matrix, shift, cfg["fill"])), 0, 255)


# ---------------------------------------------------------------------------- the cache

class DeviceCache:
    """One split's uint8 images and labels on the mesh, batched by index inside jit.

    Args:
      images: uint8 (N, S, S, C) from :func:`decode_split`; labels int32 (N,).
      mesh: the training mesh (its ``data`` axis shards the produced batches).
      placement: 'replicated' (every device holds the split; any batch is a local
        gather) or 'sharded' (examples split over the data axis; XLA moves what a batch
        needs, for splits too large to replicate).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, mesh: Mesh,
                 placement: str = "replicated", data_axis: str = "data"):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"DeviceCache expects uint8 (N, H, W, C), got {images.dtype} "
                            f"{images.shape}")
        self.mesh, self.data_axis = mesh, data_axis
        self.num_examples, self.image_size = int(images.shape[0]), int(images.shape[1])
        self.nbytes = int(images.nbytes)
        check_fits(self.nbytes, placement, mesh, data_axis)
        if placement == "replicated":
            spec = P()
        elif placement == "sharded":
            n_data = mesh.shape[data_axis]
            pad = (-images.shape[0]) % n_data
            if pad:
                images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
                labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
            spec = P(data_axis)
        else:
            raise ValueError(f"placement must be 'replicated' or 'sharded', got {placement!r}")
        self.placement = placement
        self.images = _put(images, NamedSharding(mesh, P(*spec, None, None, None)
                                                 if spec != P() else P()))
        self.labels = _put(np.asarray(labels, np.int32), NamedSharding(mesh, spec))

    def make_batch_fn(self, preprocessing_mode: str, augment=None, seed: int = 0
                      ) -> Callable[[jax.Array, jax.Array], Dict[str, jax.Array]]:
        """Returns jitted ``batch_fn(indices int32 (B,), step int32) -> batch``.

        batch = {'image': float32 (B, S, S, 3) normalised, 'label': int32 (B,),
        'weight': float32 (B,) (0 for indices < 0: eval padding), 'index': int32 (B,)}.
        Augmentation (None = none) is seeded by ``fold_in(key(seed), step)``.
        """
        if preprocessing_mode not in preprocessing.MODES:
            raise ValueError(f"Unknown preprocessing {preprocessing_mode!r}; choose one of "
                             f"{preprocessing.MODES}")
        cfg = _aug_cfg(augment)
        seed_arr = np.int32(seed)
        images, labels = self.images, self.labels
        jitted = _batch_program(preprocessing_mode, json.dumps(cfg, sort_keys=True),
                                self.mesh, self.data_axis)

        def call(indices, step=0):
            # One explicit transfer of the step's few bytes (no implicit ones in the loop).
            idx, st, sd = jax.device_put((np.asarray(indices, np.int32), np.int32(step),
                                          seed_arr), self._replicated_small())
            return jitted(images, labels, idx, st, sd)

        return call

    def _replicated_small(self):
        return NamedSharding(self.mesh, P())

    def eval_indices(self, global_batch_size: int):
        """Yields int32 (B,) index batches covering every example once, tail padded with -1."""
        n, b = self.num_examples, int(global_batch_size)
        for start in range(0, max(1, math.ceil(n / b)) * b, b):
            idx = np.arange(start, start + b, dtype=np.int32)
            idx[idx >= n] = -1
            yield idx


def _put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Places a host array every process holds in full (multi-host safe)."""
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def device_memory_bytes(device) -> Optional[int]:
    """The device's memory limit, or None where the backend does not say (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    return (stats or {}).get("bytes_limit")


def check_fits(nbytes: int, placement: str, mesh: Mesh, data_axis: str = "data") -> None:
    """Raises DataError (with the fix) when the cache would take too much device memory."""
    limit = device_memory_bytes(mesh.devices.flat[0])
    if limit is None:
        return
    per_device = nbytes if placement == "replicated" else nbytes / mesh.shape[data_axis]
    if per_device > MAX_DEVICE_FRACTION * limit:
        raise DataError(
            f"data.cache=device needs {per_device / 2**30:.2f} GiB per device for the split "
            f"({placement}), over {MAX_DEVICE_FRACTION:.0%} of the device's "
            f"{limit / 2**30:.1f} GiB. Use data.cache_placement=sharded, a smaller "
            "data.image_size, or data.cache=none (the grain pipeline).")


# ---------------------------------------------------------------------------- loop plumbing

class DeviceTrainIterator:
    """The training stream of a :class:`DeviceCache`, a drop-in for the grain iterator.

    ``next(it)`` -> global batch on the mesh (image/label/weight/index). The position is
    saved with the run's checkpoint through grain's orbax handler (its legacy protocol:
    ``get_state() -> bytes``, ``set_state(bytes)``, ``start_prefetch()``), so the loop's
    checkpoint code is the same for both data paths.
    """

    def __init__(self, cache: DeviceCache, order: TrainOrder, batch_fn):
        self.cache, self.order, self.batch_fn = cache, order, batch_fn

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, jax.Array]:
        step = self.order.step
        return self.batch_fn(next(self.order), step)

    def get_state(self) -> bytes:
        return json.dumps(self.order.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.order.set_state(json.loads(state))

    def start_prefetch(self) -> None:  # grain's handler calls it after restoring
        pass


def eval_batches(cache: DeviceCache, batch_fn, global_batch_size: int):
    """Every example of the cached split once, as global batches (tail: weight 0, index -1)."""
    for idx in cache.eval_indices(global_batch_size):
        yield batch_fn(idx)


class HostCachedSource(Source):
    """``base`` with every image decoded and resized once into host memory ('host' cache).

    Same columns (ids, groups, meta) as ``base``; ``load_image`` returns the cached uint8.
    """

    def __init__(self, base: Source, image_size: int, resize_method: str = "bilinear",
                 num_threads: Optional[int] = None):
        self.images, _ = decode_split(base, image_size, resize_method, num_threads)
        self.labels, self.ids, self.groups = base.labels, base.ids, base.groups
        self.meta, self.class_names = base.meta, base.class_names

    def load_image(self, index: int) -> np.ndarray:
        img = self.images[index]
        return img[..., 0] if img.shape[-1] == 1 else img


def build(config_data, splits, mesh: Mesh, preprocessing_mode: str, global_batch_size: int,
          seed: int):
    """The run's device-resident data: (train iterator, {split source id: batch maker}).

    ``config_data``: the run's ``data`` config (image_size, resize_method, augment,
    cache_placement). Every split (train, val, test, extra tests) is decoded once; the
    second value maps ``id(source)`` to ``batches(global_batch_size) -> iterator`` for
    the evaluation of that source.
    """
    size, method = int(config_data.image_size), config_data.resize_method
    placement = config_data.cache_placement
    sources = {"train": splits.train, "val": splits.val, "test": splits.test,
               **dict(splits.extra_tests)}
    caches, total = {}, 0
    for name, src in sources.items():
        if id(src) in caches or len(src) == 0:
            continue
        images, labels = decode_split(src, size, method)
        caches[id(src)] = DeviceCache(images, labels, mesh, placement=placement)
        total += images.nbytes
        log.info("device cache: %s %s uint8 (%.1f MiB)", name, images.shape, images.nbytes / 2**20)
    check_fits(total, placement, mesh)
    train = caches[id(splits.train)]
    order = TrainOrder(train.num_examples, global_batch_size, seed=seed)
    train_it = DeviceTrainIterator(train, order, train.make_batch_fn(
        preprocessing_mode, augment=config_data.augment, seed=seed))
    evals = {}
    for key, cache in caches.items():
        fn = cache.make_batch_fn(preprocessing_mode)
        evals[key] = (lambda bs, cache=cache, fn=fn: eval_batches(cache, fn, bs))
    return train_it, evals
