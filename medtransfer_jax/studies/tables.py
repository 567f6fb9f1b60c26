"""The study's tables on disk: atomic CSV/JSON writes, typed reads, group summaries.

Every stage writes its results through here, so a crash never leaves a half-written
table (write to ``path.tmp``, then ``os.replace``) and every reader parses numbers the
same way. :func:`summarise` is the one "mean ± sd over folds" of the study: the sample sd
(ddof=1, :func:`analysis.stats.mean_sd`) and ``n`` = the number of values averaged.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Sequence, Union

from medtransfer_jax.analysis import stats


def _atomic_open(path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path + ".tmp", "w", newline="")


def write_csv(path: str, rows: Sequence[Dict[str, Any]]) -> str:
    """Writes ``rows`` (columns = union of scalar keys, first-seen order); list/dict values
    are left out (they live in the JSON twin if needed). Returns ``path``."""
    cols: List[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols and not isinstance(r[c], (list, dict))]
    with _atomic_open(path) as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(path + ".tmp", path)
    return path


def read_csv(path: str) -> List[Dict[str, Any]]:
    """CSV rows with every value that parses as a number turned into float."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = float(v)
            except (TypeError, ValueError):
                pass
    return rows


def read_csv_if(path: str) -> List[Dict[str, Any]]:
    """:func:`read_csv`, or [] when the table does not exist (yet)."""
    return read_csv(path) if os.path.exists(path) else []


def write_json(path: str, obj: Any) -> str:
    with _atomic_open(path) as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(path + ".tmp", path)
    return path


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


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
