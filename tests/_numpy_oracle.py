"""Independent float64 NumPy references for the similarity kernels (tests only).

Written from the textbook formulas, not from the library's code paths: CCA as the
singular values of Sxx^-1/2 Sxy Syy^-1/2 on float64 data, SVCCA by an SVD of the data,
PWCCA with explicit canonical variates, CKA / HSIC from n x n Gram matrices, Procrustes
by solving the orthogonal problem. Suitable for small n (the Gram forms are O(n^2)).
It lives in tests/ because it is a test oracle; the benchmark's NumPy competitor (the
google/svcca algorithm) is medtransfer_jax/bench/similarity.py.
"""
import numpy as np


def _inv_sqrt(A):
    w, V = np.linalg.eigh(A)
    return V @ np.diag(w ** -0.5) @ V.T


def ref_cca(X, Y):
    """Textbook: singular values of Sxx^-1/2 Sxy Syy^-1/2 (float64)."""
    X = np.asarray(X, np.float64) - np.mean(X, 0)
    Y = np.asarray(Y, np.float64) - np.mean(Y, 0)
    M = _inv_sqrt(X.T @ X) @ (X.T @ Y) @ _inv_sqrt(Y.T @ Y)
    return np.linalg.svd(M, compute_uv=False)


def ref_svcca(X, Y, keep=0.99):
    def reduce(A):
        A = np.asarray(A, np.float64) - np.mean(A, 0)
        U, s, _ = np.linalg.svd(A, full_matrices=False)
        frac = np.cumsum(s ** 2) / np.sum(s ** 2)
        d = int(np.searchsorted(frac, keep) + 1)
        return U[:, :d] * s[:d]
    rx, ry = reduce(X), reduce(Y)
    return ref_cca(rx, ry).mean()


def ref_pwcca(X, Y):
    X = np.asarray(X, np.float64) - np.mean(X, 0)
    Y = np.asarray(Y, np.float64) - np.mean(Y, 0)
    Wx, Wy = _inv_sqrt(X.T @ X), _inv_sqrt(Y.T @ Y)
    u, rho, _ = np.linalg.svd(Wx @ X.T @ Y @ Wy)
    m = min(X.shape[1], Y.shape[1])
    H = X @ Wx @ u[:, :m]
    H /= np.linalg.norm(H, axis=0)
    alpha = np.abs(H.T @ X).sum(1)
    return np.sum(alpha / alpha.sum() * rho[:m])


def ref_paper(X, Y, eps=1e-12):
    """google/svcca get_cca_similarity covariance algorithm, re-implemented in float64."""
    A, B = np.asarray(X, np.float64).T, np.asarray(Y, np.float64).T
    nx = A.shape[0]
    cov = np.cov(A, B)
    sxx, sxy, syy = cov[:nx, :nx], cov[:nx, nx:], cov[nx:, nx:]
    xm, ym = np.abs(sxx).max(), np.abs(syy).max()
    sxx, syy, sxy = sxx / xm, syy / ym, sxy / np.sqrt(xm * ym)
    ix, iy = np.diag(sxx) >= eps, np.diag(syy) >= eps
    sxx, syy, sxy = sxx[ix][:, ix], syy[iy][:, iy], sxy[ix][:, iy]
    sxx = sxx + eps * np.eye(len(sxx))
    syy = syy + eps * np.eye(len(syy))

    def isqrt(a):
        w, v = np.linalg.eigh(np.linalg.pinv(a))
        return v @ np.diag(np.sqrt(np.maximum(w, 0))) @ v.T
    s = np.linalg.svd(isqrt(sxx) @ sxy @ isqrt(syy), compute_uv=False)
    return np.mean(np.abs(s))


def _H(n):
    return np.eye(n) - np.ones((n, n)) / n


def ref_cka_from_grams(K, L):
    H = _H(K.shape[0])
    hsic = lambda a, b: np.trace(a @ H @ b @ H)  # noqa: E731
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def ref_rbf(X, threshold=1.0):
    X = np.asarray(X, np.float64)
    D = np.sum((X[:, None, :] - X[None, :, :]) ** 2, -1)
    return np.exp(-D / (2 * threshold ** 2 * np.median(D)))


def ref_hsic_unbiased(K, L):
    """Song et al. (2012), eq. 5."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))


def ref_debiased_cka(K, L):
    return ref_hsic_unbiased(K, L) / np.sqrt(ref_hsic_unbiased(K, K) * ref_hsic_unbiased(L, L))


def ref_procrustes(X, Y):
    """Solve min_R ||X R - Y|| over orthogonal R explicitly and return the residual."""
    X = np.asarray(X, np.float64) - np.mean(X, 0)
    Y = np.asarray(Y, np.float64) - np.mean(Y, 0)
    X, Y = X / np.linalg.norm(X), Y / np.linalg.norm(Y)
    p, q = X.shape[1], Y.shape[1]
    d = max(p, q)
    X = np.pad(X, ((0, 0), (0, d - p)))
    Y = np.pad(Y, ((0, 0), (0, d - q)))
    U, _, Vt = np.linalg.svd(X.T @ Y)
    return np.sum((X @ U @ Vt - Y) ** 2)




def numpy_similarity(X, Y, method):
    """float64 reference value of ``method`` (a similarity.METHODS name) for X (n, p), Y (n, q)."""
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    if method == "mean_cca":
        return float(ref_cca(X, Y).mean())
    if method == "paper_cca":
        return float(ref_paper(X, Y))
    if method == "svcca":
        return float(ref_svcca(X, Y))
    if method == "pwcca":
        return float(ref_pwcca(X, Y))
    if method == "linear_cka":
        return float(ref_cka_from_grams(Xc @ Xc.T, Yc @ Yc.T))
    if method == "debiased_cka":
        return float(ref_debiased_cka(Xc @ Xc.T, Yc @ Yc.T))
    if method == "rbf_cka":
        return float(ref_cka_from_grams(ref_rbf(X), ref_rbf(Y)))
    if method == "procrustes":
        return float(ref_procrustes(X, Y))
    raise ValueError(f"no reference for {method!r}")
