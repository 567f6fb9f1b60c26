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

from medtransfer_jax.errors import TooFewDatapoints

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


def covariance_from_data(X, Y, *, chunk: int = 16384) -> Covariances:
    """Float64 covariances of in-memory X (n, p), Y (n, q), two passes over row chunks
    (so no float64 copy of the data is ever held: 200k x 2048 needs O(p^2) extra)."""
    X, Y = np.asarray(X), np.asarray(Y)
    n, p, q = X.shape[0], X.shape[1], Y.shape[1]
    mx = sum(X[s:s + chunk].sum(0, dtype=np.float64) for s in range(0, n, chunk)) / n
    my = sum(Y[s:s + chunk].sum(0, dtype=np.float64) for s in range(0, n, chunk)) / n
    sxx, syy, sxy = np.zeros((p, p)), np.zeros((q, q)), np.zeros((p, q))
    for s in range(0, n, chunk):
        a = X[s:s + chunk].astype(np.float64) - mx
        b = Y[s:s + chunk].astype(np.float64) - my
        sxx += a.T @ a
        syy += b.T @ b
        sxy += a.T @ b
    return Covariances(n, mx, my, sxx / (n - 1), syy / (n - 1), sxy / (n - 1))


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


class Side(NamedTuple):
    """One layer's part of a CCA, computed once and reused for every pair it is in:
    kept neurons, their standard deviations ``d``, the equilibrated correlation matrix
    ``r`` and its whitener ``w`` (kept, k), and the kept eigenvalue ratio."""
    kept: np.ndarray
    d: np.ndarray
    r: np.ndarray
    w: np.ndarray
    condition: float


def cca_side(sxx: np.ndarray, *, rtol: float = 1e-3, epsilon: Optional[float] = None) -> Side:
    """Prunes neurons with variance < ``epsilon`` (default ``rtol^2``) x the largest,
    equilibrates the rest and whitens with eigenvalues below rtol^2 lambda_max dropped."""
    eps = rtol ** 2 if epsilon is None else epsilon
    kept = _kept(np.diag(sxx), eps)
    d = np.sqrt(np.diag(sxx)[kept])
    r = sxx[np.ix_(kept, kept)] / np.outer(d, d)
    w, cond = _whitener(r, rtol)
    return Side(kept, d, r, w, cond)


def svcca_side(sxx: np.ndarray, *, keep: float = 0.99, rtol: float = 1e-3):
    """SVCCA's reduction of one side: whitener (p, d) onto the leading eigen-directions of
    the (raw-scale) covariance explaining ``keep`` of the variance; and their ratio."""
    lam, V = np.linalg.eigh(sxx)
    lam, V = np.maximum(lam[::-1], 0.0), V[:, ::-1]
    if not lam.size or lam[0] <= 0:
        return np.zeros((sxx.shape[0], 0)), 1.0
    frac = np.cumsum(lam) / lam.sum()
    d = int(np.sum(frac < keep)) + 1
    ok = (np.arange(lam.size) < d) & (lam > rtol ** 2 * lam[0])
    return V[:, ok] / np.sqrt(lam[ok]), float(lam[0] / lam[ok][-1])


def correlations(sx: Side, sy: Side, sxy: np.ndarray, m: int, *, directions: bool = False):
    """Canonical correlations (m,) (zeros beyond k) of two sides with cross-covariance
    ``sxy`` (all neurons); returns (rho, k, u) with u (kx, k) X's directions or None."""
    rxy = sxy[np.ix_(sx.kept, sy.kept)] / np.outer(sx.d, sy.d)
    rho = np.zeros(m)
    k = min(sx.w.shape[1], sy.w.shape[1])
    u = np.zeros((sx.w.shape[1], 0)) if directions else None
    if k > 0:
        M = sx.w.T @ rxy @ sy.w
        if directions:
            u, s, _ = np.linalg.svd(M, full_matrices=False)
            u = u[:, :k]
        else:
            s = np.linalg.svd(M, compute_uv=False)
        rho[:k] = np.clip(s[:k], 0.0, 1.0)
    return rho, k, u


def cca_from_covariance(cov: Covariances, *, rtol: float = 1e-3,
                        epsilon: Optional[float] = None, directions: bool = False
                        ) -> CCAResult:
    """Canonical correlations from covariance blocks (float64, host).

    Neurons whose variance is below ``epsilon`` (default ``rtol^2``) x the side's largest
    are dropped (svcca's pruning); the kept block is equilibrated to a correlation matrix
    and whitened by eigh with eigenvalues below ``rtol^2 * lambda_max`` dropped.
    """
    sx = cca_side(cov.sxx, rtol=rtol, epsilon=epsilon)
    sy = cca_side(cov.syy, rtol=rtol, epsilon=epsilon)
    m = min(cov.sxx.shape[0], cov.syy.shape[0])
    rho, k, u = correlations(sx, sy, cov.sxy, m, directions=directions)
    return CCAResult(rho, k, sx.kept, sy.kept, sx.w, u, sx.d,
                     max(sx.condition, sy.condition))


def pair_value(method: str, sx, sy, sxy: np.ndarray) -> float:
    """``method`` for one pair from per-layer sides (:func:`cca_side` results, or
    :func:`svcca_side` results for svcca) and the raw cross-covariance ``sxy``."""
    if method == "svcca":
        (wx, _), (wy, _) = sx, sy
        k = min(wx.shape[1], wy.shape[1])
        if k == 0:
            return 0.0
        s = np.linalg.svd(wx.T @ sxy @ wy, compute_uv=False)
        return float(np.clip(s[:k], 0, 1).sum() / k)
    m = min(sx.kept.size, sy.kept.size)
    rho, k, u = correlations(sx, sy, sxy, m, directions=method == "pwcca")
    if method == "mean_cca":
        return float(rho.sum() / k) if k else 0.0
    if method == "paper_cca":
        count = min(sx.kept.sum(), sy.kept.sum())
        return float(rho.sum() / count) if count else 0.0
    if method != "pwcca":
        raise ValueError(f"pair_value: {method!r} is not a CCA-family method.")
    # pwcca: the unit canonical variate h_i = Xc a_i has <h_i, x_j> proportional to
    # (Sxx a_i)_j; in the equilibrated basis a_i = D^-1 w u_i, so Sxx a_i = D Rxx w u_i.
    if k == 0:
        return 0.0
    alpha = np.abs(sx.d[:, None] * (sx.r @ sx.w @ u)).sum(axis=0)
    total = alpha.sum()
    return float(np.sum(alpha * rho[:k]) / total) if total > 0 else 0.0


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
        raise TooFewDatapoints(f"{method} needs more datapoints than neurons, got n={cov.n} for "
                         f"p={p} / q={q} neurons. Stream more batches or subsample channels.")
    value, condition = _finish(cov, method, rtol, epsilon, keep)
    return (value, condition) if return_condition else value




def _finish(cov, method, rtol, epsilon, keep):
    if method == "linear_cka":
        den = np.linalg.norm(cov.sxx) * np.linalg.norm(cov.syy)
        return (float(np.sum(cov.sxy ** 2) / den) if den > 0 else 0.0), 1.0
    if method == "svcca":
        sx = svcca_side(cov.sxx, keep=keep, rtol=rtol)
        sy = svcca_side(cov.syy, keep=keep, rtol=rtol)
        return pair_value(method, sx, sy, cov.sxy), max(sx[1], sy[1])
    eps = epsilon if method == "paper_cca" else None
    sx = cca_side(cov.sxx, rtol=rtol, epsilon=eps)
    sy = cca_side(cov.syy, rtol=rtol, epsilon=eps)
    return pair_value(method, sx, sy, cov.sxy), max(sx.condition, sy.condition)
