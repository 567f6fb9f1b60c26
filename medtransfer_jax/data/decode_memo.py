"""Decoded, resized images kept across the runs of one process: each target decoded once.

A study fine-tunes every target 25 times (5 sources x 5 folds) in one process, and every
run's device or host cache used to read, decode and resize its split again: on an H200
that was a large part of a run's ~18.5 s fixed cost (BENCHMARKS.md section 10). The
folds are re-partitions of the same images, so the memo keys each image by *where its
pixels come from* (:meth:`medtransfer_jax.data.base.Source.image_key`: the file and
loader, the synthetic generator's parameters, the confounder applied) plus the target
size and resize filter. A source that cannot name its pixels (``image_key`` None) is
decoded as before.

Bounded: least recently used images are dropped past ``MEDTRANSFER_DECODE_MEMO_GB``
(default: a quarter of the host's memory, at most 8 GiB; ``0`` turns the memo off). A
file changed on disk while the process runs is not noticed: the memo lives for one
process, like the study that reads it.
"""
from __future__ import annotations

import os
from typing import Callable, Hashable, Optional

import numpy as np

from medtransfer_jax import lru
from medtransfer_jax.errors import ConfigError

ENV = "MEDTRANSFER_DECODE_MEMO_GB"
MAX_DEFAULT_BYTES = 8 * 2 ** 30


def default_limit_bytes() -> int:
    """The byte limit: ``$MEDTRANSFER_DECODE_MEMO_GB`` if set, else min(RAM / 4, 8 GiB)."""
    value = os.environ.get(ENV)
    if value not in (None, ""):
        try:
            return max(0, int(float(value) * 2 ** 30))
        except ValueError:
            raise ConfigError(f"{ENV}={value!r} is not a number of GiB; set it to one (e.g. "
                              f"{ENV}=4), to 0 to turn the decode memo off, or unset it"
                              ) from None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 4 * MAX_DEFAULT_BYTES
    return int(min(ram // 4, MAX_DEFAULT_BYTES))


class DecodeMemo(lru.LRU):
    """The LRU of read-only uint8 images, bounded in bytes (``limit_bytes``, ``nbytes``).

    ``get(key, decode)`` returns the memoised image of ``key`` or calls ``decode()`` and
    keeps its result (when it fits); a ``None`` key is never memoised.
    """

    def __init__(self, limit_bytes: Optional[int] = None):
        super().__init__(limit_bytes, size_of=lambda image: image.nbytes)

    @property
    def limit(self) -> int:
        """The byte limit; ``None`` given means :func:`default_limit_bytes`, read at first
        use (not at import: a bad environment value is then a one-line error of the main
        that uses it, raised by config validation before anything is written)."""
        if self._limit is None:
            self._limit = default_limit_bytes()
        return self._limit

    @limit.setter
    def limit(self, value: Optional[int]) -> None:
        self._limit = None if value is None else int(value)

    limit_bytes = limit
    nbytes = property(lambda self: self.size)

    def get(self, key: Optional[Hashable], decode: Callable[[], np.ndarray]) -> np.ndarray:
        if key is None or self.limit <= 0:
            return decode()
        return super().get(key, lambda: _read_only(decode()))


def _read_only(image) -> np.ndarray:
    """A private, read-only copy-if-needed: every later run shares it, nobody may change it."""
    image = np.asarray(image)
    if image.base is not None:   # a view of someone's array: keep a private copy
        image = image.copy()
    image.setflags(write=False)
    return image


#: The process's memo (device and host caches read through it).
MEMO = DecodeMemo()
