"""Input normalisation, attached to the *source checkpoint* (not the dataset).

A model must see inputs normalised the way it was pre-trained, so every converted
checkpoint records one of these modes in its metadata and the data pipeline reads it
from there:

* ``caffe``: Keras ``preprocess_input`` for ImageNet ResNet50: RGB -> BGR, subtract the
  ImageNet BGR means, no scaling. Both studies used it for both sources.
* ``radimagenet``: RadImageNet's downstream scripts, ``ImageDataGenerator(rescale=1/255,
  preprocessing_function=preprocess_input)``; Keras applies the function first, so the
  input is (BGR - caffe mean) / 255.
* ``torch``: torchvision: x/255, subtract mean, divide by std (RGB).
* ``unit``: x/255 (random init, synthetic sources).
"""
from __future__ import annotations

from typing import Union

import numpy as np

CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)
TORCH_RGB_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TORCH_RGB_STD = np.array([0.229, 0.224, 0.225], np.float32)

MODES = ("caffe", "radimagenet", "torch", "unit")


def to_three_channels(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> (H, W, 3); grey is replicated."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"Expected an image of shape (H, W[, C]), got {image.shape}.")
    c = image.shape[-1]
    if c == 1:
        return np.repeat(image, 3, axis=-1)
    if c == 3:
        return image
    if c == 4:  # RGBA: drop alpha
        return image[..., :3]
    raise ValueError(f"Expected 1, 3 or 4 channels, got {c} (shape {image.shape}).")


def normalize(images: Union[np.ndarray, "jax.Array"], mode: str):  # noqa: F821
    """Normalises RGB images with values in [0, 255] (any float/uint dtype).

    Works on NumPy or JAX arrays of shape (..., H, W, 3); returns float32 of the
    same shape.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown preprocessing mode {mode!r}; choose one of {MODES}.")
    xp = np if isinstance(images, np.ndarray) else _jnp()
    x = xp.asarray(images, dtype=xp.float32)
    if x.shape[-1] != 3:
        raise ValueError(f"normalize expects RGB images (..., 3); got shape {x.shape}.")
    if mode == "unit":
        return x / 255.0
    if mode == "torch":
        return (x / 255.0 - TORCH_RGB_MEAN) / TORCH_RGB_STD
    bgr = x[..., ::-1] - CAFFE_BGR_MEAN
    return bgr / 255.0 if mode == "radimagenet" else bgr


def normalize_grey_or_rgb(images, mode: str):
    """:func:`normalize` of (..., H, W, 1) grey or (..., H, W, 3) RGB images, grey
    replicated to RGB first: the device-resident paths keep grey as one channel (a third
    of the bytes) and call this inside jit."""
    if images.shape[-1] == 1:
        xp = np if isinstance(images, np.ndarray) else _jnp()
        images = xp.broadcast_to(images, images.shape[:-1] + (3,))
    return normalize(images, mode)


def _jnp():
    import jax.numpy as jnp
    return jnp
