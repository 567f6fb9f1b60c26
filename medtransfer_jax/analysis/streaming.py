"""Streaming (batch-by-batch) similarity statistics, for N far beyond memory.

Two accumulators, both pure pytrees updated under ``jit`` on the device that holds the
activations, so the activations of 100k+ positions never need to exist at once:

* :class:`CovarianceState`: count, means and the **centred** co-moment blocks
  ``Cxx = sum (x - mean_x)(x - mean_x)^T``, ``Cyy``, ``Cxy`` for X (b, p) / Y (b, q).
  Batches are merged with Chan et al.'s pairwise update (each batch is centred on its own
  mean first, so no ``E[xx^T] - mean mean^T`` cancellation), and the co-moments are added
  with Kahan compensation, so float32 error does not grow with the number of batches.
  Finishing happens on the host in float64 (:func:`finish_covariance`) and gives mean CCA,
  the paper's CCA, SVCCA, PWCCA and linear CKA from the covariance blocks. CCA from
  covariances whitens each side by ``eigh`` with **eigenvalue flooring**: eigen-directions
  below ``rtol^2 * lambda_max`` are dropped instead of inverted (a float32-accumulated
  covariance resolves eigenvalues down to ~1e-6 of the largest; default ``rtol=1e-3``).
  Memory: O((p + q)^2) per layer pair; cost O(b (p + q)^2) per batch.
* :class:`MinibatchCKAState` (Nguyen et al. 2021 "minibatch CKA"): sums of the unbiased
  HSIC (Song et al.) of every batch; CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K) *
  mean HSIC(L, L)). Linear kernel in feature space (O(b p q)) or RBF (b x b Gram). It
  converges to the population CKA as the number of batches grows, but is a different
  estimator from one-shot CKA on all N points (exactly equal to debiased CKA for one
  batch).

``mask`` (b,) marks valid rows (the evaluation pipeline pads its last batch with weight
0); masked rows contribute nothing.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from medtransfer_jax.analysis import similarity as _sim

_mm = _sim._mm
_highest = _sim._highest

COVARIANCE_METHODS = ("mean_cca", "paper_cca", "svcca", "pwcca", "linear_cka")
DEFAULT_STREAMING_RTOL = 1e-3


# ----------------------------------------------------------------------------- covariance
class CovarianceState(NamedTuple):
    """Running statistics of a (X, Y) stream. All float32 except ``count`` (int32)."""
    count: jax.Array
    mean_x: jax.Array
    mean_y: jax.Array
    cxx: jax.Array
    cyy: jax.Array
    cxy: jax.Array
    comp_xx: jax.Array  # Kahan compensation terms
    comp_yy: jax.Array
    comp_xy: jax.Array


def init_covariance(p: int, q: int, dtype=jnp.float32) -> CovarianceState:
    """Empty statistics for X with p neurons and Y with q neurons."""
    z = lambda *s: jnp.zeros(s, dtype)  # noqa: E731
    return CovarianceState(jnp.zeros((), jnp.int32), z(p), z(q), z(p, p), z(q, q), z(p, q),
                           z(p, p), z(q, q), z(p, q))


def _kahan_add(total, comp, term):
    y = term - comp
    t = total + y
    return t, (t - total) - y


def _update_covariance(state: CovarianceState, x, y, mask) -> CovarianceState:
    dt = state.cxx.dtype
    x = jnp.asarray(x, dt)
    y = jnp.asarray(y, dt)
    m = jnp.ones((x.shape[0],), dt) if mask is None else jnp.asarray(mask, dt)
    nb = jnp.sum(m)
    safe_nb = jnp.maximum(nb, 1.0)
    mb_x = jnp.sum(x * m[:, None], axis=0) / safe_nb
    mb_y = jnp.sum(y * m[:, None], axis=0) / safe_nb
    xc = (x - mb_x) * m[:, None]
    yc = (y - mb_y) * m[:, None]
    na = state.count.astype(dt)
    n = na + nb
    safe_n = jnp.maximum(n, 1.0)
    dx = mb_x - state.mean_x
    dy = mb_y - state.mean_y
    f = na * nb / safe_n
    cxx, kxx = _kahan_add(state.cxx, state.comp_xx, _mm(xc.T, xc) + f * jnp.outer(dx, dx))
    cyy, kyy = _kahan_add(state.cyy, state.comp_yy, _mm(yc.T, yc) + f * jnp.outer(dy, dy))
    cxy, kxy = _kahan_add(state.cxy, state.comp_xy, _mm(xc.T, yc) + f * jnp.outer(dx, dy))
    w = nb / safe_n
    return CovarianceState(state.count + nb.astype(jnp.int32), state.mean_x + dx * w,
                           state.mean_y + dy * w, cxx, cyy, cxy, kxx, kyy, kxy)


@jax.jit
@_highest
def _update_covariance_jit(state, x, y, mask):
    return _update_covariance(state, x, y, mask)


def update_covariance(state: CovarianceState, x, y, mask=None) -> CovarianceState:
    """Adds a batch: x (b, p), y (b, q), optional mask (b,) of 0/1. Jitted, on device."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"update_covariance expects x (b, p) and y (b, q) with the same b; "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}.")
    if x.shape[1] != state.mean_x.shape[0] or y.shape[1] != state.mean_y.shape[0]:
        raise ValueError(f"update_covariance: state was made for p={state.mean_x.shape[0]}, "
                         f"q={state.mean_y.shape[0]} neurons but the batch has "
                         f"{x.shape[1]} / {y.shape[1]}.")
    if mask is None:
        mask = jnp.ones((x.shape[0],), state.cxx.dtype)
    return _update_covariance_jit(state, x, y, mask)


@jax.jit
@_highest
def update_covariance_many(states: Dict[str, CovarianceState], xs: Dict[str, jax.Array],
                           ys: Dict[str, jax.Array], masks: Dict[str, jax.Array]):
    """:func:`update_covariance` for a dict of layer pairs in one compiled call."""
    return {k: _update_covariance(states[k], xs[k], ys[k], masks[k]) for k in states}


@dataclasses.dataclass
class Covariances:
    """Finished float64 statistics: ``n`` datapoints, means, and covariance blocks
    (divided by n - 1, like ``np.cov``)."""
    n: int
    mean_x: np.ndarray
    mean_y: np.ndarray
    sxx: np.ndarray
    syy: np.ndarray
    sxy: np.ndarray


def finish_covariance(state: CovarianceState) -> Covariances:
    """Pulls the statistics to the host and forms float64 covariances."""
    n = int(state.count)
    if n < 2:
        raise ValueError(f"finish_covariance: need at least 2 datapoints, got {n}.")
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    cxx = f64(state.cxx) - f64(state.comp_xx)
    cyy = f64(state.cyy) - f64(state.comp_yy)
    cxy = f64(state.cxy) - f64(state.comp_xy)
    sym = lambda a: 0.5 * (a + a.T)  # noqa: E731
    return Covariances(n, f64(state.mean_x), f64(state.mean_y), sym(cxx) / (n - 1),
                       sym(cyy) / (n - 1), cxy / (n - 1))


def covariance_from_data(X, Y) -> Covariances:
    """Float64 covariances of in-memory X (n, p), Y (n, q) (for tests and small data)."""
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    n = X.shape[0]
    return Covariances(n, X.mean(0), Y.mean(0), Xc.T @ Xc / (n - 1), Yc.T @ Yc / (n - 1),
                       Xc.T @ Yc / (n - 1))


def _whitener(s: np.ndarray, rtol: float, keep_idx: Optional[np.ndarray] = None):
    """W (p, r) with W^T s W = I on the eigen-directions above the floor rtol^2 * lambda_max."""
    lam, V = np.linalg.eigh(s)
    lam, V = lam[::-1], V[:, ::-1]
    top = lam[0] if lam.size else 0.0
    if top <= 0:
        return np.zeros((s.shape[0], 0)), lam
    ok = lam > (rtol ** 2) * top
    if keep_idx is not None:
        ok &= keep_idx
    return V[:, ok] / np.sqrt(lam[ok]), lam


def _prune(cov: Covariances, rel_var_tol: float):
    vx, vy = np.diag(cov.sxx), np.diag(cov.syy)
    kx = (vx > rel_var_tol * max(vx.max(), 0)) & (vx > 0)
    ky = (vy > rel_var_tol * max(vy.max(), 0)) & (vy > 0)
    return kx, ky


def cca_from_covariance(cov: Covariances, *, rtol: float = DEFAULT_STREAMING_RTOL,
                        epsilon: Optional[float] = None):
    """Canonical correlations from covariance blocks (float64, host).

    Neurons with variance < ``epsilon`` (default ``rtol^2``) x the largest are dropped;
    each side is whitened by eigh with eigenvalue flooring at ``rtol^2 * lambda_max``.

    Returns:
      (rho (min(p, q),) descending with zeros beyond k, k, kept_x, kept_y, Wx, u) where
      Wx (kept_x, r) whitens X's kept neurons and u (r, k) holds its canonical directions.
    """
    eps = rtol ** 2 if epsilon is None else epsilon
    kx, ky = _prune(cov, eps)
    sxx = cov.sxx[np.ix_(kx, kx)]
    syy = cov.syy[np.ix_(ky, ky)]
    sxy = cov.sxy[np.ix_(kx, ky)]
    Wx, _ = _whitener(sxx, rtol)
    Wy, _ = _whitener(syy, rtol)
    m = min(cov.sxx.shape[0], cov.syy.shape[0])
    rho = np.zeros(m)
    k = min(Wx.shape[1], Wy.shape[1])
    u = np.zeros((Wx.shape[1], 0))
    if k > 0:
        M = Wx.T @ sxy @ Wy
        u, s, _ = np.linalg.svd(M, full_matrices=False)
        rho[:k] = np.clip(s[:k], 0.0, 1.0)
    return rho, k, kx, ky, Wx, u[:, :k]


def similarity_from_covariance(cov: Covariances, method: str = "mean_cca", *,
                               rtol: float = DEFAULT_STREAMING_RTOL, epsilon: float = 1e-12,
                               keep: float = 0.99) -> float:
    """One of :data:`COVARIANCE_METHODS` from finished covariances (float64 result)."""
    if method not in COVARIANCE_METHODS:
        raise ValueError(f"{method!r} cannot be finished from covariances; choose one of "
                         f"{COVARIANCE_METHODS} (or use MinibatchCKA for debiased CKA).")
    p, q = cov.sxx.shape[0], cov.syy.shape[0]
    if method != "linear_cka" and cov.n <= max(p, q):
        raise ValueError(f"{method} needs more datapoints than neurons, got n={cov.n} for "
                         f"p={p} / q={q} neurons. Stream more batches or subsample channels.")
    if method == "linear_cka":
        den = np.linalg.norm(cov.sxx) * np.linalg.norm(cov.syy)
        return float(np.sum(cov.sxy ** 2) / den) if den > 0 else 0.0
    if method == "mean_cca":
        rho, k, *_ = cca_from_covariance(cov, rtol=rtol)
        return float(rho.sum() / k) if k else 0.0
    if method == "paper_cca":
        rho, k, kx, ky, *_ = cca_from_covariance(cov, rtol=rtol, epsilon=epsilon)
        count = min(kx.sum(), ky.sum())
        return float(rho.sum() / count) if count else 0.0
    if method == "svcca":
        def reduce(s):
            lam, V = np.linalg.eigh(s)
            lam, V = lam[::-1], V[:, ::-1]
            lam = np.maximum(lam, 0)
            frac = np.cumsum(lam) / max(lam.sum(), np.finfo(float).tiny)
            d = int(np.sum(frac < keep)) + 1
            ok = (np.arange(lam.size) < d) & (lam > rtol ** 2 * lam[0])
            return V[:, ok] / np.sqrt(lam[ok])
        Wx, Wy = reduce(cov.sxx), reduce(cov.syy)
        k = min(Wx.shape[1], Wy.shape[1])
        if k == 0:
            return 0.0
        s = np.linalg.svd(Wx.T @ cov.sxy @ Wy, compute_uv=False)
        return float(np.clip(s[:k], 0, 1).sum() / k)
    # pwcca: <h_i, x_j> for unit canonical variate h_i = Xc Wx u_i is (Sxx Wx u_i)_j * (n-1),
    # up to a common factor that cancels in the normalisation.
    rho, k, kx, _, Wx, u = cca_from_covariance(cov, rtol=rtol)
    if k == 0:
        return 0.0
    sxx = cov.sxx[np.ix_(kx, kx)]
    alpha = np.abs(sxx @ Wx @ u).sum(axis=0)
    return float(np.sum(alpha * rho[:k]) / alpha.sum()) if alpha.sum() > 0 else 0.0


# ----------------------------------------------------------------------------- minibatch CKA
class MinibatchCKAState(NamedTuple):
    """Sums over batches of unbiased HSIC(K,L), HSIC(K,K), HSIC(L,L); number of batches."""
    hsic_xy: jax.Array
    hsic_xx: jax.Array
    hsic_yy: jax.Array
    batches: jax.Array


def init_minibatch_cka() -> MinibatchCKAState:
    z = jnp.zeros((), jnp.float32)
    return MinibatchCKAState(z, z, z, jnp.zeros((), jnp.int32))


def _hsic_u_masked(x, y, m, kernel, threshold):
    """Unbiased HSIC of the valid rows (mask m) of one batch; 0 if fewer than 4 rows."""
    n = jnp.sum(m)
    safe = jnp.maximum(n, 1.0)
    x = (x - jnp.sum(x * m[:, None], 0) / safe) * m[:, None]
    y = (y - jnp.sum(y * m[:, None], 0) / safe) * m[:, None]
    nn = jnp.maximum(n, 4.0)
    if kernel == "linear":
        def terms(a, b):
            da, db = jnp.sum(a * a, 1), jnp.sum(b * b, 1)
            sa, sb = jnp.sum(a, 0), jnp.sum(b, 0)
            tr = jnp.sum(jnp.square(_mm(a.T, b))) - jnp.sum(da * db)
            k1 = jnp.sum(sa * sa) - jnp.sum(da)
            l1 = jnp.sum(sb * sb) - jnp.sum(db)
            kr, lr = _mm(a, sa) - da, _mm(b, sb) - db
            return (tr + k1 * l1 / ((nn - 1) * (nn - 2)) - 2 * jnp.sum(kr * lr) / (nn - 2)) / (
                nn * (nn - 3))
        vals = terms(x, y), terms(x, x), terms(y, y)
    else:
        mm = m[:, None] * m[None, :]

        def gram(a):
            G = _mm(a, a.T)
            sq = jnp.diag(G)
            D = jnp.maximum(sq[:, None] + sq[None, :] - 2 * G, 0.0)
            # median over the valid pairs only: invalid entries sort to the end
            srt = jnp.sort(jnp.where(mm > 0, D, jnp.inf).ravel())
            cnt = jnp.maximum(jnp.sum(mm).astype(jnp.int32), 1)
            med = 0.5 * (srt[(cnt - 1) // 2] + srt[cnt // 2])
            scale = 2.0 * threshold ** 2 * med
            return jnp.exp(-D / jnp.where(scale > 0, scale, 1.0)) * mm

        def u(K):
            off = (1.0 - jnp.eye(K.shape[0], dtype=K.dtype)) * mm
            K = K * off
            r = jnp.sum(K, 1)
            t = jnp.sum(r)
            return (K - r[:, None] / (nn - 2) - r[None, :] / (nn - 2)
                    + t / ((nn - 1) * (nn - 2))) * off

        Ku, Lu = u(gram(x)), u(gram(y))
        d = nn * (nn - 3)
        vals = jnp.sum(Ku * Lu) / d, jnp.sum(Ku * Ku) / d, jnp.sum(Lu * Lu) / d
    ok = n >= 4
    return tuple(jnp.where(ok, v, 0.0) for v in vals), ok


@functools.partial(jax.jit, static_argnames=("kernel", "threshold"))
@_highest
def _update_mb_jit(state, x, y, mask, kernel, threshold):
    (xy, xx, yy), ok = _hsic_u_masked(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                                      jnp.asarray(mask, jnp.float32), kernel, threshold)
    return MinibatchCKAState(state.hsic_xy + xy, state.hsic_xx + xx, state.hsic_yy + yy,
                             state.batches + ok.astype(jnp.int32))


def update_minibatch_cka(state: MinibatchCKAState, x, y, mask=None, *, kernel: str = "linear",
                         threshold: float = 1.0) -> MinibatchCKAState:
    """Adds one batch x (b, p), y (b, q); batches with < 4 valid rows are skipped."""
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"minibatch CKA kernel must be 'linear' or 'rbf', got {kernel!r}.")
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"update_minibatch_cka expects x (b, p), y (b, q); got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}.")
    if mask is None:
        mask = jnp.ones((x.shape[0],), jnp.float32)
    return _update_mb_jit(state, x, y, mask, kernel, float(threshold))


def finish_minibatch_cka(state: MinibatchCKAState) -> float:
    """Minibatch CKA from the summed HSICs (the 1/batches factors cancel)."""
    if int(state.batches) == 0:
        raise ValueError("finish_minibatch_cka: no batch had >= 4 valid rows.")
    xy, xx, yy = (float(v) for v in (state.hsic_xy, state.hsic_xx, state.hsic_yy))
    return xy / np.sqrt(xx * yy) if xx * yy > 0 else 0.0


# ----------------------------------------------------------------------------- convenience
class StreamingSimilarity:
    """Accumulates several layer pairs at once and finishes them into several methods.

    Example::

        acc = StreamingSimilarity({'conv1_relu': (64, 64), ...}, methods=('mean_cca',
                                  'linear_cka', 'debiased_cka'))
        for xa, xb, mask in batches:           # dicts of (b, p) arrays
            acc.update(xa, xb, mask)
        table = acc.finish()                   # {layer: {method: value}}

    ``debiased_cka`` here is the minibatch estimator (one HSIC per update call).
    """

    def __init__(self, shapes: Dict[str, Tuple[int, int]], methods=("mean_cca",), *,
                 rtol: float = DEFAULT_STREAMING_RTOL, epsilon: float = 1e-12,
                 keep: float = 0.99, kernel: str = "linear", threshold: float = 1.0):
        unknown = [m for m in methods if m not in COVARIANCE_METHODS + ("debiased_cka",)]
        if unknown:
            raise ValueError(f"Streaming supports {COVARIANCE_METHODS + ('debiased_cka',)}; "
                             f"got {unknown}. Use in-memory compare for rbf_cka/procrustes.")
        self.methods = tuple(methods)
        self.options = dict(rtol=rtol, epsilon=epsilon, keep=keep)
        self.kernel, self.threshold = kernel, threshold
        self.cov = ({k: init_covariance(p, q) for k, (p, q) in shapes.items()}
                    if any(m in COVARIANCE_METHODS for m in methods) else None)
        self.mb = ({k: init_minibatch_cka() for k in shapes}
                   if "debiased_cka" in methods else None)

    def update(self, xs: Dict[str, jax.Array], ys: Dict[str, jax.Array],
               masks: Optional[Dict[str, jax.Array]] = None):
        keys = list(self.cov or self.mb)
        if masks is None:
            masks = {k: jnp.ones((xs[k].shape[0],), jnp.float32) for k in keys}
        if self.cov is not None:
            self.cov = update_covariance_many(self.cov, {k: xs[k] for k in keys},
                                              {k: ys[k] for k in keys},
                                              {k: jnp.asarray(masks[k], jnp.float32)
                                               for k in keys})
        if self.mb is not None:
            for k in keys:
                self.mb[k] = update_minibatch_cka(self.mb[k], xs[k], ys[k], masks[k],
                                                  kernel=self.kernel, threshold=self.threshold)

    def finish(self) -> Dict[str, Dict[str, float]]:
        out: Dict[str, Dict[str, float]] = {}
        for k in (self.cov or self.mb):
            row: Dict[str, float] = {}
            cov = finish_covariance(self.cov[k]) if self.cov is not None else None
            for m in self.methods:
                if m == "debiased_cka":
                    row[m] = finish_minibatch_cka(self.mb[k])
                else:
                    opts = dict(self.options)
                    if m != "paper_cca":
                        opts.pop("epsilon")
                    if m != "svcca":
                        opts.pop("keep")
                    if m == "linear_cka":
                        opts = {}
                    row[m] = similarity_from_covariance(cov, m, **opts)
            row["datapoints"] = cov.n if cov is not None else None
            out[k] = row
        return out
