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

import functools
from typing import Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from medtransfer_jax import sharding
from medtransfer_jax.analysis import similarity as _sim
from medtransfer_jax.analysis import similarity as sim
from medtransfer_jax.analysis.covariance import (  # noqa: F401  (re-exported)
    COVARIANCE_METHODS, CCAResult, Covariances, cca_from_covariance, covariance_from_data,
    similarity_from_covariance)

_mm = _sim._mm
_highest = _sim._highest

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
    bad_x: jax.Array  # NaN/inf values seen in valid rows of x (int32)
    bad_y: jax.Array
    scale_x: jax.Array  # power-of-two scale of x fixed by the first batch (0 = not yet)
    scale_y: jax.Array


def init_covariance(p: int, q: int, dtype=jnp.float32) -> CovarianceState:
    """Empty statistics for X with p neurons and Y with q neurons."""
    z = lambda *s: jnp.zeros(s, dtype)  # noqa: E731
    i = jnp.zeros((), jnp.int32)
    return CovarianceState(i, z(p), z(q), z(p, p), z(q, q), z(p, q), z(p, p), z(q, q),
                           z(p, q), i, i, z(), z())


def _stream_scale(current, a, m):
    """The stream's power-of-two scale: ``current`` once set, else 2^e ~ max |a| over the
    valid rows of this batch. Statistics are accumulated on a / scale, so activations of
    any magnitude (1e-30 .. 1e30) neither overflow nor underflow float32 products, and
    the exact power of two is undone in float64 when finishing."""
    top = jnp.max(jnp.where(m[:, None] > 0, jnp.abs(jnp.where(jnp.isfinite(a), a, 0)), 0))
    _, e = jnp.frexp(jnp.where(top > 0, top, 1.0).astype(jnp.float32))
    return jnp.where(current > 0, current, jnp.ldexp(jnp.float32(1), e))


def _bad(a, m):
    """Number of non-finite entries in the valid rows (mask m) of a batch (b, k)."""
    return jnp.sum(jnp.where(m[:, None] > 0, ~jnp.isfinite(a), False)).astype(jnp.int32)


def _raise_if_bad(name: str, bad_x: int, bad_y: int) -> None:
    if bad_x or bad_y:
        where = f" of {name}" if name else ""
        parts = [f"{side}{where}: {cnt} NaN/inf values" for side, cnt in
                 (("X", bad_x), ("Y", bad_y)) if cnt]
        raise _sim.NonFiniteActivationsError(
            "streamed activations are not finite (" + "; ".join(parts) + "). Check the "
            "model's weights and inputs (a diverged checkpoint, unnormalised images, bf16 "
            "overflow); similarities of non-finite activations are undefined.")


def _kahan_add(total, comp, term):
    y = term - comp
    t = total + y
    return t, (t - total) - y


def _update_covariance(state: CovarianceState, x, y, mask) -> CovarianceState:
    dt = state.cxx.dtype
    m = jnp.ones((x.shape[0],), dt) if mask is None else jnp.asarray(mask, dt)
    x, y = jnp.asarray(x, dt), jnp.asarray(y, dt)
    bad_x, bad_y = state.bad_x + _bad(x, m), state.bad_y + _bad(y, m)
    sx, sy = _stream_scale(state.scale_x, x, m), _stream_scale(state.scale_y, y, m)
    x, y = x / sx, y / sy
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
                           state.mean_y + dy * w, cxx, cyy, cxy, kxx, kyy, kxy,
                           bad_x, bad_y, sx, sy)


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


def finish_covariance(state: CovarianceState, name: str = "") -> Covariances:
    """Pulls the statistics to the host and forms float64 covariances.

    Raises :class:`similarity.NonFiniteActivationsError` naming ``name`` (the layer) and
    the number of NaN/inf values seen in the stream: they would poison every statistic.
    """
    _raise_if_bad(name, int(state.bad_x), int(state.bad_y))
    n = int(state.count)
    if n < 2:
        raise ValueError(f"finish_covariance: need at least 2 datapoints, got {n}.")
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    sx, sy = float(state.scale_x), float(state.scale_y)  # exact powers of two
    cxx = (f64(state.cxx) - f64(state.comp_xx)) * (sx * sx)
    cyy = (f64(state.cyy) - f64(state.comp_yy)) * (sy * sy)
    cxy = (f64(state.cxy) - f64(state.comp_xy)) * (sx * sy)
    sym = lambda a: 0.5 * (a + a.T)  # noqa: E731
    return Covariances(n, f64(state.mean_x) * sx, f64(state.mean_y) * sy, sym(cxx) / (n - 1),
                       sym(cyy) / (n - 1), cxy / (n - 1))


# ----------------------------------------------------------------------------- minibatch CKA
class MinibatchCKAState(NamedTuple):
    """Sums over batches of unbiased HSIC(K,L), HSIC(K,K), HSIC(L,L); number of batches."""
    hsic_xy: jax.Array
    hsic_xx: jax.Array
    hsic_yy: jax.Array
    batches: jax.Array
    bad_x: jax.Array  # NaN/inf values seen in valid rows (int32)
    bad_y: jax.Array
    scale_x: jax.Array  # power-of-two scale fixed by the first batch (0 = not yet)
    scale_y: jax.Array


def init_minibatch_cka() -> MinibatchCKAState:
    z = jnp.zeros((), jnp.float32)
    i = jnp.zeros((), jnp.int32)
    return MinibatchCKAState(z, z, z, i, i, i, z, z)


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
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    sx, sy = _stream_scale(state.scale_x, x, mask), _stream_scale(state.scale_y, y, mask)
    (xy, xx, yy), ok = _hsic_u_masked(x / sx, y / sy, mask, kernel, threshold)
    return MinibatchCKAState(state.hsic_xy + xy, state.hsic_xx + xx, state.hsic_yy + yy,
                             state.batches + ok.astype(jnp.int32),
                             state.bad_x + _bad(x, mask), state.bad_y + _bad(y, mask), sx, sy)


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


def finish_minibatch_cka(state: MinibatchCKAState, name: str = "") -> float:
    """Minibatch CKA from the summed HSICs (the 1/batches factors cancel)."""
    _raise_if_bad(name, int(state.bad_x), int(state.bad_y))
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
        sim.check_methods(methods, need="streaming", what="StreamingSimilarity")
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
        xs, ys = sharding.settled((xs, ys))  # this update's collectives follow the forwards
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
            cov = finish_covariance(self.cov[k], k) if self.cov is not None else None
            for m in self.methods:
                if m == "debiased_cka":
                    row[m] = finish_minibatch_cka(self.mb[k], k)
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


# ----------------------------------------------------------------------------- joint (maps)
class JointState(NamedTuple):
    """Running statistics of the concatenated features Z = [layer_1 | ... | layer_L] (b, D)
    of a stream: the co-moment of all layers with all layers (D, D) and, per batch, the
    unbiased linear HSIC of every pair of layers (L, L). One GEMM Z^T Z per batch feeds
    both, so a layer x layer map costs one pass however many layers it has.

    ``segments`` (static, passed to the update) say which columns belong to which layer;
    ``scale`` (D,) holds each layer's power-of-two scale (fixed by its first batch).
    """
    count: jax.Array
    mean: jax.Array
    c: jax.Array
    comp: jax.Array
    hsic: jax.Array
    batches: jax.Array
    bad: jax.Array
    scale: jax.Array


def init_joint(num_features: int, num_layers: int) -> JointState:
    """Empty statistics for D = ``num_features`` columns in ``num_layers`` layers."""
    d, L = num_features, num_layers
    z = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
    i = jnp.zeros((), jnp.int32)
    return JointState(i, z(d), z(d, d), z(d, d), z(L, L), i, jnp.zeros((d,), jnp.int32), z(d))


def _membership(segments, d):
    """(D, L) one-hot matrix of which layer each column belongs to."""
    E = np.zeros((d, len(segments)), np.float32)
    for l, (a, b) in enumerate(segments):
        E[a:b, l] = 1.0
    return jnp.asarray(E)


@functools.partial(jax.jit, static_argnames=("segments",))
@_highest
def update_joint(state: JointState, z, mask, segments) -> JointState:
    """Adds one batch z (b, D) with valid-row mask (b,); ``segments`` ((start, stop), ...)."""
    m = jnp.asarray(mask, jnp.float32)
    z = jnp.asarray(z, jnp.float32)
    E = _membership(segments, z.shape[1])
    bad = state.bad + jnp.sum(jnp.where(m[:, None] > 0, ~jnp.isfinite(z), False), 0,
                              dtype=jnp.int32)
    top = jnp.max(jnp.where(m[:, None] > 0, jnp.abs(jnp.where(jnp.isfinite(z), z, 0)), 0), 0)
    layer_top = jnp.max(E * top[:, None], 0)  # (L,)
    _, e = jnp.frexp(jnp.where(layer_top > 0, layer_top, 1.0))
    scale = jnp.where(state.scale > 0, state.scale, _mm(E, jnp.ldexp(jnp.ones_like(
        layer_top), e)))
    z = z / scale
    nb = jnp.sum(m)
    safe = jnp.maximum(nb, 1.0)
    mb = jnp.sum(z * m[:, None], 0) / safe
    zc = (z - mb) * m[:, None]
    G = _mm(zc.T, zc)
    na = state.count.astype(jnp.float32)
    n = na + nb
    dm = mb - state.mean
    c, comp = _kahan_add(state.c, state.comp, G + (na * nb / jnp.maximum(n, 1.0)) *
                         jnp.outer(dm, dm))
    # unbiased linear HSIC of every layer pair on this batch (centred data, so K~1 = -diag)
    a = _mm(zc * zc, E)  # (b, L) squared row norms per layer
    ss = _mm(E.T, _mm(G * G, E))  # (L, L) ||Z_i^T Z_j||_F^2
    nn = jnp.maximum(nb, 4.0)
    ab = _mm(a.T, a)
    sa = jnp.sum(a, 0)
    h = (ss - ab + jnp.outer(sa, sa) / ((nn - 1) * (nn - 2)) - 2.0 * ab / (nn - 2)) / (
        nn * (nn - 3))
    ok = nb >= 4
    return JointState(state.count + nb.astype(jnp.int32), state.mean + dm * nb / jnp.maximum(n, 1.0),
                      c, comp, state.hsic + jnp.where(ok, h, 0.0),
                      state.batches + ok.astype(jnp.int32), bad, scale)


def finish_joint(state: JointState, segments, names) -> Tuple[Covariances, np.ndarray]:
    """Float64 covariance of all D columns (as a :class:`Covariances` with x = y = Z) and
    the minibatch linear CKA matrix (L, L); raises on NaN/inf naming the layers."""
    bad = np.asarray(state.bad)
    problems = [f"{name}: {int(bad[a:b].sum())} NaN/inf values"
                for name, (a, b) in zip(names, segments) if bad[a:b].sum()]
    if problems:
        raise _sim.NonFiniteActivationsError(
            "streamed activations are not finite (" + "; ".join(problems) + "). Check the "
            "model's weights and inputs (a diverged checkpoint, unnormalised images, bf16 "
            "overflow); similarities of non-finite activations are undefined.")
    n = int(state.count)
    if n < 2:
        raise ValueError(f"finish_joint: need at least 2 datapoints, got {n}.")
    s = np.asarray(state.scale, np.float64)
    c = (np.asarray(state.c, np.float64) - np.asarray(state.comp, np.float64))
    c = 0.5 * (c + c.T) * np.outer(s, s) / (n - 1)
    mean = np.asarray(state.mean, np.float64) * s
    h = np.asarray(state.hsic, np.float64)
    diag = np.sqrt(np.maximum(np.diag(h), 0.0))
    den = np.outer(diag, diag)
    cka = np.where(den > 0, h / np.where(den > 0, den, 1.0), 0.0)
    return Covariances(n, mean, mean, c, c, c), cka
