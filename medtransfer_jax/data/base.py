"""Random-access sources and the split container every dataset is turned into.

A *source* holds the per-example labels, ids, patient groups and metadata as arrays
(cheap, so splitting and confounder sampling never decode an image) and decodes the
image of example ``i`` only when ``source[i]`` is read. Sources are picklable so grain
worker processes can read them.

A record (``source[i]``) is a dict::

    {'image': uint8 (H, W) or (H, W, 3), 'label': int, 'id': str, 'group': str, **metadata}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Hashable, Mapping, Optional, Sequence, Tuple

import numpy as np

from medtransfer_jax.errors import UserError


class DataError(UserError):
    """A dataset file or folder cannot be used; the message names the path and the fix."""


class Source:
    """Base class: subclasses set the column arrays and implement :meth:`load_image`.

    Attributes:
      labels: int64 (N,) class index per example.
      ids: (N,) object array of stable unique str ids.
      groups: (N,) object array of patient ids (the image id where there is none).
      meta: dict of (N,) arrays of extra per-example columns (e.g. ``sex``, ``age``).
      class_names: tuple of the class names, ``len == num_classes``.
    """

    labels: np.ndarray
    ids: np.ndarray
    groups: np.ndarray
    meta: Dict[str, np.ndarray]
    class_names: Tuple[str, ...]

    def __len__(self) -> int:
        return int(len(self.labels))

    def load_image(self, index: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def image_key(self, index: int) -> Optional[Hashable]:
        """A hashable name of where ``load_image(index)``'s pixels come from (a file and
        its loader, a generator's parameters), the same for every Source object built from
        the same data; None where there is none. The decode memo
        (:mod:`medtransfer_jax.data.decode_memo`) keys on it, so a study decodes each
        image once however many folds and runs reuse it."""
        return None

    def _check_index(self, index) -> int:
        index = int(index)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a source of {n} examples")
        return index

    def __getitem__(self, index) -> Dict[str, Any]:
        index = self._check_index(index)
        record = {
            "image": self.load_image(index),
            "label": int(self.labels[index]),
            "id": str(self.ids[index]),
            "group": str(self.groups[index]),
        }
        for key, column in self.meta.items():
            value = column[index]
            record[key] = value.item() if isinstance(value, np.generic) else value
        return record

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        counts = np.bincount(self.labels, minlength=self.num_classes) if len(self) else []
        return (f"{type(self).__name__}(n={len(self)}, classes={dict(zip(self.class_names, map(int, counts)))})")


def _as_object_array(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


class SubsetSource(Source):
    """A view of ``base`` restricted to (and reordered by) ``indices``; no copy of images."""

    def __init__(self, base: Source, indices: Sequence[int]):
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(base)):
            raise IndexError(f"subset indices out of range for a source of {len(base)} examples")
        # Flatten nested subsets so a lookup is one hop.
        if isinstance(base, SubsetSource):
            indices = base.indices[indices]
            base = base.base
        self.base = base
        self.indices = indices
        self.labels = base.labels[indices]
        self.ids = base.ids[indices]
        self.groups = base.groups[indices]
        self.meta = {k: v[indices] for k, v in base.meta.items()}
        self.class_names = base.class_names

    def load_image(self, index: int) -> np.ndarray:
        return self.base.load_image(int(self.indices[index]))

    def image_key(self, index: int) -> Optional[Hashable]:
        return self.base.image_key(int(self.indices[index]))

    def __getitem__(self, index):
        index = self._check_index(index)
        return self.base[int(self.indices[index])]


class RelabeledSource(Source):
    """``base`` with its labels replaced by ``labels`` (N,): the split files, not the
    dataset's label rule, decide the class (Source Matters' chest-14 CSVs)."""

    def __init__(self, base: Source, labels: Sequence[int]):
        labels = np.asarray(labels, np.int64)
        if labels.shape != (len(base),):
            raise ValueError(f"labels must have shape ({len(base)},), got {labels.shape}")
        self.base = base
        self.labels = labels
        self.ids = base.ids
        self.groups = base.groups
        self.meta = base.meta
        self.class_names = base.class_names

    def load_image(self, index: int) -> np.ndarray:
        return self.base.load_image(index)

    def image_key(self, index: int) -> Optional[Hashable]:
        return self.base.image_key(index)


class TransformedSource(Source):
    """``base`` with ``fn(image, id) -> image`` applied to the examples selected by ``apply_mask``.

    ``fn`` (and ``fn_other``, applied to the unselected examples, default identity) must be
    picklable pure functions of the image and the example id, so the transformed dataset is
    deterministic and works in grain worker processes. The ``id`` is kept (a confounded
    image is still that patient's image) and a metadata column ``meta_key`` records the mask.
    """

    def __init__(self, base: Source, fn: Callable[[np.ndarray, str], np.ndarray],
                 apply_mask: Optional[np.ndarray] = None,
                 fn_other: Optional[Callable[[np.ndarray, str], np.ndarray]] = None,
                 meta_key: str = "confounded"):
        self.base = base
        self.fn = fn
        self.fn_other = fn_other
        mask = np.ones(len(base), bool) if apply_mask is None else np.asarray(apply_mask, bool)
        if mask.shape != (len(base),):
            raise ValueError(f"apply_mask must have shape ({len(base)},), got {mask.shape}")
        self.mask = mask
        self.labels = base.labels
        self.ids = base.ids
        self.groups = base.groups
        self.meta = dict(base.meta)
        self.meta[meta_key] = mask.astype(np.int64)
        self.class_names = base.class_names

    def load_image(self, index: int) -> np.ndarray:
        image = self.base.load_image(index)
        if self.mask[index]:
            return self.fn(image, str(self.ids[index]))
        if self.fn_other is not None:
            return self.fn_other(image, str(self.ids[index]))
        return image

    def image_key(self, index: int) -> Optional[Hashable]:
        """The base's key, the function applied and the id it is given; None unless the
        function is hashable by value (a frozen dataclass such as confounders.Artifact)."""
        fn = self.fn if self.mask[index] else self.fn_other
        base = self.base.image_key(index)
        if base is None or fn is None:
            return base
        if not hashable_by_value(fn):
            return None
        return ("transformed", fn, str(self.ids[index]), base)


def hashable_by_value(fn) -> bool:
    """Whether ``fn``'s hash and equality come from its fields (a frozen dataclass): a
    plain function or lambda would be keyed by identity, unsafe for an image key."""
    params = getattr(type(fn), "__dataclass_params__", None)
    if params is None or not params.frozen:
        return False
    try:
        hash(fn)
    except TypeError:
        return False
    return True


class ArraySource(Source):
    """In-memory images (tests, small datasets): ``images`` (N, H, W[, 3]) uint8."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], class_names: Sequence[str],
                 ids: Optional[Sequence[str]] = None, groups: Optional[Sequence[str]] = None,
                 meta: Optional[Mapping[str, Sequence[Any]]] = None):
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise DataError(f"ArraySource expects uint8 images, got {images.dtype}")
        self.images = images
        self.labels = np.asarray(labels, np.int64)
        n = len(self.labels)
        if len(images) != n:
            raise DataError(f"{len(images)} images but {n} labels")
        self.ids = _as_object_array(ids if ids is not None else [f"{i:06d}" for i in range(n)])
        self.groups = _as_object_array(groups if groups is not None else list(self.ids))
        self.meta = {k: np.asarray(v) for k, v in (meta or {}).items()}
        self.class_names = tuple(class_names)
        check_labels(self.labels, self.class_names, "ArraySource")

    def load_image(self, index: int) -> np.ndarray:
        return self.images[index]


def check_labels(labels: np.ndarray, class_names: Sequence[str], where: str,
                 require_all: bool = False) -> None:
    """Raises DataError if labels fall outside ``class_names`` (or a class is empty)."""
    k = len(class_names)
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise DataError(f"{where}: labels must be in [0, {k}) for classes {tuple(class_names)}, "
                        f"got range [{labels.min()}, {labels.max()}]")
    if require_all:
        counts = np.bincount(labels, minlength=k) if len(labels) else np.zeros(k, int)
        empty = [class_names[c] for c in range(k) if counts[c] == 0]
        if empty:
            raise DataError(f"{where}: class(es) {empty} have no examples; every class needs at least "
                            "one image (check the folder names / label column).")


@dataclasses.dataclass
class DatasetSplits:
    """What the trainer consumes: train/val/test sources plus extra test sets.

    ``extra_tests`` maps a name (e.g. Source Matters' ``'iid'``, ``'clean'``, ``'ood'``) to a
    source evaluated alongside ``test``; empty for plain datasets.
    """

    train: Source
    val: Source
    test: Source
    num_classes: int
    class_names: Tuple[str, ...]
    name: str
    extra_tests: Dict[str, Source] = dataclasses.field(default_factory=dict)
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """One line per split: size and per-class counts."""
        lines = [f"{self.name}: {self.num_classes} classes {self.class_names}"]
        parts = [("train", self.train), ("val", self.val), ("test", self.test)]
        parts += sorted(self.extra_tests.items())
        for split, src in parts:
            counts = np.bincount(src.labels, minlength=self.num_classes) if len(src) else []
            lines.append(f"  {split}: {len(src)} {list(map(int, counts))}")
        return "\n".join(lines)
