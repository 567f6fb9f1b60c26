"""CCA family and linear CKA finished from covariance blocks, in float64 on the host.

Two routes end here: the in-memory *covariance route* of :mod:`similarity` (one GEMM per
block on the device, this small p x p problem in float64) and the streamed statistics of
:mod:`streaming`. Keeping one finisher means both give the same numbers by construction.

Why it is written this way:

* **Equilibration.** CCA is invariant to the scale of each neuron, so each side's
  covariance is turned into a correlation matrix ``R = D^-1 S D^-1`` before it is
  whitened. The eigenvalue floor (``rtol^2 * lambda_max``) is then a statement about
  linear dependence, not about which neuron happens to have the largest units; a neuron
  with 1e-3 of another's standard deviation is as much a neuron as any.
* **Eigen-flooring instead of inverses.** Each side is whitened by ``eigh`` and directions
  below the floor are dropped, so rank-deficient inputs (duplicate or constant neurons)
  give finite values, never ``sqrt`` of a negative eigenvalue.
* **Conditioning is reported** (:attr:`CCAResult.condition`, the largest kept
  ``lambda_max / lambda_min`` of the two correlation matrices): a caller that formed the
  blocks in float32 uses it to decide whether the float32 error (~1e-7 x sqrt-ish(n) on
  each entry, amplified by the condition) is acceptable or the blocks must be re-formed
  in float64 (similarity.py's ``route='auto'`` does exactly that).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import numpy as np

COVARIANCE_METHODS = ("mean_cca", "paper_cca", "svcca", "pwcca", "linear_cka")


@dataclasses.dataclass
class Covariances:
    """Finished float64 statistics: ``n`` datapoints, means, and covariance blocks
    ``sxx`` (p, p), ``syy`` (q, q), ``sxy`` (p, q) (divided by n - 1, like ``np.cov``)."""
    n: int
    mean_x: np.ndarray
    mean_y: np.ndarray
    sxx: np.ndarray
    syy: np.ndarray
    sxy: np.ndarray


def covariance_from_data(X, Y) -> Covariances:
    """Float64 covariances of in-memory X (n, p), Y (n, q) (for tests and small data)."""
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    n = X.shape[0]
    return Covariances(n, X.mean(0), Y.mean(0), Xc.T @ Xc / (n - 1), Yc.T @ Yc / (n - 1),
                       Xc.T @ Yc / (n - 1))


class CCAResult(NamedTuple):
    """Canonical correlations from covariances.

    rho (min(p, q),) descending, zeros beyond ``k``; kept_x / kept_y: neurons kept by the
    variance cut; wx (kept_x, r): whitener of X's kept neurons in the *equilibrated*
    basis; u (r, k): X's canonical directions (None unless asked for); dx: X's kept
    neurons' standard deviations; condition: worst kept lambda_max / lambda_min.
    """
    rho: np.ndarray
    k: int
    kept_x: np.ndarray
    kept_y: np.ndarray
    wx: np.ndarray
    u: Optional[np.ndarray]
    dx: np.ndarray
    condition: float


def _whitener(r: np.ndarray, rtol: float):
    """W (p, k) with W^T r W = I on eigen-directions above rtol^2 * lambda_max; and the
    kept lambda_max / lambda_min (1 when nothing is kept)."""
    lam, V = np.linalg.eigh(r)
    lam, V = lam[::-1], V[:, ::-1]
    if not lam.size or lam[0] <= 0:
        return np.zeros((r.shape[0], 0)), 1.0
    ok = lam > (rtol ** 2) * lam[0]
    return V[:, ok] / np.sqrt(lam[ok]), float(lam[0] / lam[ok][-1])


def _kept(var: np.ndarray, rel_tol: float) -> np.ndarray:
    top = var.max() if var.size else 0.0
    return (var > rel_tol * max(top, 0.0)) & (var > 0)


def cca_from_covariance(cov: Covariances, *, rtol: float = 1e-3,
                        epsilon: Optional[float] = None, directions: bool = False
                        ) -> CCAResult:
    """Canonical correlations from covariance blocks (float64, host).

    Neurons whose variance is below ``epsilon`` (default ``rtol^2``) x the side's largest
    are dropped (svcca's pruning); the kept block is equilibrated to a correlation matrix
    and whitened by eigh with eigenvalues below ``rtol^2 * lambda_max`` dropped.
    """
    eps = rtol ** 2 if epsilon is None else epsilon
    kx, ky = _kept(np.diag(cov.sxx), eps), _kept(np.diag(cov.syy), eps)
    dx, dy = np.sqrt(np.diag(cov.sxx)[kx]), np.sqrt(np.diag(cov.syy)[ky])
    rxx = cov.sxx[np.ix_(kx, kx)] / np.outer(dx, dx)
    ryy = cov.syy[np.ix_(ky, ky)] / np.outer(dy, dy)
    rxy = cov.sxy[np.ix_(kx, ky)] / np.outer(dx, dy)
    wx, cx = _whitener(rxx, rtol)
    wy, cy = _whitener(ryy, rtol)
    m = min(cov.sxx.shape[0], cov.syy.shape[0])
    rho = np.zeros(m)
    k = min(wx.shape[1], wy.shape[1])
    u = np.zeros((wx.shape[1], 0)) if directions else None
    if k > 0:
        M = wx.T @ rxy @ wy
        if directions:
            u, s, _ = np.linalg.svd(M, full_matrices=False)
            u = u[:, :k]
        else:
            s = np.linalg.svd(M, compute_uv=False)
        rho[:k] = np.clip(s[:k], 0.0, 1.0)
    return CCAResult(rho, k, kx, ky, wx, u, dx, max(cx, cy))


def _svcca_from_covariance(cov: Covariances, keep: float, rtol: float):
    """SVCCA: each side reduced to the leading eigen-directions of its (raw-scale)
    covariance that explain ``keep`` of the variance, then CCA of the reduced sides."""
    def reduce(s):
        lam, V = np.linalg.eigh(s)
        lam, V = np.maximum(lam[::-1], 0.0), V[:, ::-1]
        if not lam.size or lam[0] <= 0:
            return np.zeros((s.shape[0], 0)), 1.0
        frac = np.cumsum(lam) / lam.sum()
        d = int(np.sum(frac < keep)) + 1
        ok = (np.arange(lam.size) < d) & (lam > rtol ** 2 * lam[0])
        return V[:, ok] / np.sqrt(lam[ok]), float(lam[0] / lam[ok][-1])

    (wx, cx), (wy, cy) = reduce(cov.sxx), reduce(cov.syy)
    k = min(wx.shape[1], wy.shape[1])
    if k == 0:
        return 0.0, max(cx, cy)
    s = np.linalg.svd(wx.T @ cov.sxy @ wy, compute_uv=False)
    return float(np.clip(s[:k], 0, 1).sum() / k), max(cx, cy)


def similarity_from_covariance(cov: Covariances, method: str = "mean_cca", *,
                               rtol: float = 1e-3, epsilon: float = 1e-12,
                               keep: float = 0.99, return_condition: bool = False):
    """One of :data:`COVARIANCE_METHODS` from finished covariances (float64 result).

    ``return_condition=True`` returns ``(value, condition)``, the condition being the
    worst kept eigenvalue ratio of the matrices that were whitened (1 for linear CKA).
    """
    if method not in COVARIANCE_METHODS:
        raise ValueError(f"{method!r} cannot be finished from covariances; choose one of "
                         f"{COVARIANCE_METHODS} (or use MinibatchCKA for debiased CKA).")
    p, q = cov.sxx.shape[0], cov.syy.shape[0]
    if method != "linear_cka" and cov.n <= max(p, q):
        raise ValueError(f"{method} needs more datapoints than neurons, got n={cov.n} for "
                         f"p={p} / q={q} neurons. Stream more batches or subsample channels.")
    value, condition = _finish(cov, method, rtol, epsilon, keep)
    return (value, condition) if return_condition else value


def _finish(cov, method, rtol, epsilon, keep):
    if method == "linear_cka":
        den = np.linalg.norm(cov.sxx) * np.linalg.norm(cov.syy)
        return (float(np.sum(cov.sxy ** 2) / den) if den > 0 else 0.0), 1.0
    if method == "svcca":
        return _svcca_from_covariance(cov, keep, rtol)
    if method == "mean_cca":
        r = cca_from_covariance(cov, rtol=rtol)
        return (float(r.rho.sum() / r.k) if r.k else 0.0), r.condition
    if method == "paper_cca":
        r = cca_from_covariance(cov, rtol=rtol, epsilon=epsilon)
        count = min(r.kept_x.sum(), r.kept_y.sum())
        return (float(r.rho.sum() / count) if count else 0.0), r.condition
    # pwcca: the unit canonical variate h_i = Xc a_i has <h_i, x_j> proportional to
    # (Sxx a_i)_j; in the equilibrated basis a_i = D^-1 wx u_i, so Sxx a_i = D Rxx wx u_i.
    r = cca_from_covariance(cov, rtol=rtol, directions=True)
    if r.k == 0:
        return 0.0, r.condition
    kx = r.kept_x
    rxx = cov.sxx[np.ix_(kx, kx)] / np.outer(r.dx, r.dx)
    alpha = np.abs(r.dx[:, None] * (rxx @ r.wx @ r.u)).sum(axis=0)
    total = alpha.sum()
    return (float(np.sum(alpha * r.rho[:r.k]) / total) if total > 0 else 0.0), r.condition
