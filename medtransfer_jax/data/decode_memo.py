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

import collections
import os
import threading
from typing import Callable, Hashable, Optional

import numpy as np

ENV = "MEDTRANSFER_DECODE_MEMO_GB"
MAX_DEFAULT_BYTES = 8 * 2 ** 30


def default_limit_bytes() -> int:
    """The byte limit: ``$MEDTRANSFER_DECODE_MEMO_GB`` if set, else min(RAM / 4, 8 GiB)."""
    value = os.environ.get(ENV)
    if value not in (None, ""):
        try:
            return max(0, int(float(value) * 2 ** 30))
        except ValueError:
            raise ValueError(f"{ENV}={value!r} is not a number of GiB (0 turns the memo "
                             "off)") from None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 4 * MAX_DEFAULT_BYTES
    return int(min(ram // 4, MAX_DEFAULT_BYTES))


class DecodeMemo:
    """A thread-safe LRU of read-only uint8 images, bounded in bytes.

    ``get(key, decode)`` returns the memoised image of ``key`` or calls ``decode()`` and
    keeps its result (when it fits). ``hits`` / ``misses`` count the calls.
    """

    def __init__(self, limit_bytes: Optional[int] = None):
        self.limit_bytes = default_limit_bytes() if limit_bytes is None else int(limit_bytes)
        self._items: "collections.OrderedDict[Hashable, np.ndarray]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = self.hits = self.misses = 0

    def get(self, key: Optional[Hashable], decode: Callable[[], np.ndarray]) -> np.ndarray:
        if key is None or self.limit_bytes <= 0:
            return decode()
        with self._lock:
            image = self._items.get(key)
            if image is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return image
            self.misses += 1
        image = np.asarray(decode())
        if image.nbytes > self.limit_bytes:
            return image
        if image.base is not None:   # a view of someone's array: keep a private copy
            image = image.copy()
        image.setflags(write=False)   # shared by every later run: nobody may change it
        with self._lock:
            if key not in self._items:
                self._items[key] = image
                self.nbytes += image.nbytes
                while self.nbytes > self.limit_bytes:
                    _, old = self._items.popitem(last=False)
                    self.nbytes -= old.nbytes
        return image

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)


#: The process's memo (device and host caches read through it).
MEMO = DecodeMemo()
