"""3x3 filter distributions: extraction, PCA, histograms, KL, sparsity, entropy, spikiness."""
import numpy as np
import pytest
from scipy import stats
from sklearn.decomposition import PCA

from medtransfer_jax.analysis import filters as F

pytestmark = pytest.mark.fast  # pure NumPy/SciPy: no JAX compilation


def _params(rng, scale=1.0):
    return {
        "conv1_conv": {"kernel": rng.normal(size=(7, 7, 3, 4))},
        "conv2_block1_1_conv": {"kernel": rng.normal(size=(1, 1, 4, 4))},
        "conv2_block1_2_conv": {"kernel": scale * rng.normal(size=(3, 3, 4, 6))},
        "conv3_block1_2_conv": {"kernel": scale * rng.laplace(size=(3, 3, 6, 8))},
        "conv4_block1_2_conv": {"kernel": scale * rng.uniform(-1, 1, size=(3, 3, 8, 8))},
        "conv2_block1_2_bn": {"scale": np.ones(6), "bias": np.zeros(6)},
    }


def test_extract_filters_order_layout_and_depth():
    rng = np.random.default_rng(0)
    p = _params(rng)
    lfs = F.extract_filters({"params": p})
    assert [l.layer for l in lfs] == ["conv2_block1_2_conv", "conv3_block1_2_conv",
                                      "conv4_block1_2_conv"]
    # CNN-Filter-DB's depth: the rank among the levels holding any conv (stem 7x7 = 0, the
    # 1x1 = 1, then the three 3x3 layers) over 4; not the rank among the 3x3 layers alone
    assert [l.depth for l in lfs] == [0.5, 0.75, 1.0]
    k = p["conv3_block1_2_conv"]["kernel"]  # (3, 3, in=6, out=8)
    f = lfs[1].filters
    assert f.shape == (48, 9)
    for o, i in [(0, 0), (3, 5), (7, 2)]:
        np.testing.assert_array_equal(f[o * 6 + i], k[:, :, i, o].ravel())
    with pytest.raises(ValueError, match="No 3x3"):
        F.extract_filters({"dense": {"kernel": np.ones((4, 2))}})


def test_scaling_and_pca_basis():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(500, 9)) * np.linspace(3, 0.2, 9)
    f[7] = 0.0
    s = F.scale_filters(f)
    np.testing.assert_allclose(np.delete(np.abs(s).max(1), 7), 1.0)
    assert np.all(s[7] == 0)
    pca = F.fit_basis(lambda: iter([s[:200], s[200:]])).pca
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(9), atol=1e-12)
    assert pca.explained_variance_ratio.sum() == pytest.approx(1.0)
    assert np.all(np.diff(pca.explained_variance_ratio) <= 1e-15)
    ref = PCA(9).fit(s)
    np.testing.assert_allclose(pca.explained_variance_ratio, ref.explained_variance_ratio_,
                               atol=1e-10)
    c = pca.transform(s)
    np.testing.assert_allclose(c @ pca.components + pca.mean, s, atol=1e-12)
    np.testing.assert_allclose(np.abs(c), np.abs(ref.transform(s)), atol=1e-9)
    # signs as the notebook's scikit-learn 0.24 (svd_flip on U): each component's largest
    # |score| is positive, from an SVD of the centred data done here
    u, _, vt = np.linalg.svd(s - s.mean(0), full_matrices=False)
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(9)])
    np.testing.assert_allclose(pca.components, vt * signs[:, None], atol=1e-8)


def test_streamed_basis_equals_one_pca_of_all_filters():
    """fit_basis sees the sets one at a time (twice), as a study streams its models; it
    must give sklearn's PCA of the concatenated rows, sklearn 0.24's signs, and the one
    (min, max) over every coefficient."""
    rng = np.random.default_rng(11)
    sets = [F.scale_filters(rng.normal(size=(n, 9)) * np.linspace(2, 0.3, 9) + shift)
            for n, shift in ((300, 0.0), (0, 0.0), (1, 0.5), (900, -0.2), (250, 0.3))]
    calls = []

    def stream():
        calls.append(1)
        return iter(sets)

    basis = F.fit_basis(stream)
    assert len(calls) == 2 and basis.num_filters == 1451
    X = np.concatenate(sets)
    ref = PCA(9, svd_solver="full").fit(X)
    np.testing.assert_allclose(basis.pca.mean, X.mean(0), atol=1e-13)
    np.testing.assert_allclose(basis.pca.explained_variance_ratio,
                               ref.explained_variance_ratio_, atol=1e-12)
    u, _, vt = np.linalg.svd(X - X.mean(0), full_matrices=False)
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(9)])
    np.testing.assert_allclose(basis.pca.components, vt * signs[:, None], atol=1e-9)
    c = basis.pca.transform(X)
    np.testing.assert_allclose(basis.ranges, np.tile([c.min(), c.max()], (9, 1)), atol=1e-12)
    # a flipped component's extent is mirrored: the stream's range follows the signs
    again = F.FilterBasis.from_json(basis.to_json())
    np.testing.assert_array_equal(again.pca.components, basis.pca.components)
    np.testing.assert_array_equal(again.ranges, basis.ranges)
    with pytest.raises(ValueError, match="no filters"):
        F.fit_basis(lambda: iter([np.zeros((0, 9))]))


def test_a_given_basis_is_used_as_given():
    rng = np.random.default_rng(12)
    a, b, c = _params(rng), _params(rng, 1.5), _params(rng, 0.5)
    basis = F.fit_basis(lambda: (F.scaled_filters(p) for p in (a, b, c)))
    rep = F.analyse_filters({"a": a, "b": b}, basis=basis, noise_repeats=0)
    assert rep.pca is basis.pca and rep.ranges is basis.ranges
    own = F.analyse_filters({"a": a, "b": b}, noise_repeats=0)
    # the pair's own basis is another basis: the same pair reads another drift
    d_shared = [r["drift"] for r in rep.drift_rows if r["scope"] == "all"][0]
    d_own = [r["drift"] for r in own.drift_rows if r["scope"] == "all"][0]
    assert d_shared != pytest.approx(d_own, rel=1e-3)
    # by hand, in the given basis
    ca = basis.pca.transform(F.scaled_filters(a))
    cb = basis.pca.transform(F.scaled_filters(b))
    w = basis.pca.explained_variance_ratio
    assert d_shared == pytest.approx(F.kl_drift(F.coefficient_histograms(ca, basis.ranges),
                                                F.coefficient_histograms(cb, basis.ranges), w))


def test_histograms_and_kl():
    rng = np.random.default_rng(2)
    c = rng.normal(size=(1000, 9))
    ranges = np.tile([c.min(), c.max()], (9, 1))  # one (min, max) for all nine, as the DB
    h = F.coefficient_histograms(c * 0.5, ranges, bins=70)
    assert h.shape == (9, 70)
    np.testing.assert_allclose(h.sum(1), 1.0)
    counts, _ = np.histogram(c[:, 0] * 0.5, bins=70, range=tuple(ranges[0]))
    empty = counts == 0
    # the eps floor sits on the density values: density = count / (n * width)
    width = (ranges[0, 1] - ranges[0, 0]) / 70
    dens = np.where(empty, F.EPS32, counts / (counts.sum() * width))
    assert empty.any()
    np.testing.assert_allclose(h[0], dens / dens.sum(), rtol=1e-12)
    p = F.coefficient_histograms(c, ranges)
    assert np.allclose(F.kl_divergence(p, p), 0.0)
    np.testing.assert_allclose(F.kl_divergence(p, h), [stats.entropy(p[i], h[i]) for i in range(9)])
    np.testing.assert_allclose(F.symmetric_kl(p, h), F.symmetric_kl(h, p))
    w = np.linspace(0.3, 0.01, 9)
    assert F.kl_drift(p, h, w) == pytest.approx(
        sum(w[i] * (stats.entropy(p[i], h[i]) + stats.entropy(h[i], p[i])) for i in range(9)))
    assert F.kl_drift(p, p, w) == pytest.approx(0.0, abs=1e-12)


def test_sparsity_hand_made():
    f = np.ones((10, 9)) * 0.5
    f[0, 4] = -2.0  # layer max |w| = 2 -> threshold 0.02
    f[1:4] = 0.01  # 3 sparse filters
    f[4] = 0.01
    f[4, 8] = 0.03  # one weight above the threshold: not sparse
    want = sum(all(abs(v) < 0.02 for v in row) for row in f) / len(f)
    assert want == 0.3
    assert F.sparsity(f) == pytest.approx(want)
    assert F.sparsity(np.zeros((3, 9))) == 1.0


def test_variance_entropy_known_spectra():
    rng = np.random.default_rng(3)
    # one direction of variance -> 0
    d = rng.normal(size=9)
    assert F.variance_entropy(np.outer(rng.normal(size=200), d) + 5.0) == pytest.approx(0.0,
                                                                                       abs=1e-9)
    # isotropic: +-e_i for every i -> log10(9)
    iso = np.concatenate([np.eye(9), -np.eye(9)])
    assert F.variance_entropy(iso) == pytest.approx(np.log10(9))
    # general: entropy of normalised covariance eigenvalues (independent formula)
    X = rng.normal(size=(300, 9)) * np.arange(1, 10)
    lam = np.linalg.eigvalsh(np.cov(X.T))
    p = lam / lam.sum()
    assert F.variance_entropy(X) == pytest.approx(-(p * np.log10(p)).sum())


def test_spikiness_and_orthogonality():
    rng = np.random.default_rng(4)
    w = np.full(9, 1 / 9)
    g = rng.normal(size=(20000, 9))
    lap = rng.laplace(size=(20000, 9))
    assert abs(F.spikiness(g, w)) < 0.15
    assert F.spikiness(lap, w) == pytest.approx(np.mean(stats.kurtosis(lap, axis=0)))
    assert F.spikiness(lap, w) > 2.5 > F.spikiness(rng.uniform(size=(20000, 9)), w) + 3.5
    eye = np.eye(9).reshape(3, 3, 1, 9)  # 9 orthogonal output filters
    assert F.orthogonality(eye) == pytest.approx(1.0)
    same = np.ones((3, 3, 2, 4))
    assert F.orthogonality(same) == pytest.approx(0.0)


def test_analyse_filters_drift_and_groups():
    rng = np.random.default_rng(5)
    a = _params(rng)
    b = {k: {n: v.copy() for n, v in d.items()} for k, d in a.items()}
    c = _params(np.random.default_rng(6), scale=3.0)
    c["conv3_block1_2_conv"]["kernel"] = np.random.default_rng(7).normal(size=(3, 3, 6, 8))
    rep = F.analyse_filters({"a": a, "b": b, "c": c}, groups={"ab": ["a", "b"], "cc": ["c"]},
                            with_orthogonality=True)
    layer = {(r["a"], r["b"], r["key"]): r["drift"] for r in rep.drift_rows
             if r["scope"] == "layer"}
    assert layer[("a", "b", "conv3_block1_2_conv")] == pytest.approx(0.0, abs=1e-12)
    # per-filter max scaling removes the global x3, so only the changed layer drifts
    assert layer[("a", "c", "conv3_block1_2_conv")] > 0.05
    groups = [r for r in rep.drift_rows if r["scope"] == "depth_bin"]
    assert {(r["a"], r["b"]) for r in groups} == {("ab", "cc")}
    stats_rows = {(r["model"], r["layer"]): r for r in rep.layer_rows}
    assert stats_rows[("a", "conv2_block1_2_conv")]["n_filters"] == 24
    assert stats_rows[("a", "conv4_block1_2_conv")]["depth_bin"] == "(0.9, 1.0]"
    assert stats_rows[("a", "conv3_block1_2_conv")]["depth_bin"] == "(0.7, 0.8]"
    assert stats_rows[("a", "conv2_block1_2_conv")]["depth_bin"] == "(0.4, 0.5]"
    assert 0 < stats_rows[("a", "conv2_block1_2_conv")]["variance_entropy"] <= np.log10(9)
    assert rep.histograms[("ab", "(0.4, 0.5]")].shape == (9, F.NUM_BINS)
    # identical models: the drift is exactly 0 while the noise floor (halves) is not
    ab = [r for r in rep.drift_rows if r["scope"] == "layer" and r["a"] == "a" and r["b"] == "b"]
    assert all(r["noise_floor"] > 0 and r["drift"] < r["noise_floor"] for r in ab)
    with pytest.raises(ValueError, match="unknown models"):
        F.analyse_filters({"a": a}, groups={"g": ["zzz"]})


# --------------------------------------------------------------------------------------
# The published definition, re-implemented from CNN-Filter-DB's main.ipynb step by step
# (pandas.cut is written out by hand: pandas is not a dependency).

def _notebook_cut(depth, edges):
    """pandas.cut(depth, edges, include_lowest=True) -> bin index: (a, b], first [a, b]."""
    for i in range(len(edges) - 1):
        if edges[i] < depth <= edges[i + 1] or (i == 0 and depth == edges[0]):
            return i
    return None


def _notebook_prob(x, rng_, bins):
    v, _ = np.histogram(x, range=rng_, bins=bins, density=True)
    v = v.astype(np.double)
    v[v == 0] = np.finfo(np.float32).eps
    return v / np.sum(v)


def _notebook_drift(p_coeffs, q_coeffs, rng_, weights, bins=70):
    return np.sum([weights[i] * (stats.entropy(_notebook_prob(p_coeffs[:, i], rng_, bins),
                                               _notebook_prob(q_coeffs[:, i], rng_, bins))
                                 + stats.entropy(_notebook_prob(q_coeffs[:, i], rng_, bins),
                                                 _notebook_prob(p_coeffs[:, i], rng_, bins)))
                   for i in range(9)])


def test_depth_bins_are_pandas_cut_right_closed():
    edges = np.arange(0, 1.0 + 0.10, 0.10)
    depths = [0.0, 0.05, 0.1, 0.1000001, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0]
    depths += [i / 15 for i in range(16)]  # 16 3x3 layers as a ResNet50
    for d in depths:
        i = _notebook_cut(d, edges)
        assert F.depth_bin_index(d) == i, d
        label = F.depth_bin(d)
        assert label == ("[0.0, 0.1]" if i == 0 else f"({edges[i]:.1f}, {edges[i + 1]:.1f}]")
    # the boundaries go to the lower bin (the old [a, b) convention put them one up)
    assert F.depth_bin(0.2) == "(0.1, 0.2]" and F.depth_bin(0.8) == "(0.7, 0.8]"
    assert F.depth_bin(0.0) == "[0.0, 0.1]"
    with pytest.raises(ValueError):
        F.depth_bin_index(1.5)


def _eleven_layer_params(rng, dist):
    # 11 3x3 layers -> depths 0, 0.1, ..., 1.0: several on bin boundaries
    return {f"conv{2 + i // 4}_block{1 + i % 4}_2_conv":
            {"kernel": getattr(rng, dist)(size=(3, 3, 4, 5))} for i in range(11)}


def test_depth_bin_drift_matches_the_notebook():
    rng = np.random.default_rng(8)
    models = {"a": _eleven_layer_params(rng, "normal"), "b": _eleven_layer_params(rng, "laplace")}
    rep = F.analyse_filters(models, noise_repeats=0)
    # the notebook: scale, sklearn PCA over all filters, one range, cut depth, histograms
    X, depth, owner = [], [], []
    for m, p in models.items():
        for lf in F.extract_filters(p):
            X.append(lf.filters)
            depth += [lf.depth] * len(lf.filters)
            owner += [m] * len(lf.filters)
    X = np.concatenate(X)
    den = np.abs(X).max(axis=1)
    Xs = X / np.where(den == 0, 1, den)[:, None]
    pca = PCA(n_components=9).fit(Xs)
    # PCA signs are arbitrary; take ours so both describe the same axes
    sign = np.sign(np.sum(pca.components_ * rep.pca.components, axis=1))
    Xn = pca.transform(Xs) * sign
    rng_ = (Xn.min(), Xn.max())
    np.testing.assert_allclose(rep.ranges[0], rng_, rtol=1e-9)
    edges = np.arange(0, 1.0 + 0.10, 0.10)
    bins = np.array([_notebook_cut(d, edges) for d in depth])
    owner = np.array(owner)
    got = {r["key"]: r["drift"] for r in rep.drift_rows if r["scope"] == "depth_bin"}
    assert len(got) == 10
    for i in range(10):
        label = F.depth_bin(edges[i + 1])
        sel_a = (owner == "a") & (bins == i)
        sel_b = (owner == "b") & (bins == i)
        want = _notebook_drift(Xn[sel_a], Xn[sel_b], rng_, pca.explained_variance_ratio_)
        assert got[label] == pytest.approx(want, rel=1e-6), label
    # [0.0, 0.1] holds depths 0 and 0.1, every later bin one layer (20 filters)
    assert sum((owner == "a") & (bins == 1)) == 20
    all_row = [r for r in rep.drift_rows if r["scope"] == "all"][0]
    assert all_row["drift"] == pytest.approx(_notebook_drift(
        Xn[owner == "a"], Xn[owner == "b"], rng_, pca.explained_variance_ratio_), rel=1e-6)


def test_noise_floor_is_the_drift_between_halves():
    rng = np.random.default_rng(9)
    c = rng.normal(size=(400, 9))
    ranges = np.tile([c.min(), c.max()], (9, 1))
    w = np.full(9, 1 / 9)
    mean, sd = F.drift_noise_floor(c, ranges, w, repeats=4, seed=3)
    r = np.random.default_rng(3)
    want = []
    for _ in range(4):
        perm = r.permutation(400)
        want.append(F.kl_drift(F.coefficient_histograms(c[perm[:200]], ranges),
                               F.coefficient_histograms(c[perm[200:]], ranges), w))
    assert mean == pytest.approx(np.mean(want)) and sd == pytest.approx(np.std(want, ddof=1))
    # more filters per group -> a lower floor
    big = rng.normal(size=(20000, 9))
    assert F.drift_noise_floor(big, ranges, w, repeats=2)[0] < mean / 5
