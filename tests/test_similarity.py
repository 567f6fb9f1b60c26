"""Similarity kernels vs independent float64 NumPy references, identities and edge cases.

Tolerances (float32 kernels on device vs float64 references):
* individual canonical correlations: 1e-4 on well-conditioned data;
* scalar summaries (mean CCA, SVCCA, PWCCA, CKA variants, Procrustes): 2e-4;
* identities (CCA(X, XA) = 1, CKA(X, X) = 1, invariances): 1e-4.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _numpy_oracle import (ref_cca, ref_cka_from_grams, ref_debiased_cka, ref_paper,
                           ref_procrustes, ref_pwcca, ref_rbf, ref_svcca, numpy_similarity)
from medtransfer_jax.analysis import similarity as S

N, P, Q = 600, 12, 16


def _data(seed=0, n=N, p=P, q=Q, shared=6):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, shared))
    X = Z @ rng.normal(size=(shared, p)) + rng.normal(size=(n, p)) + 3.0
    Y = np.tanh(Z @ rng.normal(size=(shared, q))) + 0.7 * rng.normal(size=(n, q)) - 1.0
    return X.astype(np.float32), Y.astype(np.float32)


# ----------------------------------------------------------------------------- reference checks
def test_cca_correlations_match_textbook():
    X, Y = _data()
    rho, k = S.cca_correlations(X, Y)
    ref = ref_cca(X, Y)
    assert int(k) == P
    np.testing.assert_allclose(np.asarray(rho), ref, atol=1e-4)
    np.testing.assert_allclose(float(S.mean_cca(X, Y)), ref.mean(), atol=2e-4)


@pytest.mark.parametrize("method,ref", [
    ("svcca", lambda X, Y: ref_svcca(X, Y)),
    ("pwcca", ref_pwcca),
    ("paper_cca", ref_paper),
    ("linear_cka", lambda X, Y: ref_cka_from_grams(
        (X - X.mean(0)) @ (X - X.mean(0)).T, (Y - Y.mean(0)) @ (Y - Y.mean(0)).T)),
    ("procrustes", ref_procrustes),
])
def test_methods_match_float64_references(method, ref):
    X, Y = _data(1)
    got = float(S.similarity(X, Y, method))
    want = float(ref(X.astype(np.float64), Y.astype(np.float64)))
    assert got == pytest.approx(want, abs=2e-4), (method, got, want)


def test_svcca_reduces_dimensions():
    """Low-rank signal plus tiny noise: SVCCA keeps the signal directions only, so it is much
    higher than mean CCA over all (mostly noise) directions; matches the reference."""
    rng = np.random.default_rng(3)
    Z = rng.normal(size=(N, 3))
    X = Z @ rng.normal(size=(3, P)) + 1e-3 * rng.normal(size=(N, P))
    Y = Z @ rng.normal(size=(3, Q)) + 1e-3 * rng.normal(size=(N, Q))
    X, Y = X.astype(np.float32), Y.astype(np.float32)
    got = float(S.svcca(X, Y))
    assert got == pytest.approx(ref_svcca(X, Y), abs=2e-4)
    assert got > 0.99 > float(S.mean_cca(X, Y)) + 0.3


def test_cka_small_n_gram_paths():
    """n < p: Gram-form linear CKA, RBF CKA and debiased CKA (both kernels) vs references."""
    rng = np.random.default_rng(2)
    n, p, q = 40, 70, 50
    X = rng.normal(size=(n, p)).astype(np.float32)
    Y = (X[:, :q] + 0.8 * rng.normal(size=(n, q))).astype(np.float32)
    Xd, Yd = X.astype(np.float64), Y.astype(np.float64)
    Kl, Ll = Xd @ Xd.T, Yd @ Yd.T
    assert float(S.linear_cka(X, Y)) == pytest.approx(ref_cka_from_grams(Kl, Ll), abs=2e-4)
    Kr, Lr = ref_rbf(Xd, 0.8), ref_rbf(Yd, 0.8)
    assert float(S.rbf_cka(X, Y, threshold=0.8)) == pytest.approx(
        ref_cka_from_grams(Kr, Lr), abs=2e-4)
    assert float(S.debiased_cka(X, Y)) == pytest.approx(ref_debiased_cka(Kl, Ll), abs=2e-4)
    assert float(S.debiased_cka(X, Y, kernel="rbf", threshold=0.8)) == pytest.approx(
        ref_debiased_cka(Kr, Lr), abs=2e-4)
    # feature-space and Gram-space forms of debiased linear CKA agree
    assert float(S.similarity(X, Y, "debiased_cka", kernel="linear_gram")) == pytest.approx(
        float(S.debiased_cka(X, Y)), abs=1e-5)


def test_debiased_cka_large_n_feature_form():
    X, Y = _data(4, n=300)
    Xd, Yd = X.astype(np.float64), Y.astype(np.float64)
    want = ref_debiased_cka(Xd @ Xd.T, Yd @ Yd.T)
    assert float(S.debiased_cka(X, Y)) == pytest.approx(want, abs=2e-4)
    # debiasing moves the estimate below the biased one on independent noise
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(300, 20)), rng.normal(size=(300, 20))
    assert abs(float(S.debiased_cka(A, B))) < 0.02 < float(S.linear_cka(A, B))


# ----------------------------------------------------------------------------- identities
def test_invariances_and_identities():
    X, Y = _data(5)
    rng = np.random.default_rng(5)
    Qx, _ = np.linalg.qr(rng.normal(size=(P, P)))
    Qy, _ = np.linalg.qr(rng.normal(size=(Q, Q)))
    Xr, Yr = (X @ Qx * 7.5).astype(np.float32), (Y @ Qy * 0.02).astype(np.float32)
    # PWCCA's weights sum |<h_i, x_j>| over X's neurons: invariant to rotating Y and to
    # scaling / permuting / sign-flipping X's neurons, but not to rotating X.
    perm = rng.permutation(P)
    Xp = (X[:, perm] * np.where(perm % 2, -1.0, 1.0) * 7.5).astype(np.float32)
    for m in S.METHODS:
        if m == "rbf_cka":
            continue  # O(n^2); checked separately on a smaller set
        a = float(S.similarity(X, Y, m))
        b = float(S.similarity(Xp if m == "pwcca" else Xr, Yr, m))
        assert a == pytest.approx(b, abs=1e-4), m
    A = rng.normal(size=(P, P)) + 3 * np.eye(P)  # invertible, not orthogonal
    XA = (X @ A).astype(np.float32)
    for m in ("mean_cca", "paper_cca", "pwcca"):
        assert float(S.similarity(X, XA, m)) == pytest.approx(1.0, abs=1e-4), m
    rho, _ = S.cca_correlations(X, XA)
    np.testing.assert_allclose(np.asarray(rho), 1.0, atol=1e-4)
    for m in ("linear_cka", "debiased_cka"):
        assert float(S.similarity(X, X, m)) == pytest.approx(1.0, abs=1e-5), m
    assert float(S.procrustes_distance(X, Xr)) == pytest.approx(0.0, abs=1e-4)
    small = X[:80]
    assert float(S.rbf_cka(small, small)) == pytest.approx(1.0, abs=1e-5)
    assert float(S.rbf_cka(small, small @ Qx * 3)) == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------- edge cases
def test_rank_deficient_and_constant_neurons_are_finite_and_correct():
    X, Y = _data(6)
    rng = np.random.default_rng(6)
    # 2 duplicated (rescaled, shifted) neurons and 1 constant neuron: rank P of P + 3
    dup = np.concatenate([X, X[:, :2] * 2.0 + 1.0, np.full((N, 1), 4.2, np.float32)], 1)
    const = np.ones((N, P + 3), np.float32)
    for m in S.METHODS:
        assert np.isfinite(float(S.similarity(dup, Y, m))), m
        assert np.isfinite(float(S.similarity(const, Y, m))), m
    # duplicated / constant columns do not change mean CCA (rank is what counts)
    assert float(S.mean_cca(dup, Y)) == pytest.approx(float(S.mean_cca(X, Y)), abs=2e-4)
    rho, k = S.cca_correlations(dup, Y)
    assert int(k) == P and np.all(np.asarray(rho)[P:] == 0)
    # paper semantics: the constant neuron is pruned (variance < eps * max), the 2 duplicate
    # neurons are kept and count in the mean with correlation 0:
    # mean = sum(rho(X, Y)) / min(P + 2, Q).
    want = ref_cca(X, Y).sum() / min(P + 2, Q)
    assert float(S.svcca_paper_cca(dup, Y)) == pytest.approx(want, abs=2e-4)
    # svcca's own pinv/sqrt algorithm turns the float rounding of the duplicates into
    # "correlations" far above 1 (a known failure of that code); the stable kernel does not.
    assert ref_paper(dup, Y) > 1.0
    # an all-constant side gives 0 (like svcca's zero dict)
    assert float(S.mean_cca(const, Y)) == 0.0 and float(S.svcca_paper_cca(const, Y)) == 0.0
    # near-constant neurons (relative variance ~1e-14) are dropped rather than amplified
    tiny = np.concatenate([X, (5 + 1e-7 * rng.normal(size=(N, 3))).astype(np.float32)], 1)
    assert float(S.mean_cca(tiny, Y)) == pytest.approx(float(S.mean_cca(X, Y)), abs=2e-4)


def test_too_few_datapoints_raise():
    X, Y = _data(7, n=12)  # n = 12 <= q = 16
    for m in S.CCA_FAMILY:
        with pytest.raises(ValueError, match="more datapoints than neurons"):
            S.similarity(X, Y, m)
    assert np.isfinite(float(S.linear_cka(X, Y)))  # CKA is fine with n < p
    with pytest.raises(ValueError, match="same datapoints"):
        S.mean_cca(X, Y[:-1])
    with pytest.raises(ValueError, match="Unknown similarity method"):
        S.similarity(X, Y, "cca_magic")
    with pytest.raises(ValueError, match="at least 4"):
        S.debiased_cka(X[:3], Y[:3])


def test_batched_equals_looped_and_grouping():
    pairs = [_data(s) for s in range(3)]
    Xs = np.stack([p[0] for p in pairs])
    Ys = np.stack([p[1] for p in pairs])
    for m in ("paper_cca", "svcca", "pwcca", "linear_cka", "procrustes"):
        batched = np.asarray(S.similarity_batch(Xs, Ys, m))
        looped = np.array([float(S.similarity(x, y, m)) for x, y in pairs])
        np.testing.assert_allclose(batched, looped, atol=1e-5, err_msg=m)
    rho_b, k_b = S.cca_correlations_batch(Xs, Ys)
    for i, (x, y) in enumerate(pairs):
        rho, k = S.cca_correlations(x, y)
        np.testing.assert_allclose(np.asarray(rho_b[i]), np.asarray(rho), atol=1e-5)
        assert int(k_b[i]) == int(k)
    mixed = pairs + [(pairs[0][0][:, :8], pairs[0][1][:, :9])]
    got = S.similarity_many(mixed, "linear_cka")
    want = [float(S.linear_cka(x, y)) for x, y in mixed]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_every_matmul_uses_highest_precision():
    """All dot_generals in the traced kernels carry HIGHEST precision (no bf16/TF32)."""
    X, Y = _data(0, n=64, p=4, q=5)
    for m in S.METHODS:
        fn = S._highest(S._core(m, rtol=1e-4, epsilon=1e-12, keep=0.99, threshold=1.0,
                                kernel="linear"))
        jaxpr = jax.make_jaxpr(fn)(jnp.asarray(X), jnp.asarray(Y))
        dots = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
        assert dots, m
        for e in dots:
            prec = e.params["precision"]
            assert prec is not None and all(p == jax.lax.Precision.HIGHEST for p in prec), (
                m, prec)


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in jax.core.subjaxprs(e) if hasattr(jax.core, "subjaxprs") else []:
            yield from _all_eqns(sub)
        for v in e.params.values():
            if hasattr(v, "jaxpr"):
                inner = v.jaxpr if hasattr(v.jaxpr, "eqns") else v.jaxpr.jaxpr
                yield from _all_eqns(inner)


# ----------------------------------------------------------------------------- #10.8 inputs
@pytest.mark.parametrize("method", S.METHODS)
def test_nonfinite_activations_raise_with_count(method):
    """NaN/inf used to give a silent 0 for every method; now an error with the count."""
    X, Y = _data(8, n=200)
    X = X.copy()
    X[3, 1], X[7, 2], X[9, 0] = np.nan, np.inf, -np.inf
    with pytest.raises(S.NonFiniteActivationsError, match=r"X: 3 of 2400 values are NaN/inf"):
        S.similarity(X, Y, method)
    # named layers in a many-pair call: the error says which layer and which side
    with pytest.raises(ValueError, match=r"Y of conv3_block4_out: 1 of"):
        bad = Y.copy()
        bad[0, 0] = np.nan
        S.similarity_many([(np.ones((200, 4), np.float32), Y), (_data(9, n=200)[0], bad)], method,
                          labels=["conv1_relu", "conv3_block4_out"])


SCALES = (1e-30, 1e-12, 1e12, 1e18, 1e30)


@pytest.mark.parametrize("route", ["qr", "covariance"])
def test_results_invariant_to_activation_scale(route):
    """X * 1e18 vs X gave 0 instead of 1 (float32 overflow in the first product)."""
    X, Y = _data(10, n=400)
    methods = S.METHODS if route == "qr" else S.COVARIANCE_ROUTE_METHODS
    for m in methods:
        base = float(S.similarity(X, Y, m, route=route if m in
                                  S.COVARIANCE_ROUTE_METHODS else "auto"))
        assert 0.0 < base < 2.0, m
        for s in SCALES:
            kw = dict(route=route if m in S.COVARIANCE_ROUTE_METHODS else "auto")
            got_x = float(S.similarity((X * s).astype(np.float32), Y, m, **kw))
            got_y = float(S.similarity(X, (Y * s).astype(np.float32), m, **kw))
            assert got_x == pytest.approx(base, abs=1e-5), (m, s)
            assert got_y == pytest.approx(base, abs=1e-5), (m, s)
    for s in SCALES:  # self-similarity of a rescaled copy is exactly similarity 1
        Xs = (X * s).astype(np.float32)
        for m in ("mean_cca", "svcca", "linear_cka"):
            assert float(S.similarity(X, Xs, m, route=route)) == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- #15.1 routes
def _ill_conditioned(seed=11, n=3000, p=16):
    """Neurons that are near copies of each other: correlation-matrix condition ~1e6."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 4))
    X = np.repeat(base, p // 4, axis=1) + 3e-3 * rng.normal(size=(n, p))
    Y = np.tanh(base @ rng.normal(size=(4, p))) + 0.5 * rng.normal(size=(n, p))
    return X.astype(np.float32), Y.astype(np.float32)


@pytest.mark.parametrize("method", S.COVARIANCE_ROUTE_METHODS)
def test_routes_agree_with_float64_oracle(method):
    X, Y = _data(12, n=2000)
    want = numpy_similarity(X, Y, method)
    for route in ("qr", "covariance", "auto"):
        assert float(S.similarity(X, Y, method, route=route)) == pytest.approx(
            want, abs=1e-5), route


def test_covariance_route_reforms_ill_conditioned_grams_in_float64(monkeypatch):
    X, Y = _ill_conditioned()
    refined = []
    real = S._cov.covariance_from_data
    monkeypatch.setattr(S._cov, "covariance_from_data",
                        lambda *a: refined.append(1) or real(*a))
    for m in ("mean_cca", "pwcca"):
        want = numpy_similarity(X, Y, m)
        got = float(S.similarity(X, Y, m, route="covariance"))
        assert got == pytest.approx(want, abs=1e-4), m
    assert len(refined) == 2  # both took the float64 re-formation
    refined.clear()
    Xw, Yw = _data(13, n=2000)
    S.similarity(Xw, Yw, "mean_cca", route="covariance")
    assert not refined  # well conditioned: the float32 Grams are used


def test_resolve_route():
    r = S.resolve_route
    assert r("auto", "mean_cca", 10000, 512, 512, "cpu") == "covariance"
    assert r("auto", "mean_cca", 1000, 512, 512, "cpu") == "qr"  # p^3 host work dominates
    assert r("auto", "mean_cca", 10000, 512, 512, "gpu") == "qr"
    assert r("auto", "linear_cka", 60000, 512, 512, "cpu") == "qr"  # already GEMM form
    assert r("covariance", "linear_cka", 600, 512, 512, "cpu") == "covariance"
    assert r("auto", "procrustes", 10000, 8, 8, "cpu") == "qr"
    assert r("covariance", "svcca", 100, 8, 8, "tpu") == "covariance"
    with pytest.raises(ValueError, match="no covariance form"):
        r("covariance", "rbf_cka", 100, 8, 8)
    with pytest.raises(ValueError, match="route="):
        r("fast", "mean_cca", 100, 8, 8)


def test_svd_algorithm_option():
    """svd= picks the QR route's SVD: 'default' is jnp.linalg.svd (same values as without
    the option, its own compiled program); cuSOLVER's Jacobi is refused off GPU, its
    polar gesvdp everywhere."""
    X, Y = _data()
    plain = float(S.similarity(X, Y, "pwcca", route="qr"))
    assert float(S.similarity(X, Y, "pwcca", route="qr", svd="default")) == plain
    with pytest.raises(ValueError, match="runs on NVIDIA GPUs only"):
        S.similarity(X, Y, "mean_cca", svd="jacobi")
    with pytest.raises(ValueError, match="choose one of"):
        S.similarity(X, Y, "mean_cca", svd="gesvd")
    S.check_svd_algorithm("jacobi", backend="gpu")   # allowed where cuSOLVER is
    # gesvdp is wrong on rank-deficient matrices (measured on an H200): refused everywhere,
    # with the reason
    with pytest.raises(ValueError, match="gesvdp.*SVCCA 1.0.*use svd='jacobi'"):
        S.check_svd_algorithm("polar", backend="gpu")
    # The algorithm reaches the SVD calls traced inside the kernel (traced, not lowered:
    # XLA:CPU cannot lower it), and tracing leaves the default in place afterwards.
    jaxpr = str(jax.make_jaxpr(S._with_svd(lambda a: S._basis(a, 1e-4)[1], "jacobi"))(X))
    assert "algorithm=SvdAlgorithm.JACOBI" in jaxpr
    assert "JACOBI" not in str(jax.make_jaxpr(lambda a: S._basis(a, 1e-4)[1])(X))
    assert S._SVD_ALGORITHM.get() == "default"


@pytest.mark.parametrize("route", ["qr", "covariance"])
def test_paper_cca_keeps_the_near_collinear_channels_of_a_grey_image_conv1(route):
    """A conv1 on grey images replicated to RGB: 64 channels from 49-pixel patches, most
    never clipped by the ReLU, so the activations are nearly collinear (singular values
    down to ~1e-5 of the top). svcca (float64, epsilon 1e-12) keeps their correlations; a
    float32 rank cut at 1e-4 set them to 0 and read 0.75 where svcca reads 0.82."""
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(1)
    img = gaussian_filter(rng.standard_normal((3, 230, 230)), (0, 2, 2)) * 40 + 120
    patches = np.lib.stride_tricks.sliding_window_view(img, (7, 7), axis=(1, 2))
    P = patches[:, ::2, ::2].reshape(-1, 49)
    P = P[rng.choice(len(P), 10000, replace=False)]

    def layer(seed, always_on=40):
        W = np.random.default_rng(seed).standard_normal((49, 64)) * 0.05
        pre = P @ W
        b = -pre.mean(0) + np.where(np.arange(64) < always_on, 6 * pre.std(0), 0.0)
        return np.maximum(pre + b, 0).astype(np.float32)

    X, Y = layer(10), layer(20)
    want = ref_paper(X, Y)
    got = float(S.similarity(X, Y, "paper_cca", route=route))
    assert got == pytest.approx(want, abs=2e-3), (got, want)
