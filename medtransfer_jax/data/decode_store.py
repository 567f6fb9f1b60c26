"""Decoded images and file checks kept on disk, shared by every process on the machine.

The decode memo (:mod:`medtransfer_jax.data.decode_memo`) lets the runs of *one* process
share pixels. Runs in separate processes -- ``study --mode=subprocess``, ``sweep``, a run
restarted after a preemption -- each read every file twice: once for the integrity check
(a full decode) and once to decode and resize it. For large scans that is most of a run's
start: a 1500 x 1200 chest X-ray JPEG takes ~5 ms to decode and resize on one core, a
mammogram PNG far more, and a target is fine-tuned 25 times. Here each resized image is
written once as a small ``.npy``, and a split whose files were all found readable leaves
a marker, so the next process reads the pixels instead of decoding them.

Where: ``$MEDTRANSFER_DECODE_CACHE`` or ``~/.cache/medtransfer_jax/decoded``; '' turns it
off. Entries live under a folder named by the *code fingerprint* (the bytes of
``medtransfer_jax/data``'s modules, PIL's and NumPy's versions), so code that could
change the pixels never reads another version's entries; old folders may be deleted any
time. An entry's name hashes the image key (file, loader, confounder or generator), the
file's size and modification time, the target size and the resize filter: a file
changed on disk is decoded again. Only images read from local files are stored
(generated images are cheap to make; a bucket object has no cheap modification time),
and only keys made of plain values and frozen dataclasses.

Writes are atomic (a temporary file renamed into place), so processes started together
may write the same entry; a disk that is full or read-only turns writing off for the
process with one warning, and an unreadable entry is decoded again and rewritten.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import tempfile
import threading
from typing import Callable, Hashable, Iterable, Optional, Tuple

import numpy as np
import PIL

from medtransfer_jax import paths
from medtransfer_jax.data.sources import FILE_KEY

log = logging.getLogger(__name__)

ENV = "MEDTRANSFER_DECODE_CACHE"
DEFAULT_DIR = "~/.cache/medtransfer_jax/decoded"
#: Bumped when the entry layout changes.
FORMAT = 1


class Unstorable(Exception):
    """A key with no stable on-disk name (an object keyed by identity, a bucket file)."""


def encode_key(key, files: Optional[list] = None) -> str:
    """A stable text for ``key``: plain values, tuples and frozen dataclasses (by class and
    fields), with every local file of a ``(FILE_KEY, path, loader)`` tuple stamped with
    its absolute path, size and modification time (and appended to ``files``). Raises
    Unstorable otherwise."""
    if key is None or isinstance(key, (bool, int, float, str)):
        return repr(key)
    if isinstance(key, tuple):
        if len(key) == 3 and key[0] == FILE_KEY and isinstance(key[1], str):
            if files is not None:
                files.append(key[1])
            return f"file({_file_stamp(key[1])},{encode_key(key[2], files)})"
        return "(" + ",".join(encode_key(k, files) for k in key) + ")"
    params = getattr(type(key), "__dataclass_params__", None)
    if params is not None and params.frozen:
        fields = ",".join(f"{f.name}={encode_key(getattr(key, f.name), files)}"
                          for f in dataclasses.fields(key))
        return f"{type(key).__module__}.{type(key).__qualname__}({fields})"
    raise Unstorable(f"{type(key).__name__} has no stable on-disk key")


def _file_stamp(path: str) -> str:
    if paths.is_remote(path):
        raise Unstorable("a bucket object")
    try:
        st = os.stat(path)
    except OSError:
        raise Unstorable(f"{path} cannot be stat'ed") from None
    return f"{os.path.abspath(path)!r},{st.st_size},{st.st_mtime_ns}"


def code_fingerprint() -> str:
    """A digest of what can change decoded pixels: this package's data modules, PIL, NumPy."""
    h = hashlib.sha256(f"format={FORMAT},PIL={PIL.__version__},numpy={np.__version__}".encode())
    root = pathlib.Path(__file__).resolve().parent
    for module in sorted(root.rglob("*.py")):
        h.update(str(module.relative_to(root)).encode())
        h.update(module.read_bytes())
    return h.hexdigest()[:16]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class DecodeStore:
    """The on-disk store: ``get(key, size, method, decode)`` and the split-check markers.

    ``root`` None means ``$MEDTRANSFER_DECODE_CACHE`` (else :data:`DEFAULT_DIR`), read at
    first use; '' means off. ``reads`` / ``writes`` count entries read and written.
    """

    def __init__(self, root: Optional[str] = None):
        self._root = root
        self._folder: Optional[pathlib.Path] = None
        self._resolved = False
        self._writable = True
        self._lock = threading.Lock()
        self.reads = self.writes = 0

    @property
    def folder(self) -> Optional[pathlib.Path]:
        """``<root>/<code fingerprint>``, or None when the store is off."""
        if not self._resolved:
            root = self._root if self._root is not None else os.environ.get(ENV, DEFAULT_DIR)
            self._folder = (pathlib.Path(os.path.expanduser(root)) / code_fingerprint()
                            if root else None)
            self._resolved = True
        return self._folder

    def _entry(self, kind: str, name: str, suffix: str) -> pathlib.Path:
        return self.folder / kind / name[:2] / (name + suffix)

    # ----------------------------------------------------------------- decoded images
    def get(self, key: Optional[Hashable], size: int, method: str,
            decode: Callable[[], np.ndarray]) -> np.ndarray:
        """The stored image of ``(key, size, method)``, else ``decode()``, stored."""
        if key is None or self.folder is None:
            return decode()
        files: list = []
        try:
            name = _digest(f"{encode_key(key, files)}|{int(size)}|{method}")
        except Unstorable:
            return decode()
        if not files:   # generated pixels (synthetic images) are cheaper to make than to read
            return decode()
        path = self._entry("images", name, ".npy")
        image = self._read(path, int(size))
        if image is not None:
            with self._lock:
                self.reads += 1
            return image
        image = np.asarray(decode())
        if self._write(path, lambda f: np.lib.format.write_array(f, image, allow_pickle=False)):
            with self._lock:
                self.writes += 1
        return image

    @staticmethod
    def _read(path: pathlib.Path, size: int) -> Optional[np.ndarray]:
        try:
            image = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as e:
            log.warning("decode cache: %s is unreadable (%s); decoding the image again", path, e)
            return None
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[:2] != (size, size):
            log.warning("decode cache: %s holds %s %s, not a %d px image; decoding again",
                        path, image.dtype, image.shape, size)
            return None
        return image

    def _write(self, path: pathlib.Path, write: Callable) -> bool:
        """Writes via a temporary file renamed into place; False (and writing turned off
        for the process, with one warning) when the disk refuses."""
        if not self._writable:
            return False
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
            return True
        except OSError as e:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            with self._lock:
                if self._writable:
                    log.warning("decode cache: cannot write under %s (%s); this process goes "
                                "on without storing decoded images (set %s to a writable "
                                "folder, or to '' to turn the cache off)", self.folder, e, ENV)
                self._writable = False
            return False

    # ------------------------------------------------------------ readable-file checks
    def _checked_name(self, files: Iterable[Tuple[str, object]]) -> Optional[str]:
        try:
            return _digest("\n".join(sorted(encode_key((FILE_KEY, p, ld)) for p, ld in files)))
        except Unstorable:
            return None

    def checked(self, files: Iterable[Tuple[str, object]]) -> bool:
        """Whether this exact set of (path, loader), unchanged on disk, was found readable."""
        if self.folder is None:
            return False
        name = self._checked_name(files)
        return name is not None and self._entry("checked", name, "").exists()

    def mark_checked(self, files: Iterable[Tuple[str, object]]) -> None:
        """Records that every (path, loader) of ``files``, as they are now, is readable."""
        if self.folder is None:
            return
        name = self._checked_name(files)
        if name is not None:
            self._write(self._entry("checked", name, ""), lambda f: None)


#: The process's store (the device and host caches and the integrity check use it).
STORE = DecodeStore()
