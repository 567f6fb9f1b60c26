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

import os
import posixpath
import uuid
from typing import IO, List, Union

from etils import epath

PathLike = Union[str, os.PathLike]

# URL schemes that epath serves; anything else is a local path.
REMOTE_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def _text(path: PathLike) -> str:
    """``path`` as a plain string (a URL keeps its ``scheme://``)."""
    if isinstance(path, epath.Path):
        return os.fspath(path)
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = text.decode()
    return text


def is_remote(path: PathLike) -> bool:
    """True for ``gs://...`` (and the other URL schemes epath serves)."""
    return _text(path).startswith(REMOTE_SCHEMES)


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
