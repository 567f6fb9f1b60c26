"""Finds every unreadable image of a run's splits before training starts.

Without it a corrupt JPEG surfaces when the pipeline first reads it, minutes into
training, and only that one file is named. :func:`check_splits` reads every file the
splits use (header verify, then a full decode) on a thread pool -- PIL releases the GIL
while decoding -- and raises one DataError listing all bad files with their reasons.

Only file-backed sources are checked (in-memory and synthetic data cannot be corrupt).
The loop skips the check with ``data.skip_corrupt=True``: such sources have already
dropped (and counted) their unreadable files. A file found readable is not read again
by a later run of the same process (a study's 25 runs per target check it once), and
a set of files found readable, unchanged since, is not read again by a later process
(a marker in the on-disk decode store, :mod:`medtransfer_jax.data.decode_store`).
"""
from __future__ import annotations

import concurrent.futures
import io
import os
from typing import Dict, List, Optional, Set, Tuple

from PIL import Image

from medtransfer_jax import paths
from medtransfer_jax.data import decode_store
from medtransfer_jax.data.base import (DataError, DatasetSplits, Source, SubsetSource,
                                       TransformedSource, hashable_by_value)
from medtransfer_jax.data.sources import FileSource

#: How many bad files the error message lists in full (the count is always exact).
MAX_LISTED = 20


def _file_sources(source: Source, indices=None) -> List[Tuple[FileSource, List[int]]]:
    """The file-backed source(s) under ``source`` and the indices of theirs it reads."""
    if isinstance(source, SubsetSource):
        base_idx = source.indices if indices is None else source.indices[indices]
        return _file_sources(source.base, list(map(int, base_idx)))
    if isinstance(source, TransformedSource):
        return _file_sources(source.base, indices)
    if isinstance(source, FileSource):
        return [(source, list(range(len(source))) if indices is None else list(indices))]
    return []


def check_file(path: str, loader=None) -> Optional[str]:
    """None if ``path`` is a readable image (or ``loader(path)`` succeeds), else the reason.

    A local file is opened by path (twice: verify, then decode); an object in a bucket
    is downloaded once and both passes read the same bytes.
    """
    try:
        if loader is not None:
            if not paths.is_remote(path) and not os.path.isfile(path):
                return "file not found"
            loader(path)
            return None
        data = paths.read_bytes(path) if paths.is_remote(path) else None
        # First the header / chunk structure (cheap), then -- verify() leaves the image
        # unusable -- a full decode as training will do (catches truncated JPEG data).
        for step in ("verify", "load"):
            with Image.open(path if data is None else io.BytesIO(data)) as im:
                getattr(im, step)()
        return None
    except FileNotFoundError:
        return "file not found"
    except Exception as e:  # noqa: BLE001 -- any failure of a file counts as unreadable
        return f"{type(e).__name__}: {e}"


#: (path, loader) of the files this process found readable.
_CHECKED_GOOD: Set[Tuple[str, object]] = set()


def _good_key(path: str, loader) -> Optional[Tuple[str, object]]:
    return (path, loader) if loader is None or hashable_by_value(loader) else None


def check_splits(splits: DatasetSplits, num_threads: Optional[int] = None) -> int:
    """Reads every file used by ``splits`` once, in parallel; returns how many files the
    splits use (those this process already found readable are not read again).

    Raises:
      DataError listing every unreadable file (path: reason) and the fix.
    """
    todo: Dict[str, object] = {}
    parts = [splits.train, splits.val, splits.test, *splits.extra_tests.values()]
    for part in parts:
        for src, idx in _file_sources(part):
            for i in idx:
                todo.setdefault(src.paths[i], src.loaders[i])
    total = len(todo)
    todo = {p: ld for p, ld in todo.items() if _good_key(p, ld) not in _CHECKED_GOOD}
    if not todo:
        return total
    if decode_store.STORE.checked(todo.items()):   # an earlier process read these very files
        _CHECKED_GOOD.update(k for k in (_good_key(p, ld) for p, ld in todo.items()) if k)
        return total
    workers = num_threads or min(32, 4 * (os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        errors = list(pool.map(lambda kv: check_file(*kv), todo.items()))
    bad = [(path, err) for path, err in zip(todo, errors) if err is not None]
    _CHECKED_GOOD.update(_good_key(p, ld) for (p, ld), err in zip(todo.items(), errors)
                         if err is None and _good_key(p, ld) is not None)
    if bad:
        listed = "; ".join(f"{p}: {e}" for p, e in bad[:MAX_LISTED])
        more = f"; ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DataError(f"{len(bad)} of {total} image files of dataset {splits.name!r} "
                        f"cannot be read: {listed}{more}. Fix or remove them, or set "
                        "--config.data.skip_corrupt=True to skip (and count) them.")
    decode_store.STORE.mark_checked(todo.items())
    return total
