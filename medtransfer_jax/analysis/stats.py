"""The studies' statistics: spread over folds, bootstrap CIs, paired and permutation tests.

Why a module of its own: a study has 2-5 folds, so how the spread and the tests are
computed decides what a reader may conclude. The conventions here:

* :func:`mean_sd`: the *sample* standard deviation over folds (ddof=1); with 2 folds the
  population sd (ddof=0) understates the spread by sqrt(2).
* :func:`bootstrap_ci`: percentile bootstrap over the test images of one run (the images
  are the sampling unit of one run's AUC), any metric of (labels, probs).
* :func:`paired_test`: Revisiting compares sources per target on the *same* folds, so the
  comparison is paired over folds: paired t-test and the exact sign-flip permutation test.
* :func:`permutation_ttest_ind`: Source Matters' test, ``scipy.stats.ttest_ind(imnet,
  radnet, permutations=10000)`` (their ``statistical_tests.ipynb``): Student's t of two
  independent samples, p from the permutation distribution of t -- exact over all
  C(n_a + n_b, n_a) relabelings when that count is <= ``permutations`` (5 vs 5 folds:
  252, so the smallest possible p is 2/252 = 0.0079), else ``permutations`` random ones.
* :func:`null_similarity`: the chance level of a representation similarity: the value
  between the same two matrices with the rows of Y shuffled, so each keeps its own
  spectrum (dead channels, correlated positions) and only the correspondence is gone.
  With few datapoints per channel this level is far from 0 (24 datapoints x 8 channels:
  mean CCA ~0.3-0.5), which is why a similarity needs it beside it.

Pure NumPy/SciPy functions of arrays; callers decide what to do with NaN (returned, not
raised, when a statistic is undefined, e.g. n < 2).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
from scipy import stats as sps


def _finite(values: Sequence[float]) -> np.ndarray:
    x = np.asarray([v for v in values if v is not None and v != ""], np.float64)
    return x[np.isfinite(x)]


def mean_sd(values: Sequence[float]) -> Tuple[float, float, int]:
    """(mean, sample sd (ddof=1), n) over the finite values; sd is NaN for n < 2."""
    x = _finite(values)
    if x.size == 0:
        return float("nan"), float("nan"), 0
    sd = float(np.std(x, ddof=1)) if x.size > 1 else float("nan")
    return float(x.mean()), sd, int(x.size)


def bootstrap_indices(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n) resampling indices, drawn with replacement (numpy default_rng(seed))."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray,
                 metric: Callable[[np.ndarray, np.ndarray], float], *, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap CI of ``metric(labels, probs)`` over the N images.

    Args:
      labels: (N,) ints; probs: (N, K); metric: e.g. ``inference.metrics.auc_ovr``.
      n_boot: resamples; those where the metric is undefined (NaN: a resample with one
        class only) are dropped.
    Returns:
      (low, high) at ``level``; NaNs when fewer than 10 resamples were defined.
    """
    labels, probs = np.asarray(labels), np.asarray(probs)
    vals = np.array([metric(labels[i], probs[i])
                     for i in bootstrap_indices(len(labels), n_boot, seed)], np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size < 10:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    lo, hi = np.quantile(vals, [alpha, 1 - alpha])
    return float(lo), float(hi)


def bootstrap_mean_ci(values: Sequence[float], *, n_boot: int = 1000, level: float = 0.95,
                      seed: int = 0) -> Tuple[float, float]:
    """Percentile bootstrap CI of the mean of the finite ``values`` (e.g. a source's fold
    AUCs): seaborn's default ``errorbar=('ci', 95)``, the band of Source Matters'
    figures (seeded here, so a table is reproducible). NaNs for fewer than 2 values."""
    x = _finite(values)
    if x.size < 2:
        return float("nan"), float("nan")
    return bootstrap_ci(np.zeros(x.size, int), x[:, None], lambda _, v: float(v[:, 0].mean()),
                        n_boot=n_boot, level=level, seed=seed)


def paired_test(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Paired comparison of a and b measured on the same folds (pairs with a NaN dropped).

    Returns ``n, mean_diff (a - b), sd_diff (ddof=1), t, p_t`` (two-sided paired t-test)
    and ``p_perm``: exact two-sided sign-flip permutation p of the mean difference over
    all 2^n sign patterns (n = 5 folds: the smallest possible p is 2/32 = 0.0625).
    """
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired_test: a {x.shape} and b {y.shape} must be paired (same shape).")
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    n = int(d.size)
    out = dict(n=n, mean_diff=float(d.mean()) if n else float("nan"), sd_diff=float("nan"),
               t=float("nan"), p_t=float("nan"), p_perm=float("nan"))
    if n < 2:
        return out
    sd = float(np.std(d, ddof=1))
    out["sd_diff"] = sd
    if sd > 0:
        t = d.mean() / (sd / math.sqrt(n))
        out.update(t=float(t), p_t=float(2 * sps.t.sf(abs(t), n - 1)))
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    null = np.abs((signs * d).mean(axis=1))
    out["p_perm"] = float(np.mean(null >= abs(d.mean()) * (1 - 1e-12)))
    return out


def student_t(a: np.ndarray, b: np.ndarray) -> float:
    """Student's (pooled-variance) two-sample t of a vs b."""
    na, nb = len(a), len(b)
    sp2 = ((na - 1) * np.var(a, ddof=1) + (nb - 1) * np.var(b, ddof=1)) / (na + nb - 2)
    den = math.sqrt(sp2 * (1 / na + 1 / nb))
    diff = float(np.mean(a) - np.mean(b))
    if den == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / den


def permutation_ttest_ind(a: Sequence[float], b: Sequence[float], *, permutations: int = 10000,
                          seed: int = 0) -> Tuple[float, float]:
    """Source Matters' test: (t, two-sided permutation p) of Student's t, a vs b.

    Exact when the C(n_a+n_b, n_a) relabelings number <= ``permutations`` (the observed
    labelling is one of them), else ``permutations`` random relabelings plus the observed
    one. NaNs are dropped; (nan, nan) when either side has fewer than 2 values.
    """
    x, y = _finite(a), _finite(b)
    if x.size < 2 or y.size < 2:
        return float("nan"), float("nan")
    t_obs = student_t(x, y)
    pooled = np.concatenate([x, y])
    na, n = x.size, x.size + y.size
    if math.comb(n, na) <= permutations:
        splits = [np.array(c) for c in itertools.combinations(range(n), na)]
    else:
        rng = np.random.default_rng(seed)
        splits = [np.arange(na)] + [rng.permutation(n)[:na] for _ in range(permutations)]
    null = []
    for idx in splits:
        mask = np.zeros(n, bool)
        mask[idx] = True
        null.append(student_t(pooled[mask], pooled[~mask]))
    null = np.abs(np.array(null))
    # relative tolerance: relabelings equal to the observed |t| up to rounding count as >=
    return float(t_obs), float(np.mean(null >= abs(t_obs) * (1 - 1e-12)))


def null_similarity(x: np.ndarray, y: np.ndarray, similarity: Callable[[np.ndarray, np.ndarray],
                                                                    float], *,
                    repeats: int = 5, seed: int = 0) -> Tuple[float, float]:
    """(mean, sample sd) of ``similarity(x, y[perm])`` over random row permutations of y.

    x (n, p), y (n, q): datapoints in rows. Shuffling the rows keeps each matrix's own
    structure but breaks the correspondence, so the result is the chance level a measured
    similarity of that shape has to exceed.
    """
    if len(x) != len(y):
        raise ValueError(f"null_similarity: x has {len(x)} rows and y {len(y)}; rows are "
                         "datapoints and must correspond.")
    rng = np.random.default_rng(seed)
    vals = [float(similarity(x, y[rng.permutation(len(y))])) for _ in range(repeats)]
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if repeats > 1 else float("nan")


def significance_mark(p: float) -> str:
    """'***' p < 0.001, '**' < 0.01, '*' < 0.05, '' otherwise (and for NaN)."""
    if not np.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""
