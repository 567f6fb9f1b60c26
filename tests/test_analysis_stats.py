"""analysis/stats.py against SciPy/NumPy references (pure NumPy, fast)."""
import math
import statistics

import numpy as np
import pytest
from scipy import stats as sps

from medtransfer_jax.analysis import stats
from medtransfer_jax.inference import metrics

pytestmark = pytest.mark.fast  # pure NumPy/SciPy: no JAX compilation


def test_mean_sd_is_the_sample_sd():
    xs = [0.91, 0.88, float("nan"), 0.93, None]
    m, sd, n = stats.mean_sd(xs)
    assert n == 3 and m == pytest.approx(statistics.mean([0.91, 0.88, 0.93]))
    assert sd == pytest.approx(statistics.stdev([0.91, 0.88, 0.93]))
    # two folds: ddof=1 is sqrt(2) x the population sd
    assert stats.mean_sd([1.0, 2.0])[1] == pytest.approx(np.std([1.0, 2.0]) * math.sqrt(2))
    assert math.isnan(stats.mean_sd([1.0])[1]) and stats.mean_sd([])[2] == 0


def test_bootstrap_ci_reimplemented_and_against_scipy():
    rng = np.random.default_rng(0)
    n = 120
    labels = rng.integers(0, 2, n)
    score = labels + rng.normal(scale=1.2, size=n)
    probs = np.stack([1 - 1 / (1 + np.exp(-score)), 1 / (1 + np.exp(-score))], 1)
    lo, hi = stats.bootstrap_ci(labels, probs, metrics.auc_ovr, n_boot=400, seed=5)
    idx = np.random.default_rng(5).integers(0, n, size=(400, n))
    ref = [metrics.binary_auc(labels[i], probs[i, 1]) for i in idx]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(ref, [0.025, 0.975])))
    auc = metrics.auc_ovr(labels, probs)
    assert lo < auc < hi and 0.05 < hi - lo < 0.4
    # the percentile interval of a mean agrees with scipy.stats.bootstrap (MC error only)
    x = rng.normal(size=200)
    mean_metric = lambda l, p: float(np.mean(p[:, 0]))  # noqa: E731
    lo, hi = stats.bootstrap_ci(np.zeros(200, int), x[:, None], mean_metric, n_boot=4000)
    ref = sps.bootstrap((x,), np.mean, n_resamples=4000, method="percentile",
                        rng=np.random.default_rng(1)).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.03) and hi == pytest.approx(ref.high, abs=0.03)


def test_bootstrap_ci_of_a_mean_over_folds():
    """Source Matters' figures band each mean over folds with seaborn's default 95 %
    percentile bootstrap; against scipy.stats.bootstrap (Monte Carlo error only)."""
    folds = np.array([0.171, 0.112, 0.231, 0.15, 0.19])
    lo, hi = stats.bootstrap_mean_ci(folds, n_boot=20000)
    ref = sps.bootstrap((folds,), np.mean, n_resamples=20000, method="percentile",
                        rng=np.random.default_rng(3)).confidence_interval
    assert lo == pytest.approx(ref.low, abs=4e-3) and hi == pytest.approx(ref.high, abs=4e-3)
    assert lo < folds.mean() < hi and hi <= folds.max() and lo >= folds.min()
    assert stats.bootstrap_mean_ci([0.5, float("nan"), 0.7])[0] >= 0.5
    assert all(math.isnan(v) for v in stats.bootstrap_mean_ci([0.5]))


def test_paired_test_against_scipy():
    a = np.array([0.91, 0.85, 0.88, 0.93, 0.90])
    b = np.array([0.89, 0.80, 0.87, 0.90, 0.91])
    r = stats.paired_test(a, b)
    ref = sps.ttest_rel(a, b)
    assert r["t"] == pytest.approx(ref.statistic) and r["p_t"] == pytest.approx(ref.pvalue)
    assert r["sd_diff"] == pytest.approx(np.std(a - b, ddof=1))
    perm = sps.permutation_test((a, b), lambda x, y: np.mean(x - y), vectorized=False,
                                permutation_type="samples", n_resamples=np.inf)
    assert r["p_perm"] == pytest.approx(perm.pvalue)
    # all five differences positive: the exact sign-flip p is 2/32
    assert stats.paired_test(a + 1, a)["p_perm"] == pytest.approx(2 / 32)
    with pytest.raises(ValueError, match="paired"):
        stats.paired_test(a, b[:3])


def test_permutation_ttest_ind_matches_scipy_exact():
    # Source Matters' numbers shape: 5 folds per source
    a = np.array([15.0, 20.9, 28.5, 14.3, 6.9])
    b = np.array([70.1, 71.5, 60.2, 66.0, 73.3])
    t, p = stats.permutation_ttest_ind(a, b)
    ref = sps.ttest_ind(a, b, method=sps.PermutationMethod(n_resamples=10000))
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert p == pytest.approx(2 / 252)  # fully separated: the smallest possible exact p
    a2 = np.array([0.83, 0.88, 0.89, 0.84, 0.80])
    b2 = np.array([0.86, 0.84, 0.90, 0.82, 0.87])
    t2, p2 = stats.permutation_ttest_ind(a2, b2)
    ref2 = sps.ttest_ind(a2, b2, method=sps.PermutationMethod(n_resamples=10000))
    assert t2 == pytest.approx(ref2.statistic) and p2 == pytest.approx(ref2.pvalue)
    assert p2 > 0.3
    # too many relabelings -> Monte Carlo: close to the exact p
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=9), rng.normal(0.8, size=9)
    exact = stats.permutation_ttest_ind(x, y, permutations=10 ** 6)[1]
    mc = stats.permutation_ttest_ind(x, y, permutations=3000, seed=1)[1]
    assert mc == pytest.approx(exact, abs=0.02)
    assert math.isnan(stats.permutation_ttest_ind([1.0], [2.0, 3.0])[1])


def _abs_corr(x, y):
    return abs(np.corrcoef(x[:, 0], y[:, 0])[0, 1])


def test_null_similarity_shuffles_rows():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4))
    y = x + 0.1 * rng.normal(size=(300, 4))
    m, sd = stats.null_similarity(x, y, _abs_corr, repeats=6, seed=4)
    r = np.random.default_rng(4)
    ref = [_abs_corr(x, y[r.permutation(300)]) for _ in range(6)]
    assert m == pytest.approx(np.mean(ref)) and sd == pytest.approx(np.std(ref, ddof=1))
    assert _abs_corr(x, y) > 0.9 > 0.2 > m  # the real pairing is far above chance
    with pytest.raises(ValueError, match="rows"):
        stats.null_similarity(x, y[:10], _abs_corr)


def test_null_similarity_of_mean_cca_falls_with_datapoints():
    def mean_cca(x, y):
        qx, _ = np.linalg.qr(x - x.mean(0))
        qy, _ = np.linalg.qr(y - y.mean(0))
        return float(np.mean(np.linalg.svd(qx.T @ qy, compute_uv=False)))
    rng = np.random.default_rng(6)
    def null(n):
        x = rng.normal(size=(n, 16))
        return stats.null_similarity(x, x + 0.1 * rng.normal(size=(n, 16)), mean_cca,
                                     repeats=3)[0]
    small, large = null(80), null(2000)
    assert large < small / 2 and 0 < large < 0.15


def test_significance_marks():
    assert [stats.significance_mark(p) for p in (0.0005, 0.005, 0.03, 0.2, float("nan"))] == [
        "***", "**", "*", "", ""]
