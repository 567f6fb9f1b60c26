"""Prediction similarity between two classifiers, and AUC gain vs representation similarity.

The Revisiting study's measure: the fraction of samples on which two models are *both
right or both wrong* (``observed``), against what two models with independent errors and
the same accuracies would give, ``expected = acc_A*acc_B + (1-acc_A)(1-acc_B)``. (The
study's script computed ``acc_A*acc_A + ...``; here both accuracies are used.)

Two modes (``mode=``; the Revisiting configs name theirs in ``analysis.similarity_mode``):

* ``corrected`` (default): the baseline above, the split the caller names (default: the
  test split when a file holds several, else all its rows), one-vs-rest macro AUC;
* ``paper``: what produced the published ``results/similarity.csv`` and simVSauc
  figures (Feb-2023 ``prediction_similarity.py`` / ``base_AUC.py``): the validation fold,
  ``acc_A**2 + (1 - acc_A)**2`` as the baseline, and sklearn's AUC (binary; one-vs-rest
  prevalence-weighted for K > 2) for the relative AUC gain.

Also:
agreement of predicted labels, Cohen's kappa of the predicted labels, and the correlation
of predicted probabilities.

Also the "relative AUC gain over random init" of the simVSauc figures,
``(AUC_pretrained - AUC_random) / AUC_random`` per fold, and its correlation with the
per-layer CCA of pre-trained vs fine-tuned networks.

Predictions files follow the project contract: ``predictions.csv`` with header
``id,group,split,label,prob_0,...,prob_{K-1}``.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
from scipy import stats

from medtransfer_jax.inference import metrics
from medtransfer_jax.inference.predictions import read_predictions

#: Prediction-similarity modes -> (default split, AUC average for K > 2).
MODES = {"corrected": (None, "macro"), "paper": ("val", "weighted")}
#: Each mode's independent-errors baseline, as a figure or caption writes it.
BASELINES = {"corrected": "acc_A·acc_B + (1−acc_A)(1−acc_B)",
             "paper": "acc_A² + (1−acc_A)² (the paper's, A's accuracy twice)"}


# The one reader of the predictions contract (DataError naming the file); the old name.
load_predictions = read_predictions


def align_predictions(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *,
                      split: Optional[str] = None, name_a: str = "A", name_b: str = "B"):
    """Matches two prediction sets by ``id`` (optionally one ``split``).

    Returns (labels (N,), probs_a (N, K), probs_b (N, K)). The id sets must be equal and
    the labels must agree; otherwise a ValueError says how many ids differ.
    """
    def select(p):
        if split is None:
            return p
        keep = p["split"] == split
        return {k: v[keep] for k, v in p.items()}

    a, b = select(a), select(b)
    ia = {v: i for i, v in enumerate(a["id"])}
    ib = {v: i for i, v in enumerate(b["id"])}
    if len(ia) != len(a["id"]) or len(ib) != len(b["id"]):
        raise ValueError("Duplicate ids in a predictions file; ids must be unique per split "
                         "(pass split= to compare one split).")
    only_a, only_b = set(ia) - set(ib), set(ib) - set(ia)
    if only_a or only_b:
        raise ValueError(f"Predictions cover different examples: {len(only_a)} ids only in "
                         f"{name_a}, {len(only_b)} only in {name_b} (e.g. "
                         f"{[str(x) for x in sorted(only_a | only_b)[:3]]}). Evaluate both on "
                         "the same split.")
    if not ia:
        raise ValueError(f"No predictions{' for split ' + split if split else ''}.")
    ids = list(a["id"])
    pa = a["probs"][[ia[i] for i in ids]]
    pb = b["probs"][[ib[i] for i in ids]]
    la, lb = a["label"][[ia[i] for i in ids]], b["label"][[ib[i] for i in ids]]
    if not np.array_equal(la, lb):
        raise ValueError(f"{int(np.sum(la != lb))} examples have different labels in "
                         f"{name_a} and {name_b}; they were not evaluated on the same data.")
    if pa.shape[1] != pb.shape[1]:
        raise ValueError(f"{name_a} has {pa.shape[1]} classes, {name_b} {pb.shape[1]}.")
    return la, pa, pb


# ----------------------------------------------------------------------------- measures
def cohen_kappa(a: np.ndarray, b: np.ndarray, num_classes: Optional[int] = None) -> float:
    """Cohen's kappa of two label vectors (N,): (p_o - p_e) / (1 - p_e); 1.0 if p_e == 1."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    k = int(num_classes or max(a.max(initial=0), b.max(initial=0)) + 1)
    conf = np.zeros((k, k))
    np.add.at(conf, (a, b), 1.0)
    conf /= conf.sum()
    po = np.trace(conf)
    pe = float(conf.sum(1) @ conf.sum(0))
    return 1.0 if pe >= 1.0 else float((po - pe) / (1.0 - pe))


def _pearson(x, y) -> float:
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def probability_correlation(pa: np.ndarray, pb: np.ndarray) -> float:
    """Pearson correlation of predicted probabilities: of the positive class when K == 2,
    else the mean over classes of the per-class correlations (constant classes skipped)."""
    if pa.shape[1] == 2:
        return _pearson(pa[:, 1], pb[:, 1])
    vals = [_pearson(pa[:, k], pb[:, k]) for k in range(pa.shape[1])]
    vals = [v for v in vals if np.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"prediction similarity mode {mode!r} is not one of {sorted(MODES)}")
    return mode


def prediction_similarity(labels, probs_a, probs_b, mode: str = "corrected") -> Dict[str, float]:
    """Similarity of two classifiers' predictions on the same N examples.

    Args:
      labels (N,) ints; probs_a, probs_b (N, K) class probabilities (predicted label = argmax).
      mode: ``corrected`` or ``paper`` (the published baseline, acc_a used twice).
    Returns:
      dict: ``acc_a, acc_b``; ``observed`` (fraction both right or both wrong);
      ``expected_independent`` = acc_a*acc_b + (1-acc_a)*(1-acc_b) (``paper``:
      acc_a**2 + (1-acc_a)**2); ``excess`` = observed - expected; ``agreement`` (same
      predicted label); ``cohen_kappa`` (of predicted labels); ``prob_correlation``; ``n``.
    """
    _check_mode(mode)
    labels = np.asarray(labels, np.int64)
    pa, pb = np.asarray(probs_a, np.float64), np.asarray(probs_b, np.float64)
    if pa.shape != pb.shape or pa.ndim != 2 or pa.shape[0] != labels.shape[0]:
        raise ValueError(f"prediction_similarity: labels {labels.shape}, probs "
                         f"{pa.shape} / {pb.shape} do not match (need (N,), (N, K), (N, K)).")
    ya, yb = pa.argmax(1), pb.argmax(1)
    ra, rb = ya == labels, yb == labels
    acc_a, acc_b = float(ra.mean()), float(rb.mean())
    observed = float(np.mean(ra == rb))
    acc_other = acc_a if mode == "paper" else acc_b
    expected = acc_a * acc_other + (1 - acc_a) * (1 - acc_other)
    return dict(n=int(labels.shape[0]), acc_a=acc_a, acc_b=acc_b, observed=observed,
                expected_independent=expected, excess=observed - expected,
                agreement=float(np.mean(ya == yb)),
                cohen_kappa=cohen_kappa(ya, yb, pa.shape[1]),
                prob_correlation=probability_correlation(pa, pb))


def roc_auc(labels, probs, average: str = "macro") -> float:
    """ROC-AUC of (N,) labels and (N, K) probabilities (or (N,) positive-class scores):
    binary -> the positive class; K > 2 -> one-vs-rest ``macro`` or prevalence-``weighted``
    (inference.metrics.auc_ovr, the project's one AUC: NaN where a class is absent)."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim == 1:
        probs = np.stack([1 - probs, probs], 1)
    return metrics.auc_ovr(np.asarray(labels, np.int64), probs, average)


def relative_auc_gain(auc: float, auc_random: float) -> float:
    """(AUC - AUC_random) / AUC_random, the study's 'AUC difference' over random init."""
    if auc_random <= 0:
        raise ValueError(f"relative_auc_gain: random-init AUC must be > 0, got {auc_random}.")
    return (auc - auc_random) / auc_random


def auc_gain_vs_similarity(records: Sequence[Mapping]) -> List[dict]:
    """Correlates relative AUC gain with per-layer similarity across runs, per source.

    The paper (Revisiting ``simVSauc_plot.py``) fits one line per source (ImageNet,
    RadImageNet), over every target's folds; pooling the sources would mix two
    relationships into one slope.

    Args:
      records: one per fine-tuned run: ``{'auc': float, 'auc_random': float,
        'similarity': {layer: value}[, 'source': str][, 'target': str]}`` (e.g. CCA of
        pre-trained vs fine-tuned).
    Returns:
      one row per (source, layer), sources in first-seen order (records without a source
      form one group, ``source=''``): ``source, layer, n, pearson_r, spearman_r, slope,
      intercept`` (least squares of gain on similarity), plus the points as
      ``similarity``/``gain`` lists and each point's ``target`` (the plot's colours).
    """
    if not records:
        raise ValueError("auc_gain_vs_similarity: no records.")
    layers = list(dict.fromkeys(l for r in records for l in r["similarity"]))
    rows = []
    for source in dict.fromkeys(str(r.get("source", "")) for r in records):
        for layer in layers:
            pts = [(float(r["similarity"][layer]), relative_auc_gain(r["auc"], r["auc_random"]),
                    str(r.get("target", ""))) for r in records
                   if layer in r["similarity"] and str(r.get("source", "")) == source]
            if not pts:
                continue
            x = np.array([p[0] for p in pts])
            y = np.array([p[1] for p in pts])
            slope = intercept = float("nan")
            if len(x) >= 2 and np.ptp(x) > 0:
                slope, intercept = (float(v) for v in np.polyfit(x, y, 1))
            rows.append(dict(source=source, layer=layer, n=len(x),
                             pearson_r=_pearson(x, y) if len(x) >= 2 else float("nan"),
                             spearman_r=(_pearson(stats.rankdata(x), stats.rankdata(y))
                                         if len(x) >= 2 else float("nan")),
                             slope=slope, intercept=intercept,
                             similarity=x.tolist(), gain=y.tolist(),
                             target=[p[2] for p in pts]))
    return rows


def compare_prediction_files(path_a: str, path_b: str, *, split: Optional[str] = None,
                             random_path: Optional[str] = None,
                             mode: str = "corrected") -> Dict[str, float]:
    """:func:`prediction_similarity` of two predictions CSVs (matched by id), plus each
    model's AUC, and the relative AUC gain over ``random_path`` (random-init run) if given.

    ``mode='paper'`` reproduces the published table: ``split`` defaults to 'val', the
    baseline uses acc_a twice and the AUCs are weighted one-vs-rest (see the module doc).
    """
    default_split, average = MODES[_check_mode(mode)]
    split = split or default_split
    a, b = read_predictions(path_a), read_predictions(path_b)
    if split is None and len(set(a["split"])) > 1 and "test" in set(a["split"]):
        split = "test"  # never pool the validation images (model selection) with the test
    labels, pa, pb = align_predictions(a, b, split=split, name_a=path_a, name_b=path_b)
    out = prediction_similarity(labels, pa, pb, mode)
    out["split"] = split or "all"
    out["auc_a"], out["auc_b"] = roc_auc(labels, pa, average), roc_auc(labels, pb, average)
    if random_path:
        r = read_predictions(random_path)
        lr, _, prr = align_predictions(a, r, split=split, name_a=path_a, name_b=random_path)
        out["auc_random"] = roc_auc(lr, prr, average)
        out["gain_a"] = relative_auc_gain(out["auc_a"], out["auc_random"])
        out["gain_b"] = relative_auc_gain(out["auc_b"], out["auc_random"])
    return out
