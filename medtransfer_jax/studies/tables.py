"""The study's tables on disk: atomic CSV/JSON writes, typed reads, group summaries.

Every stage writes its results through here, so a crash never leaves a half-written
table (:func:`medtransfer_jax.paths.write_text_atomic`: a unique temporary file, then a
rename; a single upload on ``gs://``) and every reader parses numbers the
same way. :func:`summarise` is the one "mean ± sd over folds" of the study: the sample sd
(ddof=1, :func:`analysis.stats.mean_sd`) and ``n`` = the number of values averaged.

Reads are checked: a table that is not text, is empty (0 bytes: a legitimately empty
table still has its newline), has a row with more or fewer fields than its header, or
lacks a column a reader asks for (rows raise on a missing column instead of KeyError) is
a :class:`TableError` naming the file and the stages whose ``--force`` rewrite it. Each
write also records the table's SHA-256 beside it (``.digests/<name>`` in its folder), so
what no format check can see is caught too: a table cut at a line boundary, rows
duplicated, a column renamed, a table deleted. Files are only damaged from outside (every
write is atomic), and a silently short table would change a study's means.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from medtransfer_jax import paths
from medtransfer_jax.analysis import stats
from medtransfer_jax.errors import UserError


class TableError(UserError):
    """A file an earlier stage wrote that cannot be read; names it and how to rewrite it."""


#: The study stage that writes a table (by file-name prefix) or a folder of them, for the
#: fix a :class:`TableError` gives.
WRITTEN_BY = (("runs", "finetune"), ("auc_summary", "finetune"),
              ("source_comparisons", "finetune"), ("representations", "representations"),
              ("layer_maps", "representations"), ("prediction_similarity", "predictions"),
              ("auc_gain_vs_similarity", "predictions"), ("filter", "filters"),
              ("weight_change", "filters"), ("robustness", "robustness"))


#: Stages that read another stage's tables (beside the report): a rewritten table is
#: read again by redoing them too.
READ_BY = {"representations": ("predictions",)}


def writer_stage(path: paths.PathLike) -> Optional[str]:
    """The study stage that writes ``path``, followed by the stages that read it
    ('representations,predictions'), or None. Only a study's own layout counts:
    ``tables/<name>``, the per-fold caches ``representations/<t>_fold<k>.csv`` and the maps
    ``layer_maps/<t>_fold<k>/<pair>.csv`` (never the name of a folder above them)."""
    parts = paths.to_str(path).replace("\\", "/").split("/")
    parent = parts[-2] if len(parts) > 1 else ""
    grand = parts[-3] if len(parts) > 2 else ""
    stage = None
    if parent == "tables":
        stage = next((s for prefix, s in WRITTEN_BY if parts[-1].startswith(prefix)), None)
    elif parent == "representations" or grand == "layer_maps":
        stage = "representations"
    return ",".join((stage,) + READ_BY.get(stage, ())) if stage else None


def damaged(path: paths.PathLike, what: str, stage: Optional[str] = None,
            fix: Optional[str] = None) -> TableError:
    """The one-line error for a damaged file: what is wrong and how to rewrite it
    (``stage``: the stages that rewrite it, default the one that writes such a table;
    ``fix``: the words for a file no study stage writes)."""
    if fix is None:
        stage = stage or writer_stage(path)
        fix = (f"rerun the study's own command with --stages={stage},report --force to "
               "rewrite it" if stage else "restore it or write it again")
    err = TableError(f"{paths.to_str(path)}: {what} (damaged?); {fix}")
    err.what = what
    return err


def read_cache(path: paths.PathLike) -> Optional[List[Dict[str, Any]]]:
    """A stage's per-item cache (rows of one fold or one pair), or None when it is not
    there or is damaged: the item is then computed again, which is always safe."""
    if not paths.exists(path):
        return None
    try:
        return read_csv(path)
    except TableError as e:
        print(f"[study] {paths.to_str(path)}: {e.what}; computing it again", flush=True)
        return None


class Row(dict):
    """A table row whose missing column is a :class:`TableError` naming the file (``get``
    still gives None for an optional one)."""

    def __init__(self, values, path: str):
        super().__init__(values)
        self.path = path

    def __missing__(self, column):
        raise damaged(self.path, f"no column {column!r}")

    def __reduce__(self):   # a plain dict in pickles (subprocess stages, copies)
        return dict, (dict(self),)


DIGESTS = ".digests"


def _digest_file(path: paths.PathLike):
    target = paths.workdir(path)
    return target.parent / DIGESTS / target.name


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: paths.PathLike, text: str) -> str:
    """Writes a whole table atomically (parents created) and its digest; returns ``path``
    as a string. The old digest goes first, so a write stopped halfway leaves a table with
    no digest (read unchecked, as one written before digests), never a good table beside
    a stale digest (which would read as damaged)."""
    target = paths.workdir(path)
    digest = _digest_file(target)
    if paths.exists(digest):
        digest.unlink()
    paths.makedirs(target.parent)
    paths.write_text_atomic(target, text)
    paths.makedirs(digest.parent)
    paths.write_text_atomic(digest, _sha256(text.encode()) + "\n")
    return paths.to_str(path)


def _recorded_digest(path: paths.PathLike) -> Optional[str]:
    """The digest written with ``path``, or None (a table written before digests, or by
    hand)."""
    try:
        return paths.read_text(_digest_file(path)).strip() or None
    except (OSError, ValueError):
        return None


def remove(path: paths.PathLike) -> None:
    """Deletes a table and its digest (a stage dropping a table it no longer makes)."""
    for f in (paths.workdir(path), _digest_file(path)):
        if paths.exists(f):
            f.unlink()


def write_csv(path: paths.PathLike, rows: Sequence[Dict[str, Any]]) -> str:
    """Writes ``rows`` (columns = union of scalar keys, first-seen order); list/dict values
    are left out (they live in the JSON twin if needed). Returns ``path``."""
    cols: List[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols and not isinstance(r[c], (list, dict))]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return _write(path, buf.getvalue())


def read_csv(path: paths.PathLike, required: Sequence[str] = (),
             fix: Optional[str] = None) -> List[Dict[str, Any]]:
    """CSV rows (:class:`Row`) with every value that parses as a number turned into float;
    a damaged file, or one whose header lacks a ``required`` column, is a
    :class:`TableError` (module docstring; ``fix`` as :func:`damaged`)."""
    text = _text(path, fix)
    if not text:
        raise damaged(path, "empty (0 bytes)", fix=fix)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        missing = [c for c in required if c not in (reader.fieldnames or ())]
        if missing:
            raise damaged(path, f"no column(s) {missing} (it has {reader.fieldnames or []})",
                          fix=fix)
        for r in reader:
            extra = r.pop(None, None) or []          # fields beyond the header's
            missing = [k for k, v in r.items() if v is None]
            if extra or missing:
                raise damaged(path, f"line {reader.line_num} has "
                                    f"{len(r) - len(missing) + len(extra)} fields, the "
                                    f"header {len(r)}", fix=fix)
            rows.append(Row({k: _number(v) for k, v in r.items()}, paths.to_str(path)))
    except csv.Error as e:
        raise damaged(path, f"not a CSV table ({e})", fix=fix) from None
    return rows


def _number(v: str) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _text(path: paths.PathLike, fix: Optional[str] = None) -> str:
    data = paths.read_bytes(path)
    try:
        text = data.decode()
    except ValueError:   # UnicodeDecodeError
        raise damaged(path, "not UTF-8 text", fix=fix) from None
    recorded = _recorded_digest(path)
    if recorded and data and recorded != _sha256(data):
        raise damaged(path, "changed since it was written (cut, rows or columns changed: "
                            f"its SHA-256 is not the one in {DIGESTS}/; changed on purpose? "
                            f"delete {paths.to_str(_digest_file(path))} to accept it)",
                      fix=fix)
    return text


def read_csv_if(path: paths.PathLike) -> List[Dict[str, Any]]:
    """:func:`read_csv`, or [] when the table does not exist (yet); one deleted after it
    was written (its digest is there) is a :class:`TableError`."""
    if paths.exists(path):
        return read_csv(path)
    if _recorded_digest(path):
        raise damaged(path, "missing, though it was written (deleted?)")
    return []


def write_json(path: paths.PathLike, obj: Any) -> str:
    """Writes ``obj`` as indented JSON atomically; NumPy arrays become lists, NumPy
    scalars numbers, anything else unknown its ``str``. Returns ``path``."""
    return _write(path, json.dumps(obj, indent=2, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    return str(o)


def read_json(path: paths.PathLike, fix: Optional[str] = None) -> Any:
    """The file's JSON; a damaged file is a :class:`TableError` (module docstring; ``fix``
    as :func:`damaged`)."""
    try:
        return json.loads(_text(path, fix))
    except json.JSONDecodeError as e:
        raise damaged(path, f"not JSON ({e})", fix=fix) from None


def summarise(rows: Sequence[Dict[str, Any]], keys: Sequence[str],
              values: Union[str, Sequence[str]]) -> List[Dict[str, Any]]:
    """Groups ``rows`` by ``keys``; per group and value column: ``v`` (mean), ``v_sd``
    (sample sd, NaN for one value) and ``v_n`` (finite values averaged); ``n_rows`` =
    group size (e.g. folds)."""
    values = [values] if isinstance(values, str) else list(values)
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for key, members in groups.items():
        row = dict(zip(keys, key), n_rows=len(members))
        for v in values:
            row[v], row[f"{v}_sd"], row[f"{v}_n"] = stats.mean_sd([m.get(v) for m in members])
        out.append(row)
    return out
