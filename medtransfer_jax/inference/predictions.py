"""Per-image predictions file: the hand-over from training/evaluation to analysis.

Format (contract): ``predictions.csv`` with header
``id,group,split,label,prob_0,...,prob_{K-1}``, one row per example, probabilities
are the softmax output. Plain CSV so it can be read by anything (pandas, R, Excel).
"""
from __future__ import annotations

import csv
import io
import json
from typing import Dict, Sequence

import numpy as np

from medtransfer_jax import paths
from medtransfer_jax.data.base import DataError

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
    """Reads a predictions CSV (local or ``gs://``): the one reader of the contract.

    Returns:
      ``{'id': (N,) str, 'group': (N,) str, 'split': (N,) str, 'label': (N,) int64,
      'probs': (N, K) float64}`` (N may be 0: a header-only file of an empty split).
    Raises:
      DataError naming the file and the problem: missing, empty, bad header, a line
      with the wrong number of columns or a value that is not a number.
    """
    shown = paths.to_str(path)
    if not paths.exists(path):
        raise DataError(f"predictions file {shown} does not exist; write it with `python -m "
                        "medtransfer_jax.evaluate` or a training run")
    try:
        with paths.open(path) as f:
            r = csv.reader(f)
            header = next(r, None)
            rows = list(r)
    except (ValueError, csv.Error) as e:   # UnicodeDecodeError (random bytes), NUL, ...
        raise DataError(f"predictions file {shown} is damaged (not CSV text: "
                        f"{type(e).__name__}: {e}); {rewrite_hint(path)}") from None
    if not header:
        raise DataError(f"predictions file {shown} is empty; expected the header "
                        f"{','.join(_FIXED)},prob_0,...; {rewrite_hint(path)}")
    k = len(header) - 4
    if tuple(header[:4]) != _FIXED or k < 1 or header[4:] != [f"prob_{j}" for j in range(k)]:
        raise DataError(f"predictions file {shown}: header {','.join(header)} is not "
                        f"'{','.join(_FIXED)},prob_0,...,prob_{{K-1}}'; {rewrite_hint(path)}")
    bad = [i + 2 for i, row in enumerate(rows) if len(row) != k + 4]
    if bad:
        raise DataError(f"predictions file {shown}: line(s) {bad[:5]} do not have the "
                        f"header's {k + 4} columns; {rewrite_hint(path)}")
    try:
        labels = np.array([int(row[3]) for row in rows], np.int64)
        probs = np.array([[float(x) for x in row[4:]] for row in rows], np.float64)
    except ValueError as e:
        raise DataError(f"predictions file {shown}: {e}; labels must be integers and "
                        f"prob_* columns numbers; {rewrite_hint(path)}") from None
    probs = probs.reshape(len(rows), k)
    # a model's softmax/sigmoid output: finite, in [0, 1] (the writer's float32 text may
    # stray by rounding); anything else was never written here and would bend every AUC
    odd = np.flatnonzero(~np.all(np.isfinite(probs) & (probs >= -1e-6) & (probs <= 1 + 1e-6),
                                 axis=1))
    if odd.size:
        raise DataError(f"predictions file {shown}: line(s) {(odd + 2).tolist()[:5]} hold "
                        f"probabilities outside [0, 1] or not finite; {rewrite_hint(path)}")
    bad_labels = np.flatnonzero((labels < 0) | (labels >= k))
    if bad_labels.size:
        raise DataError(f"predictions file {shown}: line(s) {(bad_labels + 2).tolist()[:5]} "
                        f"hold a label outside 0..{k - 1}; {rewrite_hint(path)}")
    return {
        "id": np.array([row[0] for row in rows], dtype=object).astype(str),
        "group": np.array([row[1] for row in rows], dtype=object).astype(str),
        "split": np.array([row[2] for row in rows], dtype=object).astype(str),
        "label": labels,
        "probs": probs,
    }


def _splits_of(target, run) -> str:
    """The --splits that rewrite ``target`` of ``run`` (see :func:`rewrite_hint`)."""
    if target.parent.name == "predictions":
        return target.stem
    try:
        res = json.loads(paths.read_text(paths.join(run, "results.json")))
        return ",".join(["val", "test"] + sorted(res.get("extra_tests") or {}))
    except (OSError, ValueError, AttributeError):
        return "all"


def rewrite_hint(path: paths.PathLike) -> str:
    """How to write a damaged predictions file again. A training run's own
    ``RUN/predictions.csv`` is never rewritten by the run (it is done), so the fix is
    ``evaluate`` on the run's exported best weights, for the splits the file held: a
    run's ``predictions.csv`` its val, test and extra test sets (from its results.json;
    else ``all``, which adds the train split), a ``predictions/<split>.csv`` that split."""
    shown = paths.to_str(path)
    target = paths.workdir(path)
    run = target.parent.parent if target.parent.name == "predictions" else target.parent
    if paths.exists(paths.join(run, "export", "best", "metadata.json")):
        return (f"rewrite it with `python -m medtransfer_jax.evaluate "
                f"--checkpoint={paths.to_str(run)} --splits={_splits_of(target, run)} "
                f"--output={shown}`")
    return ("rewrite it with `python -m medtransfer_jax.evaluate --checkpoint=WEIGHTS "
            f"--output={shown}` (WEIGHTS: the weights or run that made it)")
