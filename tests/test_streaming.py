"""Streaming accumulators equal one-shot computations on the same data.

Tolerances: covariance blocks 1e-6 relative (float32 Chan/Kahan accumulation vs float64);
finished similarities vs one-shot float32 kernels 2e-4; minibatch CKA vs float64 per-batch
HSIC reference 1e-4.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from medtransfer_jax.analysis import similarity as S
from medtransfer_jax.analysis import streaming as St


def _data(seed=0, n=3000, p=10, q=14, offset=40.0):
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, 4))
    X = Z @ rng.normal(size=(4, p)) + 0.5 * rng.normal(size=(n, p)) + offset
    Y = np.maximum(Z @ rng.normal(size=(4, q)) + rng.normal(size=(n, q)), 0) - offset / 2
    X[:, 0] *= 30.0  # badly scaled neuron
    return X.astype(np.float32), Y.astype(np.float32)


def _stream(X, Y, batch=256, pad_to=None):
    st = St.init_covariance(X.shape[1], Y.shape[1])
    for i in range(0, X.shape[0], batch):
        x, y = X[i:i + batch], Y[i:i + batch]
        mask = np.ones(len(x), np.float32)
        if pad_to and len(x) < pad_to:  # padded final batch: garbage rows, masked out
            k = pad_to - len(x)
            x = np.concatenate([x, np.full((k, x.shape[1]), 1e4, np.float32)])
            y = np.concatenate([y, np.full((k, y.shape[1]), -1e4, np.float32)])
            mask = np.concatenate([mask, np.zeros(k, np.float32)])
        st = St.update_covariance(st, x, y, mask)
    return st


def test_streaming_covariance_matches_float64():
    X, Y = _data()
    cov = St.finish_covariance(_stream(X, Y, batch=250, pad_to=250))
    ref = St.covariance_from_data(X, Y)
    assert cov.n == X.shape[0]
    np.testing.assert_allclose(cov.mean_x, ref.mean_x, rtol=1e-6)
    for a, b in ((cov.sxx, ref.sxx), (cov.syy, ref.syy), (cov.sxy, ref.sxy)):
        np.testing.assert_allclose(a, b, atol=2e-6 * np.abs(b).max())
    # also against np.cov directly
    full = np.cov(X.astype(np.float64).T, Y.astype(np.float64).T)
    np.testing.assert_allclose(cov.sxy, full[:10, 10:], atol=2e-6 * np.abs(full).max())


def test_uneven_batches_and_mask_equal_one_batch():
    X, Y = _data(1, n=1000)
    a = St.finish_covariance(_stream(X, Y, batch=333, pad_to=333))
    b = St.finish_covariance(_stream(X, Y, batch=1000))
    np.testing.assert_allclose(a.sxx, b.sxx, atol=1e-6 * np.abs(b.sxx).max())
    np.testing.assert_allclose(a.sxy, b.sxy, atol=1e-6 * np.abs(b.sxy).max())


@pytest.mark.parametrize("method", St.COVARIANCE_METHODS)
def test_streamed_similarity_equals_one_shot(method):
    X, Y = _data(2)
    cov = St.finish_covariance(_stream(X, Y, batch=500))
    streamed = St.similarity_from_covariance(cov, method)
    one_shot = float(S.similarity(X, Y, method))
    assert streamed == pytest.approx(one_shot, abs=2e-4)


def test_covariance_cca_handles_rank_deficiency():
    X, Y = _data(3)
    dup = np.concatenate([X, X[:, 1:3] * 2 + 1, np.full((X.shape[0], 1), 3.0, np.float32)], 1)
    cov = St.finish_covariance(_stream(dup, Y, batch=1000))
    rho, k, *_ = St.cca_from_covariance(cov)
    assert k == X.shape[1] and np.all(np.isfinite(rho)) and rho.max() <= 1.0
    assert St.similarity_from_covariance(cov, "mean_cca") == pytest.approx(
        float(S.mean_cca(X, Y)), abs=2e-4)
    assert St.similarity_from_covariance(cov, "paper_cca") == pytest.approx(
        float(S.svcca_paper_cca(dup, Y)), abs=2e-4)
    with pytest.raises(ValueError, match="more datapoints than neurons"):
        St.similarity_from_covariance(St.covariance_from_data(X[:5], Y[:5]), "mean_cca")


def _song_hsic(K, L):
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (np.trace(K @ L) + one @ K @ one * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))


def _rbf(X, t):
    D = np.sum((X[:, None] - X[None]) ** 2, -1)
    return np.exp(-D / (2 * t * t * np.median(D)))


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_minibatch_cka_matches_reference(kernel):
    X, Y = _data(4, n=240, offset=3.0)
    b = 60
    st = St.init_minibatch_cka()
    sums = np.zeros(3)
    for i in range(0, 240, b):
        x, y = X[i:i + b], Y[i:i + b]
        # pad each batch with 4 garbage rows that the mask removes
        xp = np.concatenate([x, np.full((4, x.shape[1]), 7.0, np.float32)])
        yp = np.concatenate([y, np.full((4, y.shape[1]), -7.0, np.float32)])
        m = np.r_[np.ones(b), np.zeros(4)].astype(np.float32)
        st = St.update_minibatch_cka(st, xp, yp, m, kernel=kernel, threshold=0.8)
        xd, yd = x.astype(np.float64), y.astype(np.float64)
        K = xd @ xd.T if kernel == "linear" else _rbf(xd, 0.8)
        L = yd @ yd.T if kernel == "linear" else _rbf(yd, 0.8)
        sums += [_song_hsic(K, L), _song_hsic(K, K), _song_hsic(L, L)]
    want = sums[0] / np.sqrt(sums[1] * sums[2])
    assert St.finish_minibatch_cka(st) == pytest.approx(want, abs=1e-4)
    assert int(st.batches) == 4


def test_minibatch_cka_one_batch_is_debiased_cka():
    X, Y = _data(5, n=200)
    st = St.update_minibatch_cka(St.init_minibatch_cka(), X, Y)
    assert St.finish_minibatch_cka(st) == pytest.approx(float(S.debiased_cka(X, Y)), abs=1e-4)


def test_streaming_similarity_many_layers():
    X1, Y1 = _data(6, n=1200)
    X2, Y2 = _data(7, n=1200, p=6, q=6)
    acc = St.StreamingSimilarity({"a": (10, 14), "b": (6, 6)},
                                 methods=("mean_cca", "linear_cka", "debiased_cka"))
    for i in range(0, 1200, 400):
        sl = slice(i, i + 400)
        acc.update({"a": X1[sl], "b": X2[sl]}, {"a": Y1[sl], "b": Y2[sl]})
    out = acc.finish()
    assert out["a"]["datapoints"] == 1200
    assert out["a"]["mean_cca"] == pytest.approx(float(S.mean_cca(X1, Y1)), abs=2e-4)
    assert out["b"]["linear_cka"] == pytest.approx(float(S.linear_cka(X2, Y2)), abs=2e-4)
    per_batch = [float(S.debiased_cka(X2[i:i + 400], Y2[i:i + 400])) for i in (0, 400, 800)]
    assert min(per_batch) - 0.05 <= out["b"]["debiased_cka"] <= max(per_batch) + 0.05


def test_streaming_errors():
    st = St.init_covariance(3, 4)
    with pytest.raises(ValueError, match="p=3"):
        St.update_covariance(st, jnp.ones((5, 2)), jnp.ones((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        St.finish_covariance(st)
    with pytest.raises(ValueError, match="cannot be finished"):
        St.similarity_from_covariance(St.covariance_from_data(np.ones((9, 2)), np.ones((9, 2))),
                                      "rbf_cka")
    with pytest.raises(ValueError, match="cannot be streamed"):
        St.StreamingSimilarity({"a": (2, 2)}, methods=("procrustes",))


def test_streaming_rejects_nonfinite_naming_layer_and_count():
    X, Y = _data(8, n=600)
    X = X.copy()
    X[5, 0], X[10, 3] = np.nan, np.inf
    acc = St.StreamingSimilarity({"conv4_block6_out": (10, 14)},
                                 methods=("mean_cca", "debiased_cka"))
    for i in range(0, 600, 200):
        acc.update({"conv4_block6_out": X[i:i + 200]}, {"conv4_block6_out": Y[i:i + 200]})
    with pytest.raises(S.NonFiniteActivationsError, match="X of conv4_block6_out: 2 NaN/inf"):
        acc.finish()
    # a NaN in a masked (padding) row is not counted and does not matter
    mask = np.r_[np.ones(5), 0.0].astype(np.float32)  # row 5 holds the NaN
    assert int(St.update_covariance(St.init_covariance(10, 14), X[:6], Y[:6], mask).bad_x) == 0
    assert int(St.update_covariance(St.init_covariance(10, 14), X[:6], Y[:6]).bad_x) == 1


@pytest.mark.parametrize("scale", [1e-30, 1e-15, 1e15, 1e30])
def test_streaming_invariant_to_activation_scale(scale):
    X, Y = _data(9, n=1200)
    Xs = (X.astype(np.float64) * scale).astype(np.float32)
    for methods in (St.COVARIANCE_METHODS, ("debiased_cka",)):
        vals = []
        for x in (X, Xs):
            acc = St.StreamingSimilarity({"l": (10, 14)}, methods=methods)
            for i in range(0, 1200, 300):
                acc.update({"l": x[i:i + 300]}, {"l": Y[i:i + 300]})
            vals.append(acc.finish()["l"])
        for m in methods:
            assert np.isfinite(vals[0][m]) and vals[0][m] > 0.05, m
            assert vals[1][m] == pytest.approx(vals[0][m], abs=1e-5), (m, scale)


def test_covariance_from_data_chunked_equals_np_cov():
    X, Y = _data(10, n=1000)
    full = np.cov(X.astype(np.float64).T, Y.astype(np.float64).T)
    for chunk in (37, 10 ** 6):
        c = St.covariance_from_data(X, Y, chunk=chunk)
        np.testing.assert_allclose(c.sxx, full[:10, :10], rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(c.sxy, full[:10, 10:], rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(c.mean_y, Y.astype(np.float64).mean(0), rtol=1e-12)
