"""Run a weights directory on images and collect named intermediate activations.

Spatial handling of conv maps (B, h, w, C) -- choose with ``spatial=``:

* ``positions`` (default; the Revisiting study): every spatial position of an image is a
  datapoint with C neurons, i.e. (B, h, w, C) -> (B*h*w, C). To keep the datapoint count
  the same for every layer, a layer with an h x w map uses ``round(target / (h*w))``
  images (:func:`images_per_layer`; the study used target = 10,000 positions). Positions
  of the same image are correlated, so the effective sample size is smaller than B*h*w
  (deep layers see many images, shallow layers few): similarity of shallow layers then
  describes few images in detail, deep layers many images coarsely.
* ``pool``: global average over (h, w) -> (B, C): one datapoint per image. Invariant to
  where things are in the image and comparable across layers of different sizes, but CCA
  then needs more *images* than channels (2048 at conv5 of a ResNet50).

Comparing two layers with different h x w under ``positions`` (e.g. conv2 of A vs conv3 of
B) needs a common grid: :func:`match_spatial` average-pools the larger map down to the
smaller one (or bilinearly resizes when the sizes do not divide).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from medtransfer_jax import preprocessing as prep
from medtransfer_jax.models import resnet
from medtransfer_jax import sharding
from medtransfer_jax.weights import checkpoint

SPATIAL_MODES = ("positions", "pool")


# The one weights loader and the mesh helpers, re-exported for the analyses.
LoadedModel, load_model = checkpoint.LoadedModel, checkpoint.load_model
replicate, shard_rows = sharding.replicate, sharding.shard_rows


def check_layers(loaded: LoadedModel, layers: Sequence[str]) -> Tuple[str, ...]:
    layers = tuple(layers)
    unknown = [l for l in layers if l not in loaded.valid_layers()]
    if unknown:
        raise ValueError(f"{loaded.name}: unknown layer(s) {unknown} for ResNet{loaded.depth}; "
                         f"valid names: {list(loaded.valid_layers())}.")
    return layers


def _extractor(model: resnet.ResNet, layers: Tuple[str, ...]):
    """Jitted forward returning ``layers``.

    It always computes the five stage outputs as well, so every subset of them (the usual
    requests) shares one compiled function per model architecture and batch shape; the
    extra outputs cost device memory of ~2.3M floats per 224 px image, not compute.
    """
    canonical = tuple(sorted(set(layers) | set(resnet.stage_output_names(model.depth))))
    return _compiled_extractor(model, canonical)


@functools.lru_cache(maxsize=32)
def _compiled_extractor(model: resnet.ResNet, layers: Tuple[str, ...]):
    @jax.jit
    def run(variables, x):
        return resnet.extract_activations(model, variables, x, layers)
    return run


COMPUTE_DTYPES = ("float32", "bfloat16")


@functools.lru_cache(maxsize=16)
def with_dtype(model: resnet.ResNet, compute_dtype: str = "float32") -> resnet.ResNet:
    """``model`` computing in ``compute_dtype`` (parameters and BN statistics stay
    float32). bf16 halves activation memory and runs on tensor cores / the MXU; its
    effect on CCA is measured by ``python -m medtransfer_jax.bench network_scale``."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r}: choose one of {COMPUTE_DTYPES}.")
    return model if compute_dtype == "float32" else dataclasses.replace(
        model, dtype=jnp.dtype(compute_dtype))


def forward_mesh(batch_size: int, mesh=None):
    """The mesh forward passes run on: ``mesh`` (checked), else the training layout, a
    1-D ``data`` mesh over the most local devices that divide ``batch_size`` (all of them
    for the usual power-of-two batches; on several hosts all devices, which must divide).
    """
    if mesh is None:
        n = jax.device_count()
        if jax.process_count() == 1:
            while batch_size % n:
                n -= 1
        mesh = sharding.make_mesh(n)
    if batch_size % mesh.size:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the {mesh.size} "
                         "devices of the mesh.")
    return mesh


def prepare_images(images, mode: str) -> np.ndarray:
    """Raw pixel values in [0, 255]: (N, H, W), (N, H, W, 1) or (N, H, W, 3) -> float32
    (N, H, W, 3) normalised with ``mode`` (a preprocessing.MODES entry)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"Expected images of shape (N, H, W[, C]), got {images.shape}.")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    elif images.shape[-1] == 4:
        images = images[..., :3]
    return prep.normalize(images.astype(np.float32), mode)


def put_raw(images, mesh) -> jax.Array:
    """Raw pixels (B, H, W[, C]) onto ``mesh`` as they are, rows split over ``data``.

    uint8 stays uint8 (a quarter of float32's bytes), alpha is dropped and grey stays one
    channel; :func:`normalize_on_device` finishes the job in a jitted call. Converting and
    normalising on the host instead, then moving float32, cost most of an H200's time in
    the 17 x 17 layer map (BENCHMARKS.md §10: bf16 forward passes saved only 6 %).
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"Expected images of shape (N, H, W[, 1|3|4]), got {x.shape}.")
    if x.shape[-1] == 4:
        x = x[..., :3]
    return shard_rows(np.ascontiguousarray(x), mesh)


@functools.lru_cache(maxsize=8)
def _normalizer(mode: str):
    return jax.jit(functools.partial(prep.normalize_grey_or_rgb, mode=mode))


def normalize_on_device(raw: jax.Array, mode: str) -> jax.Array:
    """:func:`prepare_images` of a :func:`put_raw` batch, on its devices (same sharding)."""
    if mode not in prep.MODES:
        raise ValueError(f"Unknown preprocessing mode {mode!r}; choose one of {prep.MODES}.")
    return _normalizer(mode)(raw)


def run_layers(loaded: LoadedModel, images, layers: Sequence[str], *, batch_size: int = 32,
               preprocessing: Optional[str] = None, normalized: bool = False,
               to_host: bool = True, mesh=None) -> Dict[str, Any]:
    """Activations of ``layers`` for all ``images``.

    Args:
      images: raw pixels (N, H, W[, C]) in [0, 255], normalised with the model's
        ``metadata.preprocessing`` (or ``preprocessing``); pass ``normalized=True`` if they
        already are (N, H, W, 3).
      batch_size: fixed batch shape (the last batch is padded), so one compile per shape.
      mesh: batches are split over its ``data`` axis (default :func:`forward_mesh`).
    Returns:
      ``{layer: array (N, h, w, C) or (N, C)}`` (NumPy unless ``to_host=False``).
    """
    layers = check_layers(loaded, layers)
    mode = preprocessing or loaded.metadata.preprocessing
    x = np.asarray(images, np.float32) if normalized else np.asarray(images)
    if not normalized and x.ndim == 3:
        x = x[..., None]
    run = _extractor(loaded.model, layers)
    mesh = forward_mesh(batch_size, mesh)
    variables = replicate(loaded.variables, mesh)
    outs: Dict[str, list] = {l: [] for l in layers}
    n = x.shape[0]
    for start in range(0, n, batch_size):
        chunk = x[start:start + batch_size]
        valid = chunk.shape[0]
        if valid < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - valid,) + chunk.shape[1:],
                                                    chunk.dtype)])
        acts = run(variables, shard_rows(chunk, mesh) if normalized
                   else normalize_on_device(put_raw(chunk, mesh), mode))
        for l in layers:
            outs[l].append(sharding.gather_to_host(acts[l])[:valid] if to_host
                           else acts[l][:valid])
    cat = np.concatenate if to_host else jnp.concatenate
    return {l: cat(v, axis=0) for l, v in outs.items()}


def layer_shapes(loaded: LoadedModel, image_size: Union[int, Tuple[int, int]],
                 layers: Sequence[str]) -> Dict[str, Tuple[int, ...]]:
    """Per-image activation shape of each layer ((h, w, C) or (C,)), without running it."""
    layers = check_layers(loaded, layers)
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    x = jax.ShapeDtypeStruct((1,) + hw + (3,), jnp.float32)
    out = jax.eval_shape(lambda v, x: resnet.extract_activations(loaded.model, v, x, layers),
                         loaded.variables, x)
    return {l: tuple(out[l].shape[1:]) for l in layers}


def images_per_layer(h: int, w: int, target_positions: int = 10000) -> int:
    """The study's images per layer: round(target / (h*w)), at least 1."""
    return max(1, int(round(target_positions / float(h * w))))


def spatial_datapoints(acts, spatial: str = "positions"):
    """(B, h, w, C) -> (B*h*w, C) for ``positions`` or (B, C) for ``pool``; (B, C) passes."""
    if spatial not in SPATIAL_MODES:
        raise ValueError(f"spatial={spatial!r}: choose one of {SPATIAL_MODES}.")
    if acts.ndim == 2:
        return acts
    if acts.ndim != 4:
        raise ValueError(f"Expected activations (B, h, w, C) or (B, C), got {acts.shape}.")
    xp = np if isinstance(acts, np.ndarray) else jnp
    if spatial == "pool":
        return xp.mean(acts, axis=(1, 2))
    return acts.reshape(-1, acts.shape[-1])


def match_spatial(a, b):
    """Brings two conv maps (B, h1, w1, C1), (B, h2, w2, C2) to the smaller grid.

    Average pooling by the integer factor when the sizes divide (keeps each output
    position the mean of the input positions it covers), else bilinear resizing.
    """
    if a.ndim != 4 or b.ndim != 4:
        return a, b
    (ha, wa), (hb, wb) = a.shape[1:3], b.shape[1:3]
    h, w = min(ha, hb), min(wa, wb)
    return _to_grid(a, h, w), _to_grid(b, h, w)


def _to_grid(x, h, w):
    B, H, W, C = x.shape
    if (H, W) == (h, w):
        return x
    xp = np if isinstance(x, np.ndarray) else jnp
    if H % h == 0 and W % w == 0:
        return xp.mean(x.reshape(B, h, H // h, w, W // w, C), axis=(2, 4))
    out = jax.image.resize(jnp.asarray(x), (B, h, w, C), method="linear", antialias=True)
    return np.asarray(out) if xp is np else out
