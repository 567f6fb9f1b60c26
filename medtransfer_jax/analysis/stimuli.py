"""The one image pool of the analyses: which images both networks see, as uint8 pixels.

``python -m medtransfer_jax.analyze`` and the study's stages load their stimuli through
:func:`load_pool`, so "the same" comparison reached from either uses the same bytes.
A :class:`StimulusSpec` says where the images come from (a data config's split of a fold,
or uniform noise for smoke tests), how many, at what size and with which resize filter,
and which ones: the first N (the study, and the Revisiting CCA.py that read a CSV in
order) or a seeded random subset. :func:`protocol_spec` builds the spec a run config
declares (its ``analysis.cca_*`` fields: Revisiting CCA.py's validation fold, sizes and
caffe inputs), which is what the study and ``analyze --stimuli_config`` both use.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import numpy as np

from medtransfer_jax import data as data_lib
from medtransfer_jax.data import pipeline
from medtransfer_jax.errors import ConfigError
from medtransfer_jax.preprocessing import to_three_channels

SOURCES = ("data", "noise")
SELECTIONS = ("first", "random")


class StimulusError(ConfigError):
    """A stimulus pool that cannot be drawn (unknown split, too few images)."""


@dataclasses.dataclass(frozen=True)
class StimulusSpec:
    """Where an analysis' images come from.

    ``data``: the data config (``data.*`` of a run config; unused for ``source='noise'``);
    ``split`` of ``fold`` (train/val/test or an extra test's name); ``fallback_split``:
    used instead when ``split`` has fewer than 2 images (the study: val <-> test);
    ``image_size``: 0 = ``data.image_size``; ``resize_method``: None = the data config's;
    ``selection``: ``'first'`` N images in split order or ``'random'`` (``seed``, sorted).
    """
    data: Any = None
    split: str = "test"
    fold: int = 0
    num_images: int = 1000
    image_size: int = 0
    resize_method: Optional[str] = None
    selection: str = "first"
    seed: int = 0
    fallback_split: Optional[str] = None
    source: str = "data"

    def size(self) -> int:
        return int(self.image_size or self.data.image_size)


def protocol_of(cfg) -> Dict[str, Any]:
    """A run config's stimulus protocol: its ``analysis`` fields when it declares them
    (Revisiting CCA.py: the validation fold, 224 px for breast / mammograms / thyroid,
    caffe inputs for every model), else the test split at the run's own size with each
    model's own preprocessing (``preprocessing=None``)."""
    a = cfg.get("analysis", None) or {}
    return {"split": a.get("cca_stimulus", "test"),
            "image_size": int(a.get("cca_image_size", 0) or cfg.data.image_size),
            "preprocessing": a.get("cca_preprocessing", None)}


def protocol_spec(cfg, *, fold: int, num_images: int) -> StimulusSpec:
    """The :class:`StimulusSpec` a run config declares (:func:`protocol_of`): its split
    (the other of val/test when that has < 2 images), size and ``data.resize_method``,
    the first ``num_images`` images."""
    proto = protocol_of(cfg)
    other = "val" if proto["split"] == "test" else "test"
    return StimulusSpec(data=cfg.data, split=proto["split"], fold=fold,
                        num_images=num_images, image_size=proto["image_size"],
                        resize_method=cfg.data.get("resize_method", "bilinear"),
                        selection="first", fallback_split=other)


def _split_source(spec: StimulusSpec):
    splits = data_lib.get_splits(spec.data, fold=spec.fold)
    sources = {"train": splits.train, "val": splits.val, "test": splits.test,
               **dict(splits.extra_tests)}
    if spec.split not in sources:
        raise StimulusError(f"stimulus split {spec.split!r}: {splits.name} has splits "
                            f"{sorted(sources)}; choose one (analyze: --split).")
    src = sources[spec.split]
    if len(src) < 2 and spec.fallback_split in sources:
        src = sources[spec.fallback_split]
    if len(src) < 2:
        raise StimulusError(f"stimulus split {spec.split} of {splits.name} fold {spec.fold} "
                            f"has {len(src)} images; need >= 2 (choose another split).")
    return src


def load_pool(spec: StimulusSpec) -> np.ndarray:
    """The stimuli of ``spec``: uint8 (N, S, S, 3), N = min(num_images, split size).

    Each image is resized with ``spec.resize_method`` (a no-op at size S), then grey is
    repeated to three channels (:func:`preprocessing.to_three_channels`).
    """
    if spec.selection not in SELECTIONS:
        raise StimulusError(f"selection={spec.selection!r}: choose one of {SELECTIONS}.")
    rng = np.random.default_rng(spec.seed)
    if spec.source == "noise":
        s = int(spec.image_size)
        return rng.integers(0, 256, (spec.num_images, s, s, 3), np.uint8)
    if spec.source != "data":
        raise StimulusError(f"stimulus source {spec.source!r}: choose one of {SOURCES}.")
    src = _split_source(spec)
    n = min(spec.num_images, len(src))
    idx = (np.arange(n) if spec.selection == "first"
           else np.sort(rng.choice(len(src), n, replace=False)))
    size, method = spec.size(), spec.resize_method or spec.data.get("resize_method",
                                                                     "bilinear")
    out = np.zeros((n, size, size, 3), np.uint8)
    for j, i in enumerate(idx):
        img = pipeline.resize(np.asarray(src[int(i)]["image"]), size, method)
        out[j] = to_three_channels(img)
    return out
