"""Local and ``gs://`` paths through one small API (``etils.epath``).

Why: on a Cloud TPU pod slice every host must see the same run directory, and the
simplest shared directory is a bucket. ``os.path`` knows nothing of URLs:
``os.path.abspath("gs://b/run")`` is ``$PWD/gs:/b/run``, a *local* folder that each
host then fills on its own. Every place that accepts a user path (workdirs, weights
dirs, study/sweep roots, data roots) should therefore go through these helpers, which
keep a URL intact and hand it to ``epath`` (fsspec + gcsfs, or ``tf.io.gfile`` where
TensorFlow is installed); orbax takes the resulting ``epath.Path`` (or its ``str``)
and writes checkpoints to GCS directly, so no gcsfuse mount is needed for them.

Local paths keep their usual meaning: ``~`` is expanded and relative paths are made
absolute against the current directory, so a run directory logged once stays valid.

Reading/writing ``gs://`` needs ``gcsfs`` (``pip install medtransfer_jax[gcs]``) or
TensorFlow on the worker; these helpers only *name* paths until something touches
the bucket.
"""
from __future__ import annotations

import collections
import importlib.util
import io
import os
import posixpath
import uuid
from typing import IO, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from etils import epath

from medtransfer_jax.errors import UserError

PathLike = Union[str, os.PathLike]

# URL schemes that epath serves; anything else is a local path.
REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def _text(path: PathLike) -> str:
    """``path`` as a plain string (a URL keeps its ``scheme://``)."""
    if type(path) is str:   # the common case, per file of a dataset: keep it cheap
        return path
    if isinstance(path, epath.Path):
        return os.fspath(path)
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = text.decode()
    return text


def is_remote(path: PathLike) -> bool:
    """True for ``gs://...`` (and the other URL schemes epath serves)."""
    return _text(path).startswith(REMOTE_SCHEMES)


class RemoteSupportError(UserError):
    """A ``gs://`` path on a machine without the libraries that read buckets."""


def remote_support_installed() -> bool:
    """True when epath can reach ``gs://``: gcsfs (fsspec) or TensorFlow (tf.io.gfile)."""
    return any(importlib.util.find_spec(m) is not None for m in ("gcsfs", "tensorflow"))


def require_remote_support(path: PathLike, what: str = "path") -> None:
    """Raises RemoteSupportError for a URL when neither gcsfs nor TensorFlow is installed.

    Without either, epath fails deep inside fsspec on the first read; this names the
    flag/field and the one command that fixes it instead.
    """
    if not is_remote(path) or remote_support_installed():
        return
    raise RemoteSupportError(
        f"{what}={_text(path)}: reading gs:// needs gcsfs (or TensorFlow) on this machine; "
        "pip install 'medtransfer_jax[gcs]' (launch/setup_worker.sh does), or use a local path")


def as_path(path: PathLike) -> epath.Path:
    """``path`` as an ``epath.Path`` without changing it (relative stays relative)."""
    return epath.Path(_text(path))


def workdir(path: PathLike) -> epath.Path:
    """A user-given directory (or file) path, resolved once for the whole run.

    ``gs://bucket/run`` is returned as it is; a local path gets ``~`` expanded and is
    made absolute. Use this wherever a main receives ``--workdir``/``--output``/
    ``--root``, instead of ``os.path.abspath(os.path.expanduser(...))``.

    Raises:
      ValueError: for an empty path (a missing flag).
    """
    text = _text(path)
    if not text:
        raise ValueError("empty path; pass a directory such as runs/x or gs://bucket/x")
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def join(base: PathLike, *parts: str) -> epath.Path:
    """``base/part/...`` for local or remote ``base`` (no ``os.path.join`` on URLs)."""
    return as_path(base).joinpath(*parts)


def basename(path: PathLike) -> str:
    """The last component, for local paths and URLs alike."""
    return posixpath.basename(_text(path).rstrip("/"))


def expand(path: PathLike) -> str:
    """A user path as a string: a URL unchanged, a local path with ``~`` expanded.

    Unlike :func:`workdir` a relative local path stays relative (data roots keep the
    form the user gave, so ids and messages read as before).
    """
    text = _text(path)
    return text if is_remote(text) else os.path.expanduser(text)


def relpath(path: PathLike, root: PathLike) -> str:
    """``path`` relative to ``root``; for URLs a plain prefix strip (``os.path.relpath``
    would make ``gs://b`` absolute against the cwd)."""
    text, base = _text(path), _text(root)
    if not (text.startswith(REMOTE_SCHEMES) or base.startswith(REMOTE_SCHEMES)):
        return os.path.relpath(text, base)
    base = base.rstrip("/") + "/"
    if not text.startswith(base):
        raise ValueError(f"{text} is not under {base}")
    return text[len(base):]


def is_absolute(path: PathLike) -> bool:
    """True for a URL or an absolute local path."""
    return is_remote(path) or os.path.isabs(_text(path))


def exists(path: PathLike) -> bool:
    return as_path(path).exists()


def isdir(path: PathLike) -> bool:
    return as_path(path).is_dir()


def isfile(path: PathLike) -> bool:
    return as_path(path).is_file()


def getsize(path: PathLike) -> int:
    """Size in bytes of a file."""
    return int(as_path(path).stat().length)


def listdir(path: PathLike) -> List[str]:
    """Names (not paths) of the entries of a directory, sorted."""
    return sorted(p.name for p in as_path(path).iterdir())


def scandir(folder: PathLike) -> Optional[Tuple[List[str], List[str]]]:
    """``(dirs, files)``: sorted names in ``folder`` from ONE listing; None if no folder.

    Why not ``listdir`` + ``isdir`` per entry: on a bucket each of those is an HTTP
    round trip (tens of ms), so a 10,000-image folder would take minutes; one listing
    (``ls`` with object types, paginated by the server) takes well under a second.
    Locally this is one ``os.scandir``.
    """
    text = _text(folder)
    if not is_remote(text):
        try:
            with os.scandir(text) as it:
                entries = [(e.name, e.is_dir()) for e in it]
        except (FileNotFoundError, NotADirectoryError):
            return None
    else:
        # epath's walk lists one level per step (fsspec / tf.io.gfile alike); take the
        # first step only. A missing prefix yields nothing.
        top = next(iter(as_path(text).walk()), None)
        if top is None:
            return None
        entries = [(d, True) for d in top[1]] + [(f, False) for f in top[2] if f]
    dirs = sorted(n for n, is_dir in entries if is_dir)
    files = sorted(n for n, is_dir in entries if not is_dir)
    return dirs, files


def walk(folder: PathLike) -> Iterator[Tuple[str, List[str], List[str]]]:
    """``os.walk`` for local folders and URLs: ``(folder, dirs, files)`` top-down, each
    folder listed once (:func:`scandir`); prune by editing ``dirs`` in place. ``folder``
    strings keep their ``gs://`` (fsspec's own walk returns them without it)."""
    text = _text(folder)
    if not is_remote(text):
        yield from os.walk(text)
        return
    yield from Listings().walk(text)


class Listings:
    """Answers ``isdir``/``isfile``/``names`` from cached folder listings.

    A dataset parser asks "is there a ``train/`` here, a ``train-acl.csv`` there?" dozens
    of times and then "does each of these 10,000 files exist?". On a bucket each
    question would be a round trip; here each *folder* is listed once (:func:`scandir`)
    and every later question about it is a dictionary lookup. Local paths keep the
    cheaper ``stat`` for ``isdir``/``isfile`` (no parent listing). Listings are a
    snapshot: make a new object to see files written since.
    """

    def __init__(self):
        self._cache: Dict[str, Optional[Tuple[List[str], List[str]]]] = {}

    def listing(self, folder: PathLike) -> Optional[Tuple[List[str], List[str]]]:
        key = _text(folder).rstrip("/") or "/"
        if key not in self._cache:
            self._cache[key] = scandir(key)
        return self._cache[key]

    def _in(self, path: PathLike, kind: int) -> bool:
        text = _text(path)
        if not is_remote(text):
            return os.path.isdir(text) if kind == 0 else os.path.isfile(text)
        text = text.rstrip("/")
        parent, name = posixpath.split(text)
        if text.count("/") < 3:   # gs://bucket itself
            return kind == 0 and self.listing(text) is not None
        listing = self.listing(parent)
        return listing is not None and name in listing[kind]

    def isdir(self, path: PathLike) -> bool:
        return self._in(path, 0)

    def isfile(self, path: PathLike) -> bool:
        return self._in(path, 1)

    def walk(self, folder: PathLike) -> Iterator[Tuple[str, List[str], List[str]]]:
        """:func:`walk` through this cache (a URL's folders are listed at most once)."""
        text = _text(folder)
        if not is_remote(text):
            yield from os.walk(text)
            return
        listing = self.listing(text)
        if listing is None:
            return
        dirs, files = list(listing[0]), list(listing[1])
        yield text, dirs, files
        for d in dirs:
            yield from self.walk(posixpath.join(text, d))

    def names(self, folder: PathLike) -> List[str]:
        """Sorted names (dirs and files) in ``folder``; [] if it does not exist."""
        listing = self.listing(folder)
        return sorted(listing[0] + listing[1]) if listing else []


def missing_files(files: Iterable[PathLike], listings: Optional[Listings] = None) -> List[str]:
    """The entries of ``files`` that are not existing files, in order.

    Local paths: one ``stat`` each (cheap). URLs: one listing per parent folder
    (``listings``, e.g. the one a dataset parser already filled), not one request per file.
    """
    files = [_text(f) for f in files]
    by_parent = collections.defaultdict(list)
    missing = set()
    for f in files:
        if f.startswith(REMOTE_SCHEMES):
            by_parent[posixpath.dirname(f)].append(f)
        elif not os.path.isfile(f):
            missing.add(f)
    listings = listings or Listings()
    for parent, group in by_parent.items():
        listing = listings.listing(parent)
        names = set(listing[1]) if listing else set()
        missing.update(f for f in group if posixpath.basename(f) not in names)
    return [f for f in files if f in missing]


def makedirs(path: PathLike) -> epath.Path:
    """Creates ``path`` and its parents if missing; returns it as an ``epath.Path``.

    On GCS "directories" are only name prefixes, so this does (almost) nothing there
    and ``isdir`` becomes true once something is written below the prefix: test for a
    file you wrote (``metadata.json``, ``results.json``), not for the directory.
    """
    p = as_path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def open(path: PathLike, mode: str = "r") -> IO:  # pylint: disable=redefined-builtin
    """Opens a local file or a remote object (``'a'`` is not available on GCS)."""
    return as_path(path).open(mode)


def open_text(path: PathLike, encoding: str = "utf-8") -> IO[str]:
    """A text stream over a local file or an object, newlines untranslated (what the
    ``csv`` module wants: ``open(path, newline="")``)."""
    return io.TextIOWrapper(as_path(path).open("rb"), encoding=encoding, newline="")


def read_text(path: PathLike) -> str:
    return as_path(path).read_text()


def read_bytes(path: PathLike) -> bytes:
    return as_path(path).read_bytes()


def write_text_atomic(path: PathLike, text: str) -> epath.Path:
    """Writes ``text`` so that a reader sees the old or the new file, never half of it.

    Locally: a uniquely named temporary file beside the target, then ``os.replace``
    (unique, so two writers never share a temporary file). On GCS an object upload
    becomes visible only when complete, so the object is written directly; a rename
    there would be a copy plus a delete, which is neither atomic nor cheaper.
    """
    return _write_atomic(path, text.encode())


def write_bytes_atomic(path: PathLike, data: bytes) -> epath.Path:
    """Bytes version of :func:`write_text_atomic`."""
    return _write_atomic(path, data)


def _write_atomic(path: PathLike, data: bytes) -> epath.Path:
    p = as_path(path)
    if is_remote(p):
        p.write_bytes(data)
        return p
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        os.replace(os.fspath(tmp), os.fspath(p))
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def append_text(path: PathLike, text: str) -> epath.Path:
    """Appends ``text`` to a (log/metrics) file, creating it if missing.

    GCS objects cannot be appended to, so remotely this rewrites the whole object
    (read + write): fine for metrics files of a few MB written every few hundred
    steps, wrong for anything written per step. Only one process may append to a
    given file (use one file per process, or write from process 0 only).
    """
    p = as_path(path)
    if not is_remote(p):
        with p.open("a") as f:
            f.write(text)
        return p
    old = p.read_text() if p.exists() else ""
    p.write_text(old + text)
    return p


def to_str(path: PathLike) -> str:
    """The string form to hand to libraries that want ``str`` (URL kept intact)."""
    return _text(path)
