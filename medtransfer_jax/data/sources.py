"""File-backed sources: a list of examples decoded lazily with PIL (or a custom loader).

* :class:`FileSource` -- the common base: ``Example`` records (file, label, id, patient,
  metadata), checked on construction (missing files are reported with their paths) and
  decoded on read. With ``skip_corrupt=True`` every image is decoded once up front and
  unreadable / missing ones are dropped, with the count and the first paths in the log.
* :class:`ImageFolderSource` -- ``root/<class>/**/*.{png,jpg,jpeg,bmp,tif,tiff}``.
* :class:`CsvSource` -- a CSV with ``path,label[,group]`` columns (extra columns become
  metadata); relative paths are resolved against ``root`` (default: the CSV's folder).

Every failure is a :class:`DataError` whose message names the file and the fix.

Paths may be local or ``gs://`` URLs: folders are listed once each through
:mod:`medtransfer_jax.paths` (a bucket answers one listing per folder, not one request
per file), remote files are read as bytes and decoded from memory, and local files are
opened by path as before (no extra copy).
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import logging
import os
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from medtransfer_jax import paths
from medtransfer_jax.data.base import (DataError, Source, _as_object_array, check_labels,
                                       hashable_by_value)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: The first element of a file's image key: ``(FILE_KEY, path, loader)``.
FILE_KEY = "file"
SKIP_HINT = "Fix or remove the file, or set data.skip_corrupt=True to skip unreadable images."


@dataclasses.dataclass
class Example:
    """One example of a file-backed dataset.

    path: the file to read. loader: optional picklable ``loader(path) -> uint8 image``
    (e.g. one slice of an MRNet volume); default: decode the image file with PIL.
    relpath: the path relative to the dataset root (used to match the paper's fold CSVs).
    """

    path: str
    label: int
    id: str
    group: str
    meta: Dict[str, Any] = dataclasses.field(default_factory=dict)
    loader: Optional[Callable[[str], np.ndarray]] = None
    relpath: Optional[str] = None


def decode_image(path: str) -> np.ndarray:
    """Reads an image file -> uint8 (H, W) (grey) or (H, W, 3) (colour).

    16-bit / float images (some mammogram and X-ray PNG/TIFF exports) are min-max scaled
    to 0..255 per image; palette / RGBA / CMYK are converted to RGB. Raises DataError
    naming the file when it is missing, truncated or not an image.
    """
    try:
        with open_image(path) as im:
            im.load()
            mode = im.mode
            if mode in ("L", "RGB"):
                arr = np.asarray(im)
            elif mode in ("1", "LA"):
                arr = np.asarray(im.convert("L"))
            elif mode.startswith("I") or mode == "F":
                arr = _scale_to_uint8(np.asarray(im))
            else:  # P, RGBA, CMYK, YCbCr, ...
                arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"Image file not found: {path}. Check data.root and the dataset layout "
                        "(see the builder's MANUAL_DOWNLOAD_INSTRUCTIONS).") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"Cannot decode image {path}: {type(e).__name__}: {e}. {SKIP_HINT}") from None
    return np.ascontiguousarray(arr)


def open_image(path: str) -> Image.Image:
    """``PIL.Image.open`` for a local file (by path: no copy) or an object in a bucket
    (its bytes read once, decoded from memory). A missing file raises FileNotFoundError."""
    if paths.is_remote(path):
        return Image.open(io.BytesIO(paths.read_bytes(path)))
    return Image.open(path)


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr, np.float64)
    if arr.ndim == 3:
        arr = arr[..., :3]
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0 and hi <= 255 and np.all(arr == np.round(arr)):
        return arr.astype(np.uint8)
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) / (hi - lo) * 255.0).astype(np.uint8)


def load_npy_slice(path: str, axis: int = 0, index: Optional[int] = None) -> np.ndarray:
    """One 2-D slice of a 3-D ``.npy`` volume (middle slice by default), scaled to uint8.

    Local volumes are memory-mapped; a volume in a bucket is read whole (MRNet volumes
    are a few MB; the device cache decodes each slice once).
    """
    try:
        if paths.is_remote(path):
            vol = np.load(io.BytesIO(paths.read_bytes(path)))
        else:
            vol = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"Cannot read volume {path}: {e}. {SKIP_HINT}") from None
    if vol.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {vol.shape}")
    i = vol.shape[axis] // 2 if index is None else index
    if not 0 <= i < vol.shape[axis]:
        raise DataError(f"{path}: slice {i} out of range for shape {vol.shape}")
    sl = np.take(vol, i, axis=axis)
    return sl.astype(np.uint8) if sl.dtype == np.uint8 else _scale_to_uint8(sl)


@dataclasses.dataclass(frozen=True)
class NpySliceLoader:
    """Picklable loader for one slice of a ``.npy`` volume (frozen: equal loaders of one
    file name the same pixels, Source.image_key)."""

    index: int
    axis: int = 0

    def __call__(self, path: str) -> np.ndarray:
        return load_npy_slice(path, self.axis, self.index)


def npy_shape(path: str) -> Tuple[int, ...]:
    """The shape of a ``.npy`` array from its header alone (a bucket object is not
    downloaded whole). Raises OSError/ValueError for a missing or malformed file."""
    with paths.open(path, "rb") as f:
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        return tuple(read(f)[0])


def _check_readable(ex: Example) -> Optional[str]:
    try:
        (ex.loader or decode_image)(ex.path)
        return None
    except DataError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 -- any failure of a custom loader counts as unreadable
        return f"{ex.path}: {type(e).__name__}: {e}"


class FileSource(Source):
    """A source over a list of :class:`Example`.

    Args:
      examples: the examples, in a stable order (the dataset index order).
      class_names: class names; labels index into them.
      name: dataset name for messages.
      skip_corrupt: decode every file once now and drop unreadable ones (logged);
        otherwise missing files raise now and corrupt files raise when read.
      require_all_classes: an empty class is an error.
      num_threads: threads used for the up-front validation.
      listing: the folder listings the parser already made (files in a bucket are then
        checked against them, not listed again).
    """

    def __init__(self, examples: Sequence[Example], class_names: Sequence[str], name: str = "files",
                 skip_corrupt: bool = False, require_all_classes: bool = True, num_threads: int = 4,
                 listing: Optional[paths.Listings] = None):
        self.name = name
        self.class_names = tuple(class_names)
        examples = list(examples)
        self.skipped: List[Tuple[str, str]] = []
        if skip_corrupt:
            with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
                errors = list(pool.map(_check_readable, examples))
            keep = [ex for ex, err in zip(examples, errors) if err is None]
            self.skipped = [(ex.path, err) for ex, err in zip(examples, errors) if err is not None]
            if self.skipped:
                log.warning("%s: skipped %d of %d unreadable/missing files (data.skip_corrupt=True); "
                            "first: %s", name, len(self.skipped), len(examples), self.skipped[0][1])
            examples = keep
        else:
            missing = paths.missing_files((ex.path for ex in examples), listing)
            if missing:
                raise DataError(f"{name}: {len(missing)} of {len(examples)} files do not exist, e.g. "
                                f"{missing[:3]}. Check data.root and the layout, or set "
                                "data.skip_corrupt=True to skip them.")
        ids = [ex.id for ex in examples]
        if len(set(ids)) != len(ids):
            seen, dup = set(), None
            for i in ids:
                if i in seen:
                    dup = i
                    break
                seen.add(i)
            raise DataError(f"{name}: example id {dup!r} occurs more than once")
        self.paths = [ex.path for ex in examples]
        self.loaders = [ex.loader for ex in examples]
        self.relpaths = [ex.relpath or ex.path for ex in examples]
        self.labels = np.asarray([ex.label for ex in examples], np.int64)
        self.ids = _as_object_array(ids)
        self.groups = _as_object_array([ex.group for ex in examples])
        keys = sorted({k for ex in examples for k in ex.meta})
        self.meta = {k: _column([ex.meta.get(k) for ex in examples]) for k in keys}
        check_labels(self.labels, self.class_names, name, require_all=require_all_classes)

    def image_key(self, index: int) -> Optional[Hashable]:
        """(path, loader): a file decoded by PIL, or a loader hashable by value."""
        loader = self.loaders[index]
        if loader is not None and not hashable_by_value(loader):
            return None
        return (FILE_KEY, self.paths[index], loader)

    def load_image(self, index: int) -> np.ndarray:
        loader = self.loaders[index]
        path = self.paths[index]
        if loader is None:
            return decode_image(path)
        try:
            return loader(path)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            raise DataError(f"Cannot load {path}: {type(e).__name__}: {e}. {SKIP_HINT}") from None


def _column(values: List[Any]) -> np.ndarray:
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return np.asarray(values, bool)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, np.int64)
    if all(isinstance(v, (int, float, np.number)) for v in values):
        return np.asarray(values, np.float64)
    return np.asarray(["" if v is None else str(v) for v in values], dtype=object)


def _require_dir(path: Optional[str], what: str) -> str:
    if not path:
        raise DataError(f"{what}: data.root is not set; point it at the dataset folder.")
    path = paths.expand(str(path))
    paths.require_remote_support(path, "data.root")
    if not paths.isdir(path):
        raise DataError(f"{what}: folder not found: {path}. Check data.root.")
    return path


def list_images(folder: str, extensions: Sequence[str] = IMAGE_EXTENSIONS, recursive: bool = True,
                listing: Optional[paths.Listings] = None) -> List[str]:
    """Sorted image files under ``folder`` (case-insensitive extensions), hidden files skipped.

    Each folder is listed once (a bucket answers one listing per folder), through
    ``listing`` (the parser's cache) when given.
    """
    out = []
    exts = tuple(e.lower() for e in extensions)
    for dirpath, dirnames, filenames in (listing or paths.Listings()).walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(exts):
                out.append(os.path.join(dirpath, f))
        if not recursive:
            break
    return sorted(out)


class ImageFolderSource(FileSource):
    """``root/<class_name>/**/<image>``: one sub-folder per class (sorted names unless given).

    ``id`` = the path relative to root; ``group`` = the id (no patient information), or
    ``group_fn(relpath)`` when given.
    """

    def __init__(self, root: str, class_names: Optional[Sequence[str]] = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, skip_corrupt: bool = False,
                 group_fn: Optional[Callable[[str], str]] = None, name: str = "image_folder"):
        root = _require_dir(root, name)
        listing = paths.Listings()   # class folders listed once, here and in FileSource
        if class_names is None:
            class_names = [d for d in (listing.listing(root) or ([], []))[0] if not d.startswith(".")]
            if not class_names:
                raise DataError(f"{name}: no class sub-folders in {root}; expected "
                                f"{root}/<class>/<image files>.")
        examples = []
        for label, cname in enumerate(class_names):
            folder = os.path.join(root, cname)
            if not listing.isdir(folder):
                raise DataError(f"{name}: class folder not found: {folder}")
            files = list_images(folder, extensions, listing=listing)
            if not files:
                raise DataError(f"{name}: class {cname!r} is empty: no {'/'.join(extensions)} "
                                f"files in {folder}")
            for p in files:
                rel = paths.relpath(p, root)
                examples.append(Example(p, label, rel, group_fn(rel) if group_fn else rel, relpath=rel))
        super().__init__(examples, class_names, name=f"{name} {root}", skip_corrupt=skip_corrupt,
                         listing=listing)


class CsvSource(FileSource):
    """A CSV with ``path`` and ``label`` columns (optional ``group``/``id``; others -> metadata).

    Labels may be class names or integers. ``class_names`` fixes the order (default:
    sorted names, or ``0..max`` for integer labels).
    """

    def __init__(self, csv_path: str, root: Optional[str] = None,
                 class_names: Optional[Sequence[str]] = None, skip_corrupt: bool = False,
                 path_column: str = "path", label_column: str = "label",
                 group_column: str = "group", name: str = "csv"):
        csv_path = paths.expand(csv_path) if csv_path else csv_path
        paths.require_remote_support(csv_path or "", "data.csv_path")
        if not csv_path or not paths.isfile(csv_path):
            raise DataError(f"{name}: CSV file not found: {csv_path} (config field data.csv_path)")
        if root is None:
            root = (os.path.dirname(csv_path) if paths.is_remote(csv_path)
                    else os.path.dirname(os.path.abspath(csv_path)))
        root = paths.expand(root)
        with paths.open_text(csv_path) as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            for need in (path_column, label_column):
                if need not in cols:
                    raise DataError(f"{csv_path}: missing column {need!r}; found {cols}. Expected "
                                    f"'{path_column},{label_column}[,{group_column}]'.")
            rows = list(reader)
        if not rows:
            raise DataError(f"{csv_path}: no rows")
        raw_labels = [r[label_column].strip() for r in rows]
        if class_names is None:
            if all(_is_int(v) for v in raw_labels):
                class_names = [str(i) for i in range(max(int(v) for v in raw_labels) + 1)]
            else:
                class_names = sorted(set(raw_labels))
        class_names = [str(c) for c in class_names]
        lookup = {c: i for i, c in enumerate(class_names)}
        examples = []
        for line, (row, lab) in enumerate(zip(rows, raw_labels), start=2):
            if lab in lookup:
                label = lookup[lab]
            elif _is_int(lab) and 0 <= int(lab) < len(class_names):
                label = int(lab)
            else:
                raise DataError(f"{csv_path} line {line}: label {lab!r} is not one of {class_names}")
            rel = row[path_column].strip()
            path = rel if paths.is_absolute(rel) else os.path.join(root, rel)
            ex_id = row.get("id") or rel
            group = (row.get(group_column) or "").strip() or ex_id
            meta = {k: v for k, v in row.items()
                    if k not in (path_column, label_column, group_column, "id") and k}
            examples.append(Example(path, label, ex_id, group, meta, relpath=rel))
        if not skip_corrupt:
            missing = set(paths.missing_files(ex.path for ex in examples))
            for line, ex in enumerate(examples, start=2):
                if ex.path in missing:
                    raise DataError(f"{csv_path} line {line}: file {ex.path} does not exist "
                                    "(relative paths are resolved against data.root, default the "
                                    "CSV's folder). Set data.skip_corrupt=True to skip such rows.")
        super().__init__(examples, class_names, name=f"{name} {csv_path}", skip_corrupt=skip_corrupt)


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except (TypeError, ValueError):
        return False
