"""Per-image predictions file: the hand-over from training/evaluation to analysis.

Format (contract): ``predictions.csv`` with header
``id,group,split,label,prob_0,...,prob_{K-1}``, one row per example, probabilities
are the softmax output. Plain CSV so it can be read by anything (pandas, R, Excel).
"""
from __future__ import annotations

import csv
import io
from typing import Dict, Sequence

import numpy as np

from medtransfer_jax import paths

_FIXED = ("id", "group", "split", "label")


def write_predictions(path: paths.PathLike, ids: Sequence[str], groups: Sequence[str], split,
                      labels: np.ndarray, probs: np.ndarray) -> str:
    """Writes one CSV of predictions.

    Args:
      path: output file, local or ``gs://`` (parent directories are created).
      ids, groups: (N,) strings.
      split: a single split name for all rows, or a (N,) sequence of names.
      labels: (N,) int.
      probs: (N, K) float probabilities.

    Returns:
      ``path``.
    """
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    n = len(ids)
    if probs.ndim != 2 or probs.shape[0] != n or labels.shape != (n,) or len(groups) != n:
        raise ValueError(f"write_predictions({path}): need N={n} ids/groups/labels and "
                         f"probs (N, K); got groups {len(groups)}, labels {labels.shape}, "
                         f"probs {probs.shape}")
    splits = [split] * n if isinstance(split, str) else list(split)
    if len(splits) != n:
        raise ValueError(f"write_predictions({path}): {len(splits)} split names for {n} rows")
    target = paths.workdir(path)
    paths.makedirs(target.parent)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(list(_FIXED) + [f"prob_{k}" for k in range(probs.shape[1])])
    for i in range(n):
        w.writerow([ids[i], groups[i], splits[i], int(labels[i])] +
                   [repr(float(p)) for p in probs[i]])
    paths.write_text_atomic(target, buf.getvalue())  # a reader never sees half a file
    return path


def read_predictions(path: paths.PathLike) -> Dict[str, np.ndarray]:
    """Reads a predictions CSV.

    Returns:
      ``{'id': (N,) str, 'group': (N,) str, 'split': (N,) str, 'label': (N,) int64,
      'probs': (N, K) float64}``.
    """
    if not paths.exists(path):
        raise FileNotFoundError(f"Predictions file {paths.to_str(path)!r} does not exist; "
                                "write it with `python -m medtransfer_jax.evaluate` or a "
                                "training run.")
    with paths.open(path) as f:
        r = csv.reader(f)
        header = next(r, None)
        if header is None or tuple(header[:4]) != _FIXED or not all(
                h == f"prob_{k}" for k, h in enumerate(header[4:])) or len(header) < 5:
            raise ValueError(f"{path}: header {header} is not "
                             f"'id,group,split,label,prob_0,...' (medtransfer_jax predictions)")
        rows = list(r)
    k = len(header) - 4
    bad = [i + 2 for i, row in enumerate(rows) if len(row) != k + 4]
    if bad:
        raise ValueError(f"{path}: line(s) {bad[:5]} do not have {k + 4} columns")
    return {
        "id": np.array([row[0] for row in rows], dtype=object).astype(str),
        "group": np.array([row[1] for row in rows], dtype=object).astype(str),
        "split": np.array([row[2] for row in rows], dtype=object).astype(str),
        "label": np.array([int(row[3]) for row in rows], np.int64),
        "probs": np.array([[float(x) for x in row[4:]] for row in rows],
                          np.float64).reshape(len(rows), k),
    }
