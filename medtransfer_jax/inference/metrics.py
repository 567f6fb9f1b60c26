"""Exact classification metrics in NumPy: loss, accuracy and the studies' AUC variants.

Why exact and on the host: the studies report ROC-AUC on a few hundred to a few
thousand validation images; computing it exactly (rank statistic with ties) costs
nothing and removes the threshold-binning error of streaming AUCs. The two AUC
definitions the Revisiting repo used are both offered, named:

* ``auc`` / ``auc_ovr_weighted`` -- scikit-learn ``roc_auc_score`` (Feb-2023 protocol:
  binary = positive class; multi-class = one-vs-rest, macro or prevalence-weighted).
* ``auc_micro`` -- ROC-AUC over the flattened one-hot columns (Sep-2023 protocol used
  Keras ``AUC()`` on one-hot labels = micro averaging). ``auc_keras`` reproduces
  Keras' 200-threshold trapezoidal approximation of the same quantity.

Which one a protocol *reports* is the config field ``eval.reported_auc`` (one of
:data:`REPORTED_AUCS`); :func:`classification_metrics` then also returns it as
``reported_auc``, beside the others, so a results table can print the paper's number
without knowing which protocol made the run.

Undefined AUCs (a class with no positives or no negatives) are NaN rather than an
exception, so a tiny validation fold does not crash a long run; callers see NaN.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from scipy import stats

from medtransfer_jax.configs import base as schema

#: eval.reported_auc choices -> what each paper computed (the table lives in configs.base;
#: schema.METRICS lists the keys classification_metrics returns).
REPORTED_AUCS = schema.REPORTED_AUCS


def _check_labels_probs(labels, probs):
    labels = np.asarray(labels)
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, K); got shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must be (N,) = ({probs.shape[0]},); got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}); got range "
                         f"[{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64), probs


def binary_auc(y_true: np.ndarray, scores: np.ndarray,
               sample_weight: Optional[np.ndarray] = None) -> float:
    """Exact ROC-AUC = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney U).

    Args:
      y_true: (N,) booleans / {0, 1}.
      scores: (N,) real scores (higher = more positive).
      sample_weight: optional (N,) non-negative weights (weighted U statistic, equal to
        scikit-learn's weighted ROC-AUC).

    Returns:
      float in [0, 1], NaN if there are no positives or no negatives.
    """
    y = np.asarray(y_true).astype(bool).reshape(-1)
    s = np.asarray(scores, np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and scores {s.shape} differ in shape")
    if sample_weight is None:
        n_pos = int(y.sum())
        n_neg = y.size - n_pos
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        ranks = stats.rankdata(s)  # average ranks for ties
        u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
        return float(u / (n_pos * n_neg))
    w = np.asarray(sample_weight, np.float64).reshape(-1)
    if w.shape != s.shape:
        raise ValueError(f"sample_weight {w.shape} and scores {s.shape} differ in shape")
    w_pos, w_neg = w * y, w * ~y
    if w_pos.sum() <= 0 or w_neg.sum() <= 0:
        return float("nan")
    # Group equal scores; for each positive weight count the negative weight strictly
    # below plus half the tied negative weight.
    uniq, inv = np.unique(s, return_inverse=True)
    pos_at = np.bincount(inv, weights=w_pos, minlength=uniq.size)
    neg_at = np.bincount(inv, weights=w_neg, minlength=uniq.size)
    neg_below = np.cumsum(neg_at) - neg_at
    u = np.sum(pos_at * (neg_below + 0.5 * neg_at))
    return float(u / (w_pos.sum() * w_neg.sum()))


def auc_ovr(labels: np.ndarray, probs: np.ndarray, average: str = "macro") -> float:
    """One-vs-rest ROC-AUC over K classes as scikit-learn defines it.

    Args:
      labels: (N,) int class ids in [0, K).
      probs: (N, K) class probabilities.
      average: ``macro`` (plain mean over classes) or ``weighted`` (by class prevalence).

    For K == 2 this is the AUC of column 1 (scikit-learn's binary case) for both
    averages. NaN if any class is absent (scikit-learn raises there).
    """
    labels, probs = _check_labels_probs(labels, probs)
    k = probs.shape[1]
    if average not in ("macro", "weighted"):
        raise ValueError(f"average must be 'macro' or 'weighted'; got {average!r}")
    if k == 2:
        return binary_auc(labels == 1, probs[:, 1])
    per_class = np.array([binary_auc(labels == c, probs[:, c]) for c in range(k)])
    if np.isnan(per_class).any():
        return float("nan")
    if average == "macro":
        return float(per_class.mean())
    support = np.bincount(labels, minlength=k).astype(np.float64)
    return float(np.sum(per_class * support) / support.sum())


def auc_micro(labels: np.ndarray, probs: np.ndarray) -> float:
    """Exact ROC-AUC over the flattened one-hot matrix (N*K pairs of label, score).

    This is what Keras ``AUC()`` (multi_label=False) measured on one-hot targets in the
    Sep-2023 protocol, without its 200-threshold binning.
    """
    labels, probs = _check_labels_probs(labels, probs)
    onehot = np.eye(probs.shape[1], dtype=bool)[labels]
    return binary_auc(onehot.reshape(-1), probs.reshape(-1))


def auc_keras(labels: np.ndarray, probs: np.ndarray, num_thresholds: int = 200) -> float:
    """Keras ``AUC(num_thresholds=200)`` (ROC, trapezoidal) over one-hot columns.

    Thresholds are {-eps, 1/(T-1), ..., (T-2)/(T-1), 1+eps}; an entry counts as
    positive when its probability is strictly above the threshold.
    """
    labels, probs = _check_labels_probs(labels, probs)
    onehot = np.eye(probs.shape[1], dtype=bool)[labels].reshape(-1)
    p = probs.reshape(-1).astype(np.float32)  # Keras compares in float32
    eps = 1e-7
    thr = np.concatenate([[-eps], (np.arange(1, num_thresholds - 1)) / (num_thresholds - 1.0),
                          [1.0 + eps]]).astype(np.float32)
    pos, neg = np.sort(p[onehot]), np.sort(p[~onehot])
    tp = (pos.size - np.searchsorted(pos, thr, side="right")).astype(np.float64)
    fp = (neg.size - np.searchsorted(neg, thr, side="right")).astype(np.float64)
    n_pos, n_neg = onehot.sum(), (~onehot).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tpr, fpr = tp / n_pos, fp / n_neg
    return float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2.0))


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Top-1 accuracy; labels (N,), probs (N, K)."""
    labels, probs = _check_labels_probs(labels, probs)
    return float(np.mean(np.argmax(probs, axis=1) == labels)) if labels.size else float("nan")


def cross_entropy(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class (no label smoothing)."""
    labels, probs = _check_labels_probs(labels, probs)
    if not labels.size:
        return float("nan")
    return float(-np.mean(np.log(np.clip(probs[np.arange(labels.size), labels], eps, 1.0))))


def check_reported_auc(name: str) -> str:
    """Returns ``name`` if it is a metric :func:`classification_metrics` can report, else
    raises ValueError naming the config field and the choices."""
    if name not in REPORTED_AUCS:
        raise ValueError(f"eval.reported_auc={name!r} is not one of {sorted(REPORTED_AUCS)}")
    return name


def classification_metrics(labels: np.ndarray, probs: np.ndarray,
                           loss: Optional[float] = None,
                           reported_auc: Optional[str] = None) -> Dict[str, float]:
    """All named metrics of a split (the ``results.json`` contract).

    Args:
      labels: (N,) int; probs: (N, K) softmax probabilities.
      loss: the model's mean loss if already known (else cross-entropy of ``probs``).
      reported_auc: the protocol's paper metric (``eval.reported_auc``), one of
        :data:`REPORTED_AUCS`; when given it is repeated as ``reported_auc``.

    Returns:
      ``{'loss', 'accuracy', 'auc', 'auc_ovr_macro', 'auc_ovr_weighted', 'auc_micro',
      'auc_keras', 'num_examples'[, 'reported_auc']}``. ``auc`` is the binary AUC for
      K == 2, else the one-vs-rest macro AUC.
    """
    labels, probs = _check_labels_probs(labels, probs)
    macro = auc_ovr(labels, probs, "macro")
    out = {
        "loss": float(loss) if loss is not None else cross_entropy(labels, probs),
        "accuracy": accuracy(labels, probs),
        "auc": macro,
        "auc_ovr_macro": macro,
        "auc_ovr_weighted": auc_ovr(labels, probs, "weighted"),
        "auc_micro": auc_micro(labels, probs),
        "auc_keras": auc_keras(labels, probs),
        "num_examples": int(labels.size),
    }
    if reported_auc:
        out["reported_auc"] = out[check_reported_auc(reported_auc)]
    return out
