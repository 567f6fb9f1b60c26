"""Seeded synthetic tasks, generated on the fly (no files, no downloads).

Image ``i`` is a pure function of ``(seed, i)``, so a source of any length costs no
storage and is identical in every process and worker.

* ``lesion`` (the embedded default target task, grey like ultrasound / X-ray): a smooth
  anatomy-like background with speckle; class 0 has no lesion, class k > 0 carries a
  blob of random size (6-16 % of the side) and position whose appearance depends on the
  class (bright disc, dark disc, bright ring, elongated bright ellipse, cycling).
* ``natural`` (a different "source" pre-training task for the study demo): coloured
  sinusoidal textures whose orientation bin is the class.

Per-patient metadata ``sex`` ('M'/'F'), ``age`` (years) and ``age_bucket``
('<60'/'>=60') are drawn independently of the label, so the sampled confounder can be
exercised on synthetic data.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from medtransfer_jax.data.base import DataError, Source, _as_object_array
from medtransfer_jax.data.config import MIN_IMAGE_SIZE

TASKS = ("lesion", "natural")
LESION_KINDS = ("bright", "dark", "ring", "ellipse")
_SALT_LABEL, _SALT_IMAGE, _SALT_META = 101, 202, 303


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 smooth random field, ~unit variance: bicubic upsampling of noise."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))


def lesion_image(seed: int, index: int, label: int, size: int = 64, contrast: float = 0.35) -> np.ndarray:
    """One 'lesion' image: uint8 (size, size). Class ``label`` > 0 gets a lesion."""
    rng = np.random.default_rng([int(seed), int(index), _SALT_IMAGE])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    # Anatomy-like background: a body-shaped vignette, a smooth tissue field, speckle.
    cx, cy = rng.uniform(0.4, 0.6, size=2)
    body = 1.0 - 0.6 * np.clip(((xx - cx) / 0.55) ** 2 + ((yy - cy) / 0.6) ** 2, 0, 1.5)
    tissue = 0.10 * _smooth_field(rng, size, 5) + 0.05 * _smooth_field(rng, size, 11)
    img = 0.40 * body + tissue + rng.uniform(-0.05, 0.05)
    if label > 0:
        kind = LESION_KINDS[(label - 1) % len(LESION_KINDS)]
        r = rng.uniform(0.06, 0.16)
        lx, ly = rng.uniform(0.25, 0.75, size=2)
        if kind == "ellipse":
            angle = rng.uniform(0, np.pi)
            u = (xx - lx) * np.cos(angle) + (yy - ly) * np.sin(angle)
            v = -(xx - lx) * np.sin(angle) + (yy - ly) * np.cos(angle)
            d = np.sqrt((u / 1.8) ** 2 + (v / 0.55) ** 2)
        else:
            d = np.sqrt((xx - lx) ** 2 + (yy - ly) ** 2)
        edge = max(0.15 * r, 0.5 / size)
        disc = 1.0 / (1.0 + np.exp((d - r) / edge))
        if kind == "ring":
            inner = 1.0 / (1.0 + np.exp((d - 0.55 * r) / edge))
            disc = disc - inner
        amp = contrast * rng.uniform(0.8, 1.2)
        img = img + (-amp if kind == "dark" else amp) * disc
    # Multiplicative speckle (ultrasound-like) plus a little additive noise.
    img = img * (1.0 + 0.08 * rng.standard_normal((size, size))) + 0.02 * rng.standard_normal((size, size))
    return np.clip(img * 255.0, 0, 255).astype(np.uint8)


def natural_image(seed: int, index: int, label: int, size: int = 64, num_classes: int = 4) -> np.ndarray:
    """One 'natural' texture: uint8 (size, size, 3); the grating orientation bin is the class."""
    rng = np.random.default_rng([int(seed), int(index), _SALT_IMAGE])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    width = np.pi / num_classes
    theta = label * width + rng.uniform(-0.3, 0.3) * width
    freq = rng.uniform(3.0, 7.0)
    phase = rng.uniform(0, 2 * np.pi)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    c1, c2 = rng.uniform(0, 1, size=(2, 3)).astype(np.float32)
    img = wave[..., None] * c1 + (1 - wave[..., None]) * c2
    shade = 0.15 * np.stack([_smooth_field(rng, size, 4) for _ in range(3)], -1)
    img = img + shade + 0.05 * rng.standard_normal((size, size, 3))
    return np.clip(img * 255.0, 0, 255).astype(np.uint8)


class SyntheticSource(Source):
    """``num_examples`` synthetic images of ``task``; deterministic from ``seed``.

    Labels, groups and metadata are drawn per patient (``images_per_patient`` consecutive
    indices share a patient, its label and its metadata).
    """

    def __init__(self, num_examples: int = 512, image_size: int = 64, seed: int = 0,
                 task: str = "lesion", num_classes: int = 2, images_per_patient: int = 1,
                 contrast: float = 0.35):
        if task not in TASKS:
            raise DataError(f"Unknown synthetic task {task!r}; choose one of {TASKS} "
                            "(config field data.synthetic.task).")
        if num_classes < 2:
            raise DataError(f"synthetic num_classes must be >= 2, got {num_classes}")
        if num_examples < 1 or image_size < MIN_IMAGE_SIZE:
            raise DataError(f"synthetic needs data.synthetic.num_examples >= 1 and "
                            f"data.image_size >= {MIN_IMAGE_SIZE}, got {num_examples}, "
                            f"{image_size}")
        self.num_examples = int(num_examples)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.task = task
        self.contrast = float(contrast)
        ipp = max(int(images_per_patient), 1)
        n_patients = -(-self.num_examples // ipp)
        patient = np.arange(self.num_examples) // ipp
        rng = np.random.default_rng([self.seed, _SALT_LABEL])
        # Balanced labels in a seeded random order (exact class balance up to rounding).
        patient_labels = rng.permutation(np.arange(n_patients) % num_classes)
        self.labels = patient_labels[patient].astype(np.int64)
        self.ids = _as_object_array([f"syn{self.seed}-{task}-{i:06d}" for i in range(self.num_examples)])
        self.groups = _as_object_array([f"syn{self.seed}-p{p:06d}" for p in patient])
        mrng = np.random.default_rng([self.seed, _SALT_META])
        sex = np.where(mrng.random(n_patients) < 0.5, "F", "M")
        age = mrng.integers(20, 90, size=n_patients)
        self.meta = {
            "sex": sex[patient],
            "age": age[patient].astype(np.int64),
            "age_bucket": np.where(age[patient] >= 60, ">=60", "<60"),
        }
        if task == "lesion":
            names = ["normal"] + [f"lesion_{LESION_KINDS[(k - 1) % 4]}" for k in range(1, num_classes)]
            if num_classes == 2:
                names = ["negative", "positive"]
        else:
            names = [f"orientation_{k}" for k in range(num_classes)]
        self.class_names = tuple(names)

    def image_key(self, index: int):
        """Everything :meth:`load_image` draws from."""
        return ("synthetic", self.task, self.seed, int(index), int(self.labels[index]),
                self.image_size, self.contrast, self.num_classes)

    def load_image(self, index: int) -> np.ndarray:
        label = int(self.labels[index])
        if self.task == "lesion":
            return lesion_image(self.seed, index, label, self.image_size, self.contrast)
        return natural_image(self.seed, index, label, self.image_size, self.num_classes)


def from_config(scfg, image_size: Optional[int] = None) -> SyntheticSource:
    """Builds a SyntheticSource from the ``data.synthetic`` sub-config."""
    return SyntheticSource(
        num_examples=scfg.num_examples,
        image_size=image_size or scfg.image_size,
        seed=scfg.seed,
        task=scfg.task,
        num_classes=scfg.num_classes,
        images_per_patient=scfg.get("images_per_patient", 1),
        contrast=scfg.get("contrast", 0.35),
    )
