"""The study's tables on disk: atomic CSV/JSON writes, typed reads, group summaries.

Every stage writes its results through here, so a crash never leaves a half-written
table (:func:`medtransfer_jax.paths.write_text_atomic`: a unique temporary file, then a
rename; a single upload on ``gs://``) and every reader parses numbers the
same way. :func:`summarise` is the one "mean ± sd over folds" of the study: the sample sd
(ddof=1, :func:`analysis.stats.mean_sd`) and ``n`` = the number of values averaged.
"""
from __future__ import annotations

import csv
import io
import json
from typing import Any, Dict, List, Sequence, Union

import numpy as np

from medtransfer_jax import paths
from medtransfer_jax.analysis import stats


def _write(path: paths.PathLike, text: str) -> str:
    """Writes a whole table atomically (parents created); returns ``path`` as a string."""
    target = paths.workdir(path)
    paths.makedirs(target.parent)
    paths.write_text_atomic(target, text)
    return paths.to_str(path)


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


def read_csv(path: paths.PathLike) -> List[Dict[str, Any]]:
    """CSV rows with every value that parses as a number turned into float."""
    rows = list(csv.DictReader(io.StringIO(paths.read_text(path), newline="")))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = float(v)
            except (TypeError, ValueError):
                pass
    return rows


def read_csv_if(path: paths.PathLike) -> List[Dict[str, Any]]:
    """:func:`read_csv`, or [] when the table does not exist (yet)."""
    return read_csv(path) if paths.exists(path) else []


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


def read_json(path: paths.PathLike) -> Any:
    return json.loads(paths.read_text(path))


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
