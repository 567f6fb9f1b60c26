"""A thread-safe least-recently-used map, bounded by a total size: the one process-level
cache both the decode memo (images, bounded in bytes) and the program cache (jitted steps,
bounded in count) are built on.
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Hashable


class LRU:
    """``get(key, build)``: the value kept under ``key``, else ``build()`` (called outside
    the lock, so builds of different keys run in parallel) kept while the total
    ``size_of`` of the values stays within ``limit`` (least recently used dropped first;
    a value larger than ``limit`` is returned, not kept). ``limit`` <= 0 keeps nothing
    and counts nothing. ``hits`` / ``misses`` count the other calls.
    """

    def __init__(self, limit: int, size_of: Callable[[Any], int] = lambda value: 1):
        self.limit = limit
        self.size_of = size_of
        self._items: "collections.OrderedDict[Hashable, Any]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self.size = self.hits = self.misses = 0

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        if self.limit <= 0:
            return build()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        value = build()
        size = self.size_of(value)
        if size > self.limit:
            return value
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self.size += size
                while self.size > self.limit:
                    _, old = self._items.popitem(last=False)
                    self.size -= self.size_of(old)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.size = self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)
