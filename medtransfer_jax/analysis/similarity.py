"""Representational similarity kernels: CCA family, CKA family, Procrustes (pure JAX).

Conventions
-----------
Every kernel takes ``X`` of shape ``(n, p)`` and ``Y`` of shape ``(n, q)``: **datapoints
first**, neurons second (the transpose of google/svcca's layout). Row ``i`` of ``X`` and
``Y`` must be the same stimulus (image, or spatial position of an image). Inputs are
computed in float32 (float64 stays float64 when ``jax_enable_x64`` is on); integer and
half-precision inputs are promoted to float32.

Why the formulation looks the way it does
-----------------------------------------
* **No explicit inverses.** CCA is computed by centring each side, a thin QR and an SVD
  of the small ``R`` factor (a rank-revealing orthonormal basis of each column space),
  then the singular values of ``Qx^T Qy`` are the canonical correlations. The condition
  number is not squared as in the covariance formula, so float32 on device is enough.
* **Rank deficiency and constant neurons.** Neurons whose standard deviation is below
  ``rtol * max std`` are zeroed, and basis directions whose singular value is below
  ``rtol * s_max`` are dropped (masked, so shapes stay static under ``jit``). The number
  of canonical correlations is then ``k = min(rank_x, rank_y)`` and means are over those
  ``k``; everything stays finite (an all-constant input gives 0, like svcca).
* **Precision.** On TPU the default matmul is a single bf16 pass and on Ampere+ GPUs it is
  TF32, which loses 3-4 digits on Gram/covariance products. Every matmul here passes
  ``precision=HIGHEST`` and every kernel is traced under
  ``jax.default_matmul_precision('highest')`` (which also reaches the matmuls inside
  QR/SVD expansions on TPU).

Two routes for the CCA family and linear CKA (``route=``, :func:`resolve_route`)
-------------------------------------------------------------------------------
* ``qr``: the jitted kernels below (QR of each centred, equilibrated side, SVD of the
  small R factors). Error ~ eps32 x condition of the data (not squared). Default on GPU /
  TPU, where batched QR/SVD stay on device, and for n < 4 max(p, q).
* ``covariance``: the scaled, centred, equilibrated Grams Xe^T Xe, Xe^T Ye, Ye^T Ye by one
  float32 GEMM each on the device (no LAPACK), then the p x p problem (eigh whitening,
  SVD) in float64 on the host (analysis/covariance.py). The Gram entries carry float32
  rounding (~1e-7 x sqrt of the accumulation length), amplified by the condition number
  of the correlation matrices; when that (kept lambda_max / lambda_min) exceeds
  FLOAT32_GRAM_CONDITION_LIMIT (1e3) the Grams are re-formed from the data in float64
  (NumPy), so the route's error stays ~1e-6 or below either way. Default on CPU for
  n >= 4 max(p, q): there XLA's float32 GEMM is the fastest thing available and float32
  QR via LAPACK is 2-4x slower than NumPy's float64 covariance algorithm.
Both routes agree with float64 references to <= 1e-5 on the tested data (tests/
test_similarity.py, bench ``abs_diff``). Inputs are checked first: NaN/inf raise
:class:`NonFiniteActivationsError` with the count (they used to give a silent 0), and a
power-of-two rescaling makes every method invariant to the activations' scale (float32
products of ``X * 1e18`` used to overflow to a similarity of 0).

Accuracy (float32 kernels vs float64 NumPy references, tested in tests/test_similarity.py):
canonical correlations / CKA / Procrustes agree to ~1e-5 on well-conditioned data; the
tests assert 2e-4 (means) to 1e-3 (individual correlations near rank deficiency).

Methods needing more datapoints than neurons (``CCA_FAMILY``) raise ``ValueError`` when
``n <= max(p, q)``; svcca's authors recommend n >= 5-10x the neurons.

Batched forms (``*_batch``/:func:`similarity_batch`) map a kernel over a leading axis of
equal-shape pairs ``(L, n, p)``/``(L, n, q)`` inside one compiled call (``vmap`` on
GPU/TPU, a sequential ``lax.map`` on CPU, see :func:`_over_stack`);
:func:`similarity_many` groups arbitrary pairs by shape so a whole network is compared in
one compiled call per distinct shape.
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from medtransfer_jax.analysis import covariance as _cov
from medtransfer_jax.errors import TooFewDatapoints

HIGHEST = lax.Precision.HIGHEST



@dataclasses.dataclass(frozen=True)
class Method:
    """One similarity method: what every caller (CLI validation, streaming, layer maps,
    plots, the study) needs to know about it, in one place.

    ``kernel``: name of this module's public function (:data:`KERNELS` maps the method to
    it); ``label``: axis/legend text; ``cca``: needs n > neurons on each side;
    ``streaming``: has an accumulator (:class:`streaming.StreamingSimilarity`: every
    covariance-form method and minibatch debiased CKA); ``maps``: computable from the
    joint co-moment of :func:`layer_map.layer_map`; ``distance``: 0 = identical.
    """
    name: str
    kernel: str
    label: str
    cca: bool = False
    streaming: bool = False
    maps: bool = False
    distance: bool = False


#: The one table of similarity methods; every other list of method names derives from it.
REGISTRY: Dict[str, Method] = {m.name: m for m in (
    Method("mean_cca", "mean_cca", "mean CCA", cca=True, streaming=True, maps=True),
    Method("paper_cca", "svcca_paper_cca", "mean CCA (Revisiting CCA.py)", cca=True,
           streaming=True, maps=True),
    Method("svcca", "svcca", "SVCCA", cca=True, streaming=True, maps=True),
    Method("pwcca", "pwcca", "PWCCA", cca=True, streaming=True, maps=True),
    Method("linear_cka", "linear_cka", "linear CKA", streaming=True, maps=True),
    Method("rbf_cka", "rbf_cka", "RBF CKA"),
    Method("debiased_cka", "debiased_cka", "debiased CKA", streaming=True, maps=True),
    Method("procrustes", "procrustes_distance", "Procrustes distance", distance=True),
)}
METHODS = tuple(REGISTRY)
# Methods whose estimator needs n > number of neurons on each side.
CCA_FAMILY = tuple(m for m, s in REGISTRY.items() if s.cca)
STREAMING_METHODS = tuple(m for m, s in REGISTRY.items() if s.streaming)
MAP_METHODS = tuple(m for m, s in REGISTRY.items() if s.maps)


def label(method: str) -> str:
    """Display text of ``method`` (plots, reports); unknown names are shown as given."""
    spec = REGISTRY.get(method)
    return spec.label if spec else method.replace("_", " ")


def check_methods(methods: Sequence[str], *, need: Optional[str] = None,
                  what: str = "methods") -> Tuple[str, ...]:
    """``methods`` as a tuple, or ValueError naming the bad ones and the allowed choice.
    ``need``: a :class:`Method` capability every one must have ('streaming', 'maps')."""
    allowed = tuple(m for m, s in REGISTRY.items() if not need or getattr(s, need))
    bad = [m for m in methods if m not in allowed]
    if not methods:
        raise ValueError(f"{what}: no method given; choose from {allowed}.")
    if bad and not need:
        raise ValueError(f"Unknown method(s) {bad} in {what}; choose from {allowed}.")
    if bad:
        verb = {"maps": "mapped", "streaming": "streamed"}.get(need, need)
        raise ValueError(f"{what}: {bad} cannot be {verb}; choose from {allowed}.")
    return tuple(methods)


# ----------------------------------------------------------------------------- helpers
def _mm(a, b):
    """float32-exact matmul (no bf16 / TF32 passes)."""
    return jnp.matmul(a, b, precision=HIGHEST)


def _highest(fn: Callable) -> Callable:
    """Traces ``fn`` under default_matmul_precision('highest') (covers linalg expansions)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped


#: The SVD algorithms of the QR route (``svd=`` option). ``default``: XLA's choice (LAPACK
#: on CPU; on NVIDIA GPUs cuSOLVER's Jacobi gesvdj up to 1024 x 1024, else the QR-based
#: gesvd, whose 2048 x 2048 call took 300 ms of an H200's ~1 s mean CCA). ``jacobi``:
#: gesvdj at any size, GPU only in XLA; 1.5-1.6x faster there at 2048 x 20k, within
#: 4.3e-5 of the default's value (BENCHMARKS.md section 11). cuSOLVER's polar gesvdp is
#: not offered: see :data:`_POLAR_REFUSED`.
SVD_ALGORITHMS = ("default", "jacobi")
_POLAR_REFUSED = (
    "svd='polar' (cuSOLVER gesvdp) is not offered: on an H200 it returned singular values "
    "of 10 to 537 where the true ones were 0 (a matrix with zero rows and columns) and "
    "SVCCA 1.0 where the default SVD gives 0.289, and every CCA basis masked at its "
    "numerical rank is such a matrix (BENCHMARKS.md section 11); use svd='jacobi' (GPU) "
    "or 'default'.")
_SVD_ALGORITHM = contextvars.ContextVar("svd_algorithm", default="default")


def _svd(x, compute_uv: bool = True):
    """Thin SVD of ``x`` with the algorithm of the kernel being traced (:func:`_compiled`
    sets it): (u, s, vt), or s alone."""
    alg = _SVD_ALGORITHM.get()
    if alg == "default":
        return jnp.linalg.svd(x, full_matrices=False, compute_uv=compute_uv)
    algorithm = getattr(lax.linalg.SvdAlgorithm, alg.upper())
    return lax.linalg.svd(x, full_matrices=False, compute_uv=compute_uv, algorithm=algorithm)


def _with_svd(fn: Callable, algorithm: str) -> Callable:
    """Traces ``fn`` with ``algorithm`` as the SVD of :func:`_svd`."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        token = _SVD_ALGORITHM.set(algorithm)
        try:
            return fn(*args, **kwargs)
        finally:
            _SVD_ALGORITHM.reset(token)

    return wrapped


def check_svd_algorithm(svd: str, backend: Optional[str] = None) -> None:
    """ValueError unless ``svd`` is one of SVD_ALGORITHMS and runs on ``backend``."""
    if svd == "polar":
        raise ValueError(_POLAR_REFUSED)
    if svd not in SVD_ALGORITHMS:
        raise ValueError(f"svd={svd!r}: choose one of {SVD_ALGORITHMS}.")
    backend = backend or jax.default_backend()
    if svd != "default" and backend != "gpu":
        raise ValueError(f"svd={svd!r} is a cuSOLVER algorithm: it runs on NVIDIA GPUs only "
                         f"(this backend is {backend}); use svd='default'.")


def default_rtol(dtype) -> float:
    """Relative singular-value tolerance used to decide numerical rank.

    float32: 1e-5 (directions with < 1e-10 of the top variance are treated as null;
    float32 rounding of the centred data sits near 1e-7 of the top singular value, so
    what is kept is two orders above it). float64: 1e-7. A conv1 on grey images (RGB
    copies of one channel) has near-collinear channels down to ~1e-5: svcca keeps their
    correlations, and the earlier 1e-4 cut read its paper CCA 0.75 where svcca reads 0.82
    (tests/test_similarity.py).
    """
    return 1e-7 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def _as_float(x) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize < 4:
        x = x.astype(jnp.float32)
    return x


def _check_pair(X, Y, method: str, *, batched: bool = False):
    nd = 3 if batched else 2
    shape_doc = "(L, n, p)/(L, n, q)" if batched else "(n, p)/(n, q)"
    if X.ndim != nd or Y.ndim != nd:
        raise ValueError(f"{method}: expected arrays of shape {shape_doc} (datapoints first), "
                         f"got X{tuple(X.shape)} and Y{tuple(Y.shape)}.")
    if X.shape[:-1] != Y.shape[:-1]:
        raise ValueError(f"{method}: X{tuple(X.shape)} and Y{tuple(Y.shape)} must have the same "
                         "datapoints (rows): pass activations of the same stimuli in the same "
                         "order.")
    n, p, q = X.shape[-2], X.shape[-1], Y.shape[-1]
    if method in CCA_FAMILY and n <= max(p, q):
        raise TooFewDatapoints(
            f"{method} needs more datapoints than neurons, got n={n} datapoints for "
            f"p={p} / q={q} neurons. Use more images or spatial positions (5-10x the "
            "neurons is recommended) or subsample channels; CKA methods work for any n.")
    if method == "debiased_cka" and n < 4:
        raise ValueError(f"debiased_cka needs at least 4 datapoints, got n={n}.")
    if n < 2:
        raise ValueError(f"{method} needs at least 2 datapoints, got n={n}.")


def _centre(X):
    """Scaled two-pass centring: X / 2^e (2^e ~ max |X|), then the mean removed twice.

    The power-of-two scale is exact and makes every kernel invariant to the scale of the
    activations: without it ``X * 1e18`` overflows float32 in the first product (and
    ``X * 1e-30`` underflows), and every method silently returned 0. The second centring
    pass removes the rounding left by the first.
    """
    top = jnp.max(jnp.abs(X))
    _, e = jnp.frexp(jnp.where(top > 0, top, jnp.ones_like(top)))
    X = jnp.ldexp(X, -e)
    X = X - jnp.mean(X, axis=0, keepdims=True)
    return X - jnp.mean(X, axis=0, keepdims=True)


def _equilibrate(Xc):
    """Columns scaled to unit norm (zero columns stay zero).

    CCA is invariant to each neuron's scale, so its bases are computed from equilibrated
    columns: the numerical-rank cut then measures linear dependence rather than units,
    and the Gram matrix of the covariance route has a unit diagonal (smallest condition).
    """
    nrm = jnp.sqrt(jnp.sum(Xc * Xc, axis=0))
    return Xc / jnp.where(nrm > 0, nrm, 1.0)[None, :]


def _prune_columns(Xc, rel_var_tol):
    """Zeros neurons whose variance is < rel_var_tol * max variance; returns (Xc, keep)."""
    var = jnp.sum(Xc * Xc, axis=0)
    vmax = jnp.max(var)
    keep = (var > rel_var_tol * vmax) & (var > 0)
    return Xc * keep[None, :], keep


def _basis(Xc, rtol):
    """Orthonormal basis of span(Xc) via thin QR + SVD of R, with numerical-rank mask.

    Returns (U (n, p) with masked columns zeroed, singular values s (p,), keep mask (p,)).
    """
    Q, R = jnp.linalg.qr(Xc, mode="reduced")
    Ur, s, _ = _svd(R)
    keep = s > rtol * s[0]
    U = _mm(Q, Ur) * keep[None, :]
    return U, s, keep


def _correlations(Ux, kx, Uy, ky, compute_uv=False):
    """Canonical correlations between the masked bases; zero beyond k=min(rank_x, rank_y)."""
    m = min(Ux.shape[1], Uy.shape[1])
    M = _mm(Ux.T, Uy)
    if compute_uv:
        u, rho, vt = _svd(M)
    else:
        rho = _svd(M, compute_uv=False)
        u = vt = None
    k = jnp.minimum(jnp.sum(kx), jnp.sum(ky))
    valid = jnp.arange(m) < k
    rho = jnp.where(valid, jnp.clip(rho, 0.0, 1.0), 0.0)
    return rho, k, valid, u, vt


def _safe_mean(rho, k):
    return jnp.where(k > 0, jnp.sum(rho) / jnp.maximum(k, 1), 0.0)


# ----------------------------------------------------------------------------- CCA core
def _cca_core(X, Y, rtol):
    Xc, _ = _prune_columns(_centre(X), rtol ** 2)
    Yc, _ = _prune_columns(_centre(Y), rtol ** 2)
    Ux, _, kx = _basis(_equilibrate(Xc), rtol)
    Uy, _, ky = _basis(_equilibrate(Yc), rtol)
    rho, k, _, _, _ = _correlations(Ux, kx, Uy, ky)
    return rho, k


def _mean_cca_core(X, Y, rtol):
    rho, k = _cca_core(X, Y, rtol)
    return _safe_mean(rho, k)


def _paper_cca_core(X, Y, epsilon, rtol):
    """svcca get_cca_similarity(..., epsilon) semantics, stable formulation.

    svcca prunes neurons whose (max-rescaled) variance is < epsilon, adds epsilon*I and
    whitens with pinv/sqrt in float64; the study reported mean(cca_coef1), the mean of
    all min(kept_x, kept_y) coefficients. Here the same pruning defines the count; the
    correlations come from the QR basis; directions below the numerical rank get
    correlation 0 (what the epsilon-regularised whitening gives them).
    """
    Xc = _centre(X)
    Yc = _centre(Y)
    Xc, nx = _prune_columns(Xc, epsilon)
    Yc, ny = _prune_columns(Yc, epsilon)
    Ux, _, kx = _basis(_equilibrate(Xc), rtol)
    Uy, _, ky = _basis(_equilibrate(Yc), rtol)
    rho, _, _, _, _ = _correlations(Ux, kx, Uy, ky)
    count = jnp.minimum(jnp.sum(nx), jnp.sum(ny))
    return _safe_mean(rho, count)


def _svcca_core(X, Y, keep, rtol):
    def reduced_basis(X):
        Xc, _ = _prune_columns(_centre(X), rtol ** 2)
        U, s, k = _basis(Xc, rtol)
        var = s * s
        frac = jnp.cumsum(var) / jnp.maximum(jnp.sum(var), jnp.finfo(var.dtype).tiny)
        d = jnp.sum(frac < keep) + 1  # fewest leading directions reaching `keep` variance
        mask = k & (jnp.arange(s.shape[0]) < d)
        return U * mask[None, :], mask

    Ux, kx = reduced_basis(X)
    Uy, ky = reduced_basis(Y)
    rho, k, _, _, _ = _correlations(Ux, kx, Uy, ky)
    return _safe_mean(rho, k)


def _pwcca_core(X, Y, rtol):
    Xc, _ = _prune_columns(_centre(X), rtol ** 2)
    Yc, _ = _prune_columns(_centre(Y), rtol ** 2)
    Ux, _, kx = _basis(_equilibrate(Xc), rtol)
    Uy, _, ky = _basis(_equilibrate(Yc), rtol)
    rho, k, valid, u, _ = _correlations(Ux, kx, Uy, ky, compute_uv=True)
    m = rho.shape[0]
    H = _mm(Ux, u[:, :m])  # (n, m) canonical variates of X, unit norm
    alpha = jnp.sum(jnp.abs(_mm(H.T, Xc)), axis=1) * valid
    total = jnp.sum(alpha)
    return jnp.where(total > 0, jnp.sum(alpha * rho) / jnp.where(total > 0, total, 1.0), 0.0)


# ----------------------------------------------------------------------------- CKA core
def _unit_frobenius(Xc):
    nrm = jnp.sqrt(jnp.sum(Xc * Xc))
    return Xc / jnp.where(nrm > 0, nrm, 1.0)


def _ratio(num, den):
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _linear_cka_core(X, Y):
    Xc = _unit_frobenius(_centre(X))
    Yc = _unit_frobenius(_centre(Y))
    n, p, q = X.shape[0], X.shape[1], Y.shape[1]
    if n * n <= p * q + p * p + q * q:  # Gram form is cheaper when n is small
        K, L = _mm(Xc, Xc.T), _mm(Yc, Yc.T)
        xy, xx, yy = jnp.sum(K * L), jnp.sum(K * K), jnp.sum(L * L)
    else:
        xy = jnp.sum(jnp.square(_mm(Xc.T, Yc)))
        xx = jnp.sum(jnp.square(_mm(Xc.T, Xc)))
        yy = jnp.sum(jnp.square(_mm(Yc.T, Yc)))
    return _ratio(xy, jnp.sqrt(xx * yy))


def _rbf_gram(Xc, threshold):
    """RBF kernel with sigma^2 = threshold^2 * median squared distance (Kornblith et al.)."""
    G = _mm(Xc, Xc.T)
    sq = jnp.diag(G)
    D = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * G, 0.0)
    med = jnp.median(D)
    scale = 2.0 * threshold ** 2 * med
    return jnp.exp(-D / jnp.where(scale > 0, scale, 1.0))


def _centre_gram(K):
    r = jnp.mean(K, axis=0)
    return K - r[None, :] - r[:, None] + jnp.mean(r)


def _rbf_cka_core(X, Y, threshold):
    K = _centre_gram(_rbf_gram(_centre(X), threshold))
    L = _centre_gram(_rbf_gram(_centre(Y), threshold))
    return _ratio(jnp.sum(K * L), jnp.sqrt(jnp.sum(K * K) * jnp.sum(L * L)))


def _u_centre(K):
    """Székely-Rizzo U-centring: <U(K), U(L)> / (n(n-3)) is the unbiased HSIC."""
    n = K.shape[0]
    off = 1.0 - jnp.eye(n, dtype=K.dtype)
    K = K * off
    r = jnp.sum(K, axis=1)
    total = jnp.sum(r)
    Ku = K - r[:, None] / (n - 2) - r[None, :] / (n - 2) + total / ((n - 1) * (n - 2))
    return Ku * off


def _debiased_from_grams(K, L):
    Ku, Lu = _u_centre(K), _u_centre(L)
    xy, xx, yy = jnp.sum(Ku * Lu), jnp.sum(Ku * Ku), jnp.sum(Lu * Lu)
    den = xx * yy
    return jnp.where(den > 0, xy / jnp.sqrt(jnp.where(den > 0, den, 1.0)), 0.0)


def _linear_hsic_u_terms(Xc, Yc):
    """Unbiased linear HSIC (times n(n-3)) in feature space: O(n p q), no n x n Gram."""
    n = Xc.shape[0]
    a = jnp.sum(Xc * Xc, axis=1)  # diag of K
    b = jnp.sum(Yc * Yc, axis=1)
    sx, sy = jnp.sum(Xc, axis=0), jnp.sum(Yc, axis=0)
    tr = jnp.sum(jnp.square(_mm(Xc.T, Yc))) - jnp.sum(a * b)  # tr(K~ L~)
    k1 = jnp.sum(sx * sx) - jnp.sum(a)  # 1' K~ 1
    l1 = jnp.sum(sy * sy) - jnp.sum(b)
    kr = _mm(Xc, sx) - a  # K~ 1
    lr = _mm(Yc, sy) - b
    return tr + k1 * l1 / ((n - 1) * (n - 2)) - 2.0 * jnp.sum(kr * lr) / (n - 2)


def _debiased_linear_cka_core(X, Y):
    Xc = _unit_frobenius(_centre(X))
    Yc = _unit_frobenius(_centre(Y))
    xy = _linear_hsic_u_terms(Xc, Yc)
    xx = _linear_hsic_u_terms(Xc, Xc)
    yy = _linear_hsic_u_terms(Yc, Yc)
    den = xx * yy
    return jnp.where(den > 0, xy / jnp.sqrt(jnp.where(den > 0, den, 1.0)), 0.0)


def _debiased_cka_core(X, Y, kernel, threshold):
    if kernel == "linear":
        return _debiased_linear_cka_core(X, Y)
    if kernel == "linear_gram":
        Xc, Yc = _unit_frobenius(_centre(X)), _unit_frobenius(_centre(Y))
        return _debiased_from_grams(_mm(Xc, Xc.T), _mm(Yc, Yc.T))
    if kernel == "rbf":
        return _debiased_from_grams(_rbf_gram(_centre(X), threshold),
                                    _rbf_gram(_centre(Y), threshold))
    raise ValueError(f"debiased_cka: kernel must be 'linear' or 'rbf', got {kernel!r}.")


def _procrustes_core(X, Y):
    Xc = _unit_frobenius(_centre(X))
    Yc = _unit_frobenius(_centre(Y))
    nuc = jnp.sum(_svd(_mm(Xc.T, Yc), compute_uv=False))
    return jnp.maximum(2.0 - 2.0 * nuc, 0.0)


# ----------------------------------------------------------------------------- registry
def _core(method: str, **kw) -> Callable:
    """The unbatched core for ``method`` with its static options bound."""
    if method == "mean_cca":
        return functools.partial(_mean_cca_core, rtol=kw["rtol"])
    if method == "paper_cca":
        return functools.partial(_paper_cca_core, epsilon=kw["epsilon"], rtol=kw["rtol"])
    if method == "svcca":
        return functools.partial(_svcca_core, keep=kw["keep"], rtol=kw["rtol"])
    if method == "pwcca":
        return functools.partial(_pwcca_core, rtol=kw["rtol"])
    if method == "linear_cka":
        return _linear_cka_core
    if method == "rbf_cka":
        return functools.partial(_rbf_cka_core, threshold=kw["threshold"])
    if method == "debiased_cka":
        return functools.partial(_debiased_cka_core, kernel=kw["kernel"],
                                 threshold=kw["threshold"])
    if method == "procrustes":
        return _procrustes_core
    raise ValueError(f"Unknown similarity method {method!r}; choose one of {METHODS}.")


def _over_stack(fn: Callable) -> Callable:
    """Maps ``fn`` over the leading axis of its arguments.

    ``jax.vmap`` on accelerators (one batched kernel per op). On CPU a sequential
    ``lax.map`` instead: XLA:CPU can wedge (all workers idle, result never ready) when two
    *batched* LAPACK custom calls (the QR/SVD of X and of Y) run concurrently, seen with
    jax 0.10 on this machine; the per-pair loop avoids batched LAPACK and costs nothing on
    a CPU, which runs the pairs one after another anyway.
    """
    if jax.default_backend() == "cpu":
        return lambda *args: lax.map(lambda a: fn(*a), args)
    return jax.vmap(fn)


@functools.lru_cache(maxsize=None)
def _compiled(method: str, batched: bool, options: Tuple[Tuple[str, object], ...]):
    opts = dict(options)
    fn = _highest(_with_svd(_core(method, **opts), opts.get("svd", "default")))
    if batched:
        fn = _over_stack(fn)
    return jax.jit(fn)


def _options(method, X, rtol=None, epsilon=1e-12, keep=0.99, threshold=1.0,
             kernel="linear", svd="default"):
    check_svd_algorithm(svd)
    if rtol is None:
        rtol = default_rtol(X.dtype)
    if method == "svcca" and not 0.0 < keep <= 1.0:
        raise ValueError(f"svcca keep={keep} must be a variance fraction in (0, 1].")
    if method in ("rbf_cka",) or (method == "debiased_cka" and kernel == "rbf"):
        if threshold <= 0:
            raise ValueError(f"{method}: threshold={threshold} must be > 0.")
    return tuple(sorted(dict(rtol=float(rtol), epsilon=float(epsilon), keep=float(keep),
                             threshold=float(threshold), kernel=kernel, svd=svd).items()))


def similarity(X, Y, method: str = "mean_cca", *, route: str = "auto",
               names: Tuple[str, str] = ("X", "Y"), **options) -> jax.Array:
    """One similarity value between ``X`` (n, p) and ``Y`` (n, q); returns a scalar array.

    ``method`` is one of :data:`METHODS`; ``options`` are the keyword arguments of the
    corresponding public function (``rtol``, ``epsilon``, ``keep``, ``threshold``,
    ``kernel``). Procrustes is a *distance* (0 = identical up to rotation/scale).
    ``route`` picks the algorithm for the CCA family and linear CKA (:data:`ROUTES`,
    :func:`resolve_route`); ``names`` label X and Y in the NaN/inf error (e.g. layers).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown similarity method {method!r}; choose one of {METHODS}.")
    X, Y = _promote(_as_float(X), _as_float(Y))
    _check_pair(X, Y, method)
    check_finite(X, Y, names=names)
    opts = _options(method, X, **options)
    n, p, q = X.shape[0], X.shape[1], Y.shape[1]
    if resolve_route(route, method, n, p, q) == "covariance":  # unbatched: no stacked copy
        return jnp.asarray(_covariance_route(X, Y, method, dict(opts), batched=False)[0],
                           X.dtype)
    return _compiled(method, False, opts)(X, Y)


def similarity_batch(Xs, Ys, method: str = "mean_cca", *, route: str = "auto",
                     names: Tuple[str, str] = ("X", "Y"), labels: Optional[Sequence] = None,
                     **options) -> jax.Array:
    """``method`` on each pair of a stack: Xs (L, n, p), Ys (L, n, q) -> (L,), one compile.

    ``labels`` (L,) name each pair in the NaN/inf error (default: the pair's index).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown similarity method {method!r}; choose one of {METHODS}.")
    Xs, Ys = _promote(_as_float(Xs), _as_float(Ys))
    _check_pair(Xs, Ys, method, batched=True)
    check_finite(Xs, Ys, names=names, labels=labels)
    opts = _options(method, Xs, **options)
    n, p, q = Xs.shape[1], Xs.shape[2], Ys.shape[2]
    if resolve_route(route, method, n, p, q) == "covariance":
        return jnp.asarray(_covariance_route(Xs, Ys, method, dict(opts)), Xs.dtype)
    return _compiled(method, True, opts)(Xs, Ys)


def similarity_many(pairs: Sequence[Tuple[object, object]], method: str = "mean_cca", *,
                    labels: Optional[Sequence] = None, **options) -> np.ndarray:
    """``method`` on a list of (X_i, Y_i) pairs of any shapes -> float64 NumPy (len(pairs),).

    Pairs are grouped by (X.shape, Y.shape); each group is stacked and evaluated by one
    vmapped compiled call (e.g. 5 layers x 5 repeats of a network = 5 calls, or fewer
    when layers share a shape). ``labels`` name the pairs (layers) in errors.
    """
    groups: Dict[Tuple, List[int]] = {}
    for i, (X, Y) in enumerate(pairs):
        groups.setdefault((tuple(np.shape(X)), tuple(np.shape(Y))), []).append(i)
    out = np.zeros(len(pairs), np.float64)
    for _, idx in groups.items():
        Xs = jnp.stack([jnp.asarray(pairs[i][0]) for i in idx])
        Ys = jnp.stack([jnp.asarray(pairs[i][1]) for i in idx])
        lab = [labels[i] if labels is not None else i for i in idx]
        vals = np.asarray(similarity_batch(Xs, Ys, method, labels=lab, **options), np.float64)
        out[np.asarray(idx)] = vals
    return out


# ----------------------------------------------------------------------------- input checks
class NonFiniteActivationsError(ValueError):
    """Activations hold NaN or inf; every CCA/CKA value computed from them is meaningless."""


@jax.jit
def _nonfinite_counts(Xs, Ys):
    bad = lambda a: jnp.sum(~jnp.isfinite(a), axis=(-2, -1))  # noqa: E731
    return bad(Xs), bad(Ys)


def check_finite(Xs, Ys, *, names: Tuple[str, str] = ("X", "Y"),
                 labels: Optional[Sequence] = None) -> None:
    """Raises :class:`NonFiniteActivationsError` if a stack (L, n, p) / (L, n, q) (or one
    pair (n, p) / (n, q)) holds NaN or inf, naming the side, the pair (layer) and how many
    values are bad.

    Without it NaN silently became a similarity of 0 (the masked-rank logic reads a NaN
    spectrum as rank 0), indistinguishable from "no similarity".
    """
    if not (jnp.issubdtype(Xs.dtype, jnp.floating) and jnp.issubdtype(Ys.dtype, jnp.floating)):
        return
    bx, by = (np.atleast_1d(np.asarray(c)) for c in _nonfinite_counts(Xs, Ys))
    if not (bx.any() or by.any()):
        return
    size_x, size_y = Xs.shape[-2] * Xs.shape[-1], Ys.shape[-2] * Ys.shape[-1]
    problems = []
    for i in np.nonzero((bx > 0) | (by > 0))[0]:
        where = labels[i] if labels is not None else (f"pair {i}" if len(bx) > 1 else "")
        for side, counts, size in ((names[0], bx, size_x), (names[1], by, size_y)):
            if counts[i]:
                problems.append(f"{side}{' of ' + str(where) if where != '' else ''}: "
                                f"{int(counts[i])} of {size} values are NaN/inf")
    raise NonFiniteActivationsError(
        "activations are not finite (" + "; ".join(problems) + "). Check the model's "
        "weights and inputs (a diverged checkpoint, unnormalised images, bf16 overflow); "
        "similarities of non-finite activations are undefined.")


# ----------------------------------------------------------------------------- routes
ROUTES = ("auto", "qr", "covariance")
COVARIANCE_ROUTE_METHODS = _cov.COVARIANCE_METHODS
# Largest kept eigenvalue ratio of the equilibrated correlation matrices for which the
# float32 Gram is trusted; above it the blocks are re-formed in float64 (see module doc).
FLOAT32_GRAM_CONDITION_LIMIT = 1e3


def resolve_route(route: str, method: str, n: int, p: int, q: int,
                  backend: Optional[str] = None) -> str:
    """``'qr'`` or ``'covariance'`` for ``method`` on (n, p) / (n, q) data.

    ``auto``: the covariance route on CPU when n >= 4 max(p, q) (there one float32 GEMM
    per block plus a float64 p x p problem beats float32 QR, whose LAPACK cost is ~4 n p^2
    with poor threading); the QR route on accelerators (batched QR/SVD stay on device and
    float64 is slow or absent there) and for small n, where the p^3 host work dominates.
    Methods without a covariance form always take their kernel; so does linear CKA under
    ``auto``: its kernel is already three GEMMs on the device, and finishing on the host
    only adds the transfer (measured 0.33 s vs 0.47 s at 512 x 10k on this CPU).
    """
    if route not in ROUTES:
        raise ValueError(f"route={route!r}: choose one of {ROUTES}.")
    if method not in COVARIANCE_ROUTE_METHODS:
        if route == "covariance":
            raise ValueError(f"route='covariance' supports {COVARIANCE_ROUTE_METHODS}; "
                             f"{method} has no covariance form (use route='auto').")
        return "qr"
    if route != "auto":
        return route
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return "qr"
    if method == "linear_cka":  # its jitted kernel already is the feature-space GEMM form
        return "qr"
    return "covariance" if n >= 4 * max(p, q) else "qr"


@functools.lru_cache(maxsize=None)
def _grams_fn(batched: bool = True):
    """Jitted (L, n, p), (L, n, q) -> equilibrated Grams (L, p, p), (L, p, q), (L, q, q)
    and column norms (L, p), (L, q) of the scaled, centred data: three GEMMs, no LAPACK.
    ``batched=False``: one pair (n, p), (n, q) with the same outputs less the L axis."""
    def grams(X, Y):
        Xc, Yc = _centre(X), _centre(Y)
        dx = jnp.sqrt(jnp.sum(Xc * Xc, axis=0))
        dy = jnp.sqrt(jnp.sum(Yc * Yc, axis=0))
        Xe, Ye = _equilibrate(Xc), _equilibrate(Yc)
        return _mm(Xe.T, Xe), _mm(Xe.T, Ye), _mm(Ye.T, Ye), dx, dy
    fn = _highest(grams)
    return jax.jit(jax.vmap(fn) if batched else fn)


def _covariances(gxx, gxy, gyy, dx, dy, n) -> _cov.Covariances:
    """Float64 covariance blocks D G D / (n - 1) from equilibrated Grams and norms."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    dx, dy = f(dx), f(dy)
    sym = lambda a: 0.5 * (a + a.T)  # noqa: E731
    return _cov.Covariances(n, np.zeros(dx.size), np.zeros(dy.size),
                            sym(f(gxx)) * np.outer(dx, dx) / (n - 1),
                            sym(f(gyy)) * np.outer(dy, dy) / (n - 1),
                            f(gxy) * np.outer(dx, dy) / (n - 1))


def _covariance_route(Xs, Ys, method: str, opts: dict, batched: bool = True) -> np.ndarray:
    """The covariance route for a stack (or one pair, ``batched=False``): Grams by GEMM on
    the device (float32), then each p x p problem in float64 on the host; pairs whose
    correlation matrices are worse conditioned than FLOAT32_GRAM_CONDITION_LIMIT are
    re-formed from the data in float64."""
    n = Xs.shape[-2]
    kw = dict(rtol=opts["rtol"], epsilon=opts["epsilon"], keep=opts["keep"])
    blocks = [np.asarray(b) for b in _grams_fn(batched)(Xs, Ys)]
    if not batched:
        blocks, Xs, Ys = [b[None] for b in blocks], [Xs], [Ys]
    out = np.zeros(len(blocks[0]))
    for i in range(len(out)):
        cov = _covariances(*(b[i] for b in blocks), n)
        out[i], cond = _cov.similarity_from_covariance(cov, method, return_condition=True,
                                                       **kw)
        if cond > FLOAT32_GRAM_CONDITION_LIMIT:
            cov = _cov.covariance_from_data(np.asarray(Xs[i]), np.asarray(Ys[i]))
            out[i] = _cov.similarity_from_covariance(cov, method, **kw)
    return out


def _promote(X, Y):
    dt = jnp.promote_types(X.dtype, Y.dtype)
    return X.astype(dt), Y.astype(dt)


# ----------------------------------------------------------------------------- public API
def cca_correlations(X, Y, *, rtol: Optional[float] = None) -> Tuple[jax.Array, jax.Array]:
    """Canonical correlations of X (n, p) and Y (n, q).

    Returns:
      (rho, k): ``rho`` (min(p, q),) in descending order, zero beyond ``k`` =
      min(numerical rank of X, of Y) (an int32 scalar).
    """
    X, Y = _promote(_as_float(X), _as_float(Y))
    _check_pair(X, Y, "mean_cca")
    check_finite(X, Y)
    rtol = default_rtol(X.dtype) if rtol is None else float(rtol)
    return _cca_corr_jit(X, Y, rtol)


@functools.partial(jax.jit, static_argnames=("rtol",))
@_highest
def _cca_corr_jit(X, Y, rtol):
    return _cca_core(X, Y, rtol)


def cca_correlations_batch(Xs, Ys, *, rtol: Optional[float] = None):
    """Batched :func:`cca_correlations`: (L, n, p), (L, n, q) -> ((L, m), (L,))."""
    Xs, Ys = _promote(_as_float(Xs), _as_float(Ys))
    _check_pair(Xs, Ys, "mean_cca", batched=True)
    check_finite(Xs, Ys)
    rtol = default_rtol(Xs.dtype) if rtol is None else float(rtol)
    return _cca_corr_batch_jit(Xs, Ys, rtol)


@functools.partial(jax.jit, static_argnames=("rtol",))
@_highest
def _cca_corr_batch_jit(Xs, Ys, rtol):
    return _over_stack(functools.partial(_cca_core, rtol=rtol))(Xs, Ys)


def mean_cca(X, Y, *, rtol: Optional[float] = None) -> jax.Array:
    """Mean of the k = min(rank_x, rank_y) canonical correlations of X (n,p), Y (n,q)."""
    return similarity(X, Y, "mean_cca", rtol=rtol)


def svcca_paper_cca(X, Y, *, epsilon: float = 1e-12, rtol: Optional[float] = None):
    """Mean CCA exactly as the Revisiting study computed it, stably.

    Semantics of google/svcca ``np.mean(get_cca_similarity(x.T, y.T, epsilon)["cca_coef1"])``:
    neurons whose variance is < ``epsilon`` x the layer's largest variance are dropped,
    and the mean runs over all ``min(kept_x, kept_y)`` canonical correlations (no 0.98
    threshold). Directions below float32 numerical rank (``rtol``) count as correlation 0,
    as the epsilon-regularised float64 whitening makes them. X (n, p), Y (n, q) -> scalar.
    """
    return similarity(X, Y, "paper_cca", epsilon=epsilon, rtol=rtol)


def svcca(X, Y, *, keep: float = 0.99, rtol: Optional[float] = None) -> jax.Array:
    """SVCCA (Raghu et al. 2017): keep each side's leading singular directions that explain
    ``keep`` of its variance, then mean CCA of the reduced sides. X (n,p), Y (n,q)."""
    return similarity(X, Y, "svcca", keep=keep, rtol=rtol)


def pwcca(X, Y, *, rtol: Optional[float] = None) -> jax.Array:
    """Projection-weighted CCA (Morcos et al. 2018), weighted by X's canonical variates.

    weight_i = sum_j |<h_i, x_j>| (h_i the i-th unit canonical variate of X, x_j centred
    neuron j of X), normalised; PWCCA = sum_i weight_i rho_i. Not symmetric: pass (Y, X)
    to weight by Y (svcca's pwcca.py weights by the layer with fewer neurons).
    """
    return similarity(X, Y, "pwcca", rtol=rtol)


def linear_cka(X, Y) -> jax.Array:
    """Linear CKA (Kornblith et al. 2019): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    return similarity(X, Y, "linear_cka")


def rbf_cka(X, Y, *, threshold: float = 1.0) -> jax.Array:
    """RBF-kernel CKA; sigma^2 = threshold^2 * median squared pairwise distance. O(n^2) memory."""
    return similarity(X, Y, "rbf_cka", threshold=threshold)


def debiased_cka(X, Y, *, kernel: str = "linear", threshold: float = 1.0) -> jax.Array:
    """CKA from the unbiased HSIC estimator (Song et al. 2012), for small n.

    ``kernel='linear'`` works in feature space (O(n p q), no n x n matrix);
    ``'rbf'`` U-centres the n x n Gram matrices. Needs n >= 4.
    """
    return similarity(X, Y, "debiased_cka", kernel=kernel, threshold=threshold)


def procrustes_distance(X, Y) -> jax.Array:
    """Orthogonal Procrustes distance (Ding et al. 2021) of centred, unit-Frobenius X, Y:
    ``2 - 2 ||Xc^T Yc||_*`` in [0, 2]; 0 iff Y is a rotation/reflection + scaling of X."""
    return similarity(X, Y, "procrustes")


#: method name -> its public kernel function ``(X, Y, **options) -> scalar``.
KERNELS: Dict[str, Callable] = {m: globals()[s.kernel] for m, s in REGISTRY.items()}
