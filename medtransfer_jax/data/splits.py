"""Cross-validation splits: stratified, patient-grouped k-fold with a fixed seed.

No patient (``group``) ever appears on both sides of a split. For fold ``f`` the
``f``-th part of a k-fold partition is held out and split again (stratified and
grouped the same way) into val and test, as in the Revisiting study's Sep-2023
protocol (val ~ 5 %, test ~ 15 % of the data with the default 1/4 share); the other
k-1 parts are the training set.

The paper repositories' own fold files can be used instead (``data.folds='paper'``), so
results are comparable with theirs: Revisiting Sep-2023 ``data/<task>/{train,val,test}
_fold{1..5}.csv``; Feb-2023 train/val only (the val fold is also the test); Source Matters
train/val per fold plus one fixed ``test.csv``. Columns ``<index>,path,class[,pid]``;
:func:`read_fold_csvs` maps ``path`` onto the dataset's files by the longest matching path
suffix, and checks ``class`` against the dataset's label rule or takes it as the label.

Implemented in NumPy (scikit-learn is only a test dependency); the algorithm is the
greedy one of ``sklearn.model_selection.StratifiedGroupKFold(shuffle=True)``: groups in
a seeded random order, then sorted by how unevenly their labels are spread, each put in
the fold that keeps the per-class fold proportions most even.
"""
from __future__ import annotations

import csv
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from medtransfer_jax import paths
from medtransfer_jax.data.base import DataError

log = logging.getLogger(__name__)


def stratified_group_kfold(labels: Sequence[int], groups: Optional[Sequence] = None,
                           n_splits: int = 5, seed: int = 2) -> np.ndarray:
    """Assigns every example to one of ``n_splits`` folds.

    Args:
      labels: (N,) int class per example.
      groups: (N,) hashable patient id per example, or None (each example its own group).
      n_splits: number of folds (>= 2).
      seed: fixes the order in which tied groups are placed.
    Returns:
      (N,) int64 fold index in [0, n_splits); all examples of a group share a fold.
    Raises:
      DataError if there are fewer groups than folds.
    """
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    if groups is None:
        group_idx = np.arange(n)
    else:
        groups = np.asarray(groups, dtype=object).astype(str)
        if groups.shape != (n,):
            raise ValueError(f"groups has shape {groups.shape}, labels ({n},)")
        _, group_idx = np.unique(groups, return_inverse=True)
    n_groups = int(group_idx.max()) + 1 if n else 0
    if n_groups < n_splits:
        raise DataError(f"Cannot make {n_splits} folds from {n_groups} patients/groups; "
                        "reduce num_folds or add data.")
    classes, y = np.unique(labels, return_inverse=True)
    k = len(classes)
    counts = np.zeros((n_groups, k), np.int64)       # per-group class counts
    np.add.at(counts, (group_idx, y), 1)
    class_total = counts.sum(0).astype(np.float64)

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    # Groups whose labels are most concentrated first (stable, so ties keep the random order).
    spread = np.std(counts[order], axis=1)
    order = order[np.argsort(-spread, kind="stable")]

    fold_counts = np.zeros((n_splits, k), np.float64)
    group_fold = np.empty(n_groups, np.int64)
    eye = np.eye(n_splits)
    for g in order:
        c = counts[g].astype(np.float64)
        # Candidate fold_counts if g goes to fold f, for every f at once: (f, n_splits, k).
        cand = fold_counts[None] + eye[:, :, None] * c[None, None, :]
        cost = np.mean(np.std(cand / class_total, axis=1), axis=1)       # (f,)
        best = np.flatnonzero(np.isclose(cost, cost.min(), rtol=0, atol=1e-12))
        if len(best) > 1:  # tie: the fold with fewest examples, then lowest index
            sizes = fold_counts[best].sum(1)
            best = best[np.argsort(sizes, kind="stable")]
        f = int(best[0])
        fold_counts[f] += c
        group_fold[g] = f
    return group_fold[group_idx]


def check_fold(fold, num_folds: int, flag: str = "data.fold") -> None:
    """Raises DataError unless ``fold`` is a 0-based fold of a ``num_folds``-fold protocol
    (``flag`` names the setting in the message, e.g. ``--fold`` or ``--config.data.fold``)."""
    integer = isinstance(fold, (int, np.integer)) and not isinstance(fold, bool)
    if not integer or not 0 <= fold < num_folds:
        raise DataError(f"{flag}={fold}: the data has {num_folds} folds (data.num_folds); use "
                        f"0..{num_folds - 1} (folds are 0-based here; the paper's fold CSVs "
                        f"are numbered 1..{num_folds})")


def train_val_test_indices(labels: Sequence[int], groups: Optional[Sequence] = None, fold: int = 0,
                           num_folds: int = 5, seed: int = 2,
                           heldout_val_fraction: float = 0.25) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) index arrays for ``fold`` (0-based) of a k-fold protocol.

    The held-out fold is divided into ``round(1 / heldout_val_fraction)`` grouped,
    stratified parts; the first is val, the rest test. ``heldout_val_fraction=1`` gives
    the Feb-2023 protocol (val = test = the held-out fold). Indices are sorted.
    """
    check_fold(fold, num_folds)
    labels = np.asarray(labels, np.int64)
    folds = stratified_group_kfold(labels, groups, num_folds, seed)
    train = np.flatnonzero(folds != fold)
    held = np.flatnonzero(folds == fold)
    if heldout_val_fraction >= 1.0:
        return train, held, held.copy()
    if heldout_val_fraction <= 0:
        raise ValueError(f"heldout_val_fraction must be in (0, 1], got {heldout_val_fraction}")
    parts = max(2, int(round(1.0 / heldout_val_fraction)))
    sub_groups = None if groups is None else np.asarray(groups, dtype=object)[held]
    n_sub_groups = len(held) if sub_groups is None else len(set(map(str, sub_groups)))
    parts = min(parts, n_sub_groups)
    if parts < 2:
        raise DataError(f"fold {fold} holds out only {n_sub_groups} patient(s); cannot split it "
                        "into val and test (add data or set heldout_val_fraction=1).")
    sub = stratified_group_kfold(labels[held], sub_groups, parts, seed + 1000 * (fold + 1))
    return train, held[sub == 0], held[sub != 0]


# ---------------------------------------------------------------------------------------
# The paper repository's fold CSVs
# ---------------------------------------------------------------------------------------

def _path_parts(path: str) -> Tuple[str, ...]:
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return tuple(parts)


class PathMatcher:
    """Maps foreign paths (e.g. ``../../../data/breast/benign (1).png``) to dataset indices by the
    longest common path suffix (at least the file name)."""

    def __init__(self, relpaths: Sequence[str]):
        self.by_name: Dict[str, List[int]] = {}
        self.parts = [_path_parts(p) for p in relpaths]
        for i, parts in enumerate(self.parts):
            if parts:
                self.by_name.setdefault(parts[-1], []).append(i)

    def match(self, path: str) -> Optional[int]:
        """The one dataset index ``path`` names, else None (no file, or a tie)."""
        winners = self.examples_of(path)
        return winners[0] if len(winners) == 1 else None

    def examples_of(self, path: str) -> List[int]:
        """Every dataset index of the file ``path`` names: one, or several when the
        dataset holds that file more than once (CBIS-DDSM: one example per abnormality of
        an image); [] when no file, or more than one different file, fits."""
        parts = _path_parts(path)
        if not parts:
            return []
        cands = self.by_name.get(parts[-1], [])
        if len(cands) <= 1:
            return list(cands)

        def common(i):
            a, m = self.parts[i], 0
            while m < min(len(a), len(parts)) and a[-1 - m] == parts[-1 - m]:
                m += 1
            return m

        scores = [common(i) for i in cands]
        best = max(scores)
        winners = [c for c, s in zip(cands, scores) if s == best]
        one_file = all(self.parts[w] == self.parts[winners[0]] for w in winners)
        return winners if (len(winners) == 1 or one_file) else []


def read_fold_csv(path: str) -> List[Dict[str, str]]:
    """Rows of one paper fold CSV as dicts (needs a ``path`` column; ``class`` if present)."""
    if not paths.isfile(path):
        raise DataError(f"fold CSV not found: {path}")
    with paths.open_text(path) as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise DataError(f"{path}: expected a 'path' column (the paper's fold CSVs have "
                            f"',path,class[,pid]'), got columns {reader.fieldnames}")
        return list(reader)


def fold_csv_name(split: str, fold: int) -> str:
    """``train_fold3.csv`` for split 'train' of the 0-based ``fold`` 2 (the papers number
    their fold files 1..5)."""
    return f"{split}_fold{fold + 1}.csv"


def _test_csv(fold_csv_dir: str, fold: int, test_csv: Optional[str]) -> Optional[str]:
    """The test file of a fold: ``test_csv`` if given, else ``test_fold{k}.csv`` (Sep-2023),
    else one fixed ``test.csv`` (Source Matters), else None (Feb-2023: val is the test)."""
    if test_csv:
        if not paths.isfile(test_csv):
            raise DataError(f"data.fold_csv_test={test_csv!r} does not exist")
        return test_csv
    for name in (fold_csv_name("test", fold), "test.csv"):
        if paths.isfile(os.path.join(fold_csv_dir, name)):
            return os.path.join(fold_csv_dir, name)
    return None


def read_fold_csvs(fold_csv_dir: str, fold: int, relpaths: Sequence[str],
                   class_names: Optional[Sequence[str]] = None, labels: Optional[np.ndarray] = None,
                   strict: bool = True, test_csv: Optional[str] = None,
                   class_lookup: Optional[Dict[str, int]] = None) -> Dict[str, np.ndarray]:
    """Reads ``{train,val}_fold{fold+1}.csv`` and the fold's test CSV and returns index arrays.

    Args:
      fold_csv_dir: the paper repo's ``data/<task>`` folder.
      fold: 0-based fold (file number fold + 1).
      relpaths: (N,) the dataset's file paths (relative to its root) in source order.
      class_names / labels: when given, each row's ``class`` is checked against the
        dataset's label for the matched file (a mismatch means a different label rule).
      strict: unmatched rows raise (else they are dropped and counted in the log).
      test_csv: one fixed test file for every fold (else see :func:`_test_csv`).
      class_lookup: lower-case CSV class -> label. When given, the CSV decides each
        row's label (returned as 'labels') instead of being checked against ``labels``.
    Returns:
      {'train': idx, 'val': idx, 'test': idx[, 'labels': (len(relpaths),) int64, -1 where
      no row named the file]}; 'test' is a copy of 'val' when the Feb-2023 layout has no
      test file.
    """
    matcher = PathMatcher(relpaths)
    out: Dict[str, np.ndarray] = {}
    csv_labels = np.full(len(relpaths), -1, np.int64)
    for split in ("train", "val", "test"):
        path = os.path.join(fold_csv_dir, fold_csv_name(split, fold))
        if split == "test":
            path = _test_csv(fold_csv_dir, fold, test_csv)
            if path is None:
                log.info("no test CSV in %s: the val fold is the test (Feb-2023 protocol)",
                         fold_csv_dir)
                out["test"] = out["val"].copy()
                continue
        rows = read_fold_csv(path)
        idx, missing, mismatched, taken = [], [], [], set()
        for row in rows:
            cands = matcher.examples_of(row["path"])
            if not cands:
                missing.append(row["path"])
                continue
            i = _pick_example(cands, row, taken, labels, class_names, class_lookup)
            taken.add(i)
            if class_lookup is not None:
                want = str(row.get("class", "")).strip().lower()
                if want not in class_lookup:
                    raise DataError(f"{path}: class {row.get('class')!r} of {row['path']!r} is not "
                                    f"one of {sorted(class_lookup)}")
                csv_labels[i] = class_lookup[want]
            elif labels is not None and class_names is not None and row.get("class"):
                want = str(row["class"]).strip().lower()
                have = str(class_names[labels[i]]).lower()
                if want != have:
                    mismatched.append((row["path"], row["class"], class_names[labels[i]]))
            idx.append(i)
        if missing:
            msg = (f"{path}: {len(missing)} of {len(rows)} rows name files not found in the dataset "
                   f"(first: {missing[0]!r}); check data.root points at the same download")
            if strict:
                raise DataError(msg)
            log.warning(msg + " -- skipped")
        if mismatched:
            p, want, have = mismatched[0]
            raise DataError(f"{path}: {len(mismatched)} rows disagree with the dataset's label rule "
                            f"(first: {p!r} is {want!r} in the CSV, {have!r} here)")
        out[split] = np.asarray(sorted(set(idx)), np.int64)
    if class_lookup is not None:
        out["labels"] = csv_labels
    return out


def _pick_example(cands: List[int], row: Dict[str, str], taken: set, labels, class_names,
                  class_lookup) -> int:
    """The example a CSV row means among the dataset's copies of its file (one per
    abnormality: the paper's CSVs list such an image once per abnormality, each with its
    own class): a copy not yet taken by this split, with the row's class where the labels
    say (so an image with a benign and a malignant finding gives one of each)."""
    if len(cands) == 1:
        return cands[0]
    want = str(row.get("class", "")).strip().lower()

    def agrees(i):
        if not want:
            return True
        if class_lookup is not None:
            return True                        # the CSV decides the label
        if labels is not None and class_names is not None:
            return str(class_names[labels[i]]).lower() == want
        return True

    for pool in ([i for i in cands if i not in taken and agrees(i)],
                 [i for i in cands if agrees(i)], [i for i in cands if i not in taken], cands):
        if pool:
            return pool[0]
    return cands[0]


def check_no_leakage(groups: Sequence, *index_sets: np.ndarray) -> None:
    """Raises DataError if any group appears in two of the index sets (identical sets are allowed)."""
    groups = np.asarray(groups, dtype=object)
    seen: Dict[str, int] = {}
    distinct = []
    for s in index_sets:
        if not any(len(s) == len(d) and np.array_equal(s, d) for d in distinct):
            distinct.append(s)
    for k, s in enumerate(distinct):
        for g in set(map(str, groups[s])):
            if g in seen and seen[g] != k:
                raise DataError(f"patient/group {g!r} appears in two splits (parts {seen[g]} and {k})")
            seen[g] = k
