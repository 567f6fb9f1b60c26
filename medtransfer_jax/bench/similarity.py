"""Similarity kernels on device vs a float64 NumPy reference; two-network comparison end to end.

``run`` times the jitted kernel of analysis/similarity.py and, in the same process on the
same data, an independent float64 NumPy implementation of the same method written the
google/svcca way (covariance matrices, epsilon-regularised inverse square roots from an
eigendecomposition, SVD of the whitened cross-covariance). Every row therefore carries a
speed ratio *and* a correctness check (``abs_diff`` between the two values).

The NumPy side accumulates the p x p cross-product matrices over row chunks in float64,
so it never holds a float64 copy of the (n, p) activations: n = 200k, p = 2048 needs
the 2 x 1.6 GB float32 inputs plus O(p^2) on the host.

``run_network`` times the Revisiting study's CCA protocol (analysis/compare.py) between
two randomly initialised ResNets, split into activation extraction and similarity.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from medtransfer_jax.analysis import activations as act
from medtransfer_jax.analysis import compare
from medtransfer_jax.analysis import similarity as sim
from medtransfer_jax.analysis import streaming
from medtransfer_jax.bench import common
from medtransfer_jax.models import resnet
from medtransfer_jax.weights.checkpoint import WeightsMetadata

# Methods with a NumPy reference below. rbf_cka has none: it needs n x n Gram matrices
# (80 GB in float64 at n = 100k), so only its device time is reported.
NUMPY_METHODS = ("mean_cca", "paper_cca", "svcca", "pwcca", "linear_cka", "debiased_cka",
                 "procrustes")

COLUMNS = ["method", "p", "n", "jax_s", "compile_s", "numpy_s", "speedup", "value",
           "abs_diff", "note"]

# svcca's epsilon: 1e-10 as in its tutorials; paper_cca uses the study's 1e-12.
EPSILON = 1e-10
CHUNK_ROWS = 16384


# ----------------------------------------------------------------------------- data
def make_data(n: int, p: int, q: Optional[int] = None, *, shared: int = 8,
              seed: int = 0) -> tuple:
    """Float32 X (n, p), Y (n, q) = X A + noise with rank(A) = ``shared``.

    X has a decaying spectrum (condition ~20) and an offset, so centring and SVCCA's 99%
    cut both matter; Y shares a few strong directions with X, the rest is noise, so the
    canonical correlations range from ~1 down to the sqrt(p/n) noise floor.
    """
    q = p if q is None else q
    rng = np.random.default_rng(seed)
    k = max(1, min(shared, p, q))
    scale = np.exp(-3.0 * np.arange(p) / p).astype(np.float32)
    A = (rng.standard_normal((p, k)) @ rng.standard_normal((k, q))
         / math.sqrt(p * k)).astype(np.float32)
    X = np.empty((n, p), np.float32)
    Y = np.empty((n, q), np.float32)
    for s in range(0, n, CHUNK_ROWS):  # chunked: no (n, p) temporaries at n = 200k
        e = min(n, s + CHUNK_ROWS)
        X[s:e] = rng.standard_normal((e - s, p), dtype=np.float32) * scale + 1.0
        Y[s:e] = X[s:e] @ A + rng.standard_normal((e - s, q), dtype=np.float32)
    return X, Y


# ----------------------------------------------------------------------------- NumPy reference
def moments(X, Y, *, rows: bool = False, chunk: int = CHUNK_ROWS) -> Dict[str, Any]:
    """Centred cross-products Xc^T Xc, Xc^T Yc, Yc^T Yc in float64, two passes over chunks.

    ``rows=True`` also sums the per-datapoint squared norms that debiased CKA needs.
    """
    n, p, q = X.shape[0], X.shape[1], Y.shape[1]
    mx, my = np.zeros(p), np.zeros(q)
    for s in range(0, n, chunk):
        mx += X[s:s + chunk].sum(0, dtype=np.float64)
        my += Y[s:s + chunk].sum(0, dtype=np.float64)
    mx /= n
    my /= n
    cxx, cxy, cyy = np.zeros((p, p)), np.zeros((p, q)), np.zeros((q, q))
    sa = sb = sab = saa = sbb = 0.0
    for s in range(0, n, chunk):
        a = X[s:s + chunk].astype(np.float64) - mx
        b = Y[s:s + chunk].astype(np.float64) - my
        cxx += a.T @ a
        cxy += a.T @ b
        cyy += b.T @ b
        if rows:
            ra, rb = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
            sa, sb = sa + ra.sum(), sb + rb.sum()
            sab, saa, sbb = sab + ra @ rb, saa + ra @ ra, sbb + rb @ rb
    return dict(n=n, cxx=cxx, cxy=cxy, cyy=cyy, sa=sa, sb=sb, sab=sab, saa=saa, sbb=sbb)


def _inv_sqrt(A, epsilon):
    """(A + eps I)^(-1/2) by eigendecomposition (svcca: pinv, then matrix sqrt)."""
    w, V = np.linalg.eigh(A + epsilon * np.eye(A.shape[0]))
    return (V / np.sqrt(np.maximum(w, epsilon))) @ V.T


def cov_cca(cxx, cxy, cyy, epsilon: float = EPSILON):
    """svcca ``cca_core.get_cca_similarity`` on given cross-products.

    Rescales by the largest covariance entry, drops neurons whose rescaled variance is
    < epsilon, whitens with (S + eps I)^(-1/2) and takes the SVD. Returns
    (rho, u, Wx, kept_x) with rho of length min(kept_x, kept_y).
    """
    xmax, ymax = np.abs(cxx).max(), np.abs(cyy).max()
    if xmax == 0 or ymax == 0:
        return np.zeros(0), None, None, np.zeros(cxx.shape[0], bool)
    sxx, syy, sxy = cxx / xmax, cyy / ymax, cxy / np.sqrt(xmax * ymax)
    ix, iy = np.abs(np.diag(sxx)) >= epsilon, np.abs(np.diag(syy)) >= epsilon
    sxx, syy, sxy = sxx[ix][:, ix], syy[iy][:, iy], sxy[ix][:, iy]
    wx, wy = _inv_sqrt(sxx, epsilon), _inv_sqrt(syy, epsilon)
    u, rho, _ = np.linalg.svd(wx @ sxy @ wy)
    m = min(sxx.shape[0], syy.shape[0])
    return np.abs(rho[:m]), u, wx, ix


def _reduce_99(cxx, keep):
    """SVD reduction of one side in covariance form: eigenvectors of Xc^T Xc are the right
    singular vectors of Xc (eigenvalues = s^2), so the top-d projection needs no (n, p) SVD.
    Returns (V_d, eigenvalues_d)."""
    w, V = np.linalg.eigh(cxx)
    w, V = np.maximum(w[::-1], 0.0), V[:, ::-1]
    frac = np.cumsum(w) / max(w.sum(), np.finfo(np.float64).tiny)
    d = int(np.searchsorted(frac, keep)) + 1  # fewest directions reaching `keep`
    return V[:, :d], w[:d]


def numpy_similarity(X, Y, method: str, *, keep: float = 0.99,
                     epsilon: Optional[float] = None) -> float:
    """float64 NumPy value of ``method`` for X (n, p), Y (n, q), svcca-style formulas."""
    if method not in NUMPY_METHODS:
        raise ValueError(f"No NumPy reference for {method!r}; available: {NUMPY_METHODS}.")
    if epsilon is None:
        epsilon = 1e-12 if method == "paper_cca" else EPSILON
    m = moments(X, Y, rows=method == "debiased_cka")
    cxx, cxy, cyy, n = m["cxx"], m["cxy"], m["cyy"], m["n"]
    if method in ("mean_cca", "paper_cca"):
        rho = cov_cca(cxx, cxy, cyy, epsilon)[0]
        return float(rho.mean()) if rho.size else 0.0
    if method == "svcca":
        vx, wx = _reduce_99(cxx, keep)
        vy, wy = _reduce_99(cyy, keep)
        rho = cov_cca(np.diag(wx), vx.T @ cxy @ vy, np.diag(wy), epsilon)[0]
        return float(rho.mean()) if rho.size else 0.0
    if method == "pwcca":
        # Morcos et al. 2018: weight rho_i by sum_j |<h_i, x_j>| over X's neurons, h_i the
        # unit-norm canonical variate Xc a_i; all inner products come from Xc^T Xc.
        rho, u, wx, ix = cov_cca(cxx, cxy, cyy, epsilon)
        if not rho.size:
            return 0.0
        c = cxx[ix][:, ix]
        a = wx @ u[:, :rho.size]  # canonical weights (any per-column scale cancels)
        proj = a.T @ c  # (m, p): <Xc a_i, x_j>
        norms = np.sqrt(np.maximum(np.einsum("ij,ij->j", a, c @ a), 0.0))
        alpha = np.abs(proj).sum(1) / np.where(norms > 0, norms, 1.0)
        return float(alpha @ rho / alpha.sum()) if alpha.sum() > 0 else 0.0
    if method == "linear_cka":
        den = np.linalg.norm(cxx) * np.linalg.norm(cyy)
        return float(np.sum(cxy ** 2) / den) if den > 0 else 0.0
    if method == "debiased_cka":
        # Unbiased HSIC (Song et al. 2012) of linear kernels in feature space: with centred
        # data K~1 = -diag(K), so every term is a Frobenius norm or a row-norm sum.
        def hsic(c2, s_ab, s_a, s_b):
            return c2 - s_ab + s_a * s_b / ((n - 1) * (n - 2)) - 2.0 * s_ab / (n - 2)
        xy = hsic(np.sum(cxy ** 2), m["sab"], m["sa"], m["sb"])
        xx = hsic(np.sum(cxx ** 2), m["saa"], m["sa"], m["sa"])
        yy = hsic(np.sum(cyy ** 2), m["sbb"], m["sb"], m["sb"])
        return float(xy / np.sqrt(xx * yy)) if xx * yy > 0 else 0.0
    # procrustes: 2 - 2 ||Xc^T Yc||_* / (||Xc||_F ||Yc||_F)
    den = np.sqrt(np.trace(cxx) * np.trace(cyy))
    nuc = np.linalg.svd(cxy, compute_uv=False).sum()
    return float(max(2.0 - 2.0 * nuc / den, 0.0)) if den > 0 else 2.0


# ----------------------------------------------------------------------------- timing
def time_jax(X, Y, method: str, *, repeats: int = 2, min_window_s: float = 0.2,
             **options) -> Dict[str, float]:
    """Steady-state seconds per call of ``similarity(X, Y, method)``, compile separately.

    ``X``/``Y`` should already be on device (transfer is not the kernel's cost).
    compile_s = first call - steady call (trace + XLA compile). Fast kernels are called
    several times per window so dispatch jitter does not dominate.
    """
    def fn():
        return sim.similarity(X, Y, method, **options)

    sync = lambda v: v.block_until_ready()  # noqa: E731
    probe = common.time_fn(fn, iters=1, repeats=1, sync=sync)
    iters = int(min(50, max(1, min_window_s // max(probe["median_s"], 1e-6))))
    t = common.time_fn(fn, iters=iters, repeats=max(1, repeats), sync=sync)
    return dict(jax_s=t["median_s"], compile_s=max(probe["first_s"] - probe["median_s"], 0.0),
                value=float(fn()))


STREAMING_PREFIX = "streaming:"


def time_streaming(X, Y, method: str, *, repeats: int = 2, chunk: int = 20000
                   ) -> Dict[str, float]:
    """Seconds of the streaming route: covariances accumulated on device chunk by chunk
    (analysis/streaming.py), finished in float64 on the host. Compile = first - steady."""
    def fn():
        state = streaming.init_covariance(X.shape[1], Y.shape[1])
        for i in range(0, X.shape[0], chunk):
            state = streaming.update_covariance(state, X[i:i + chunk], Y[i:i + chunk])
        return streaming.similarity_from_covariance(streaming.finish_covariance(state), method)

    probe = common.time_fn(fn, iters=1, repeats=1)
    t = common.time_fn(fn, iters=1, repeats=max(1, repeats))
    return dict(jax_s=t["median_s"], compile_s=max(probe["first_s"] - t["median_s"], 0.0),
                value=float(fn()))


def time_numpy(X, Y, method: str, *, repeats: int = 2) -> Dict[str, float]:
    """Median seconds of :func:`numpy_similarity` (host float32 in, float64 throughout)."""
    times, value = [], float("nan")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        value = numpy_similarity(X, Y, method)
        times.append(time.perf_counter() - t0)
    return dict(numpy_s=statistics.median(times), value=value)


def run(neurons: Sequence[int] = (512, 1024, 2048), datapoints: Sequence[int] = (10000, 50000),
        methods: Sequence[str] = ("mean_cca", "svcca", "pwcca", "linear_cka"),
        repeats: int = 2, *, seed: int = 0, compare_numpy: bool = True) -> List[Dict[str, Any]]:
    """One row per (neurons p = q, datapoints n, method): device vs NumPy in the same run."""
    bad = [m for m in methods if m not in sim.METHODS and not (
        m.startswith(STREAMING_PREFIX)
        and m[len(STREAMING_PREFIX):] in streaming.COVARIANCE_METHODS)]
    if bad:
        raise ValueError(f"Unknown method(s) {bad}; choose from {sim.METHODS} or "
                         f"{STREAMING_PREFIX}<one of {streaming.COVARIANCE_METHODS}>.")
    nan = float("nan")
    rows = []
    for p in neurons:
        for n in datapoints:
            X, Y = make_data(n, p, seed=seed)
            Xd, Yd = jax.device_put(X), jax.device_put(Y)
            for m in methods:
                row = dict(method=m, p=p, n=n, jax_s=nan, compile_s=nan, numpy_s=nan,
                           speedup=nan, value=nan, abs_diff=nan, note="")
                base = m[len(STREAMING_PREFIX):] if m.startswith(STREAMING_PREFIX) else m
                if base in sim.CCA_FAMILY and n <= p:
                    row["note"] = "skipped: CCA needs n > p"
                else:
                    if base != m:
                        j = time_streaming(Xd, Yd, base, repeats=repeats)
                        m = base  # the NumPy reference of the same measure
                    else:
                        j = time_jax(Xd, Yd, m, repeats=repeats)
                    row.update(jax_s=j["jax_s"], compile_s=j["compile_s"], value=j["value"])
                    if not compare_numpy:
                        row["note"] = "NumPy not run"
                    elif m in NUMPY_METHODS:
                        r = time_numpy(X, Y, m, repeats=repeats)
                        row.update(numpy_s=r["numpy_s"], speedup=r["numpy_s"] / j["jax_s"],
                                   abs_diff=abs(r["value"] - j["value"]))
                    else:
                        row["note"] = "no NumPy reference (O(n^2) Gram)"
                rows.append(row)
                print(common.format_table([row], COLUMNS).splitlines()[-1], flush=True)
            del Xd, Yd
    return rows


# ----------------------------------------------------------------------------- two networks
def random_model(depth: int, width: int, seed: int, *, image_size: int = 224,
                 preprocessing: str = "caffe", name: Optional[str] = None) -> act.LoadedModel:
    """A :class:`activations.LoadedModel` with random weights, built in memory (no disk)."""
    model = resnet.ResNet(depth=depth, width=width, num_classes=None)
    meta = WeightsMetadata(source="random", layout="keras_v1", depth=depth, width=width,
                           preprocessing=preprocessing, image_size=image_size)
    # On the device, as activations.load_model leaves a loaded checkpoint.
    return act.LoadedModel(model, jax.device_put(resnet.random_variables(model, seed)), meta,
                           name or f"random{seed}")


def run_network(num_images: int = 1000, image_size: int = 224, depth: int = 50,
                width: int = 64, *, protocol: Optional[compare.PaperCCAProtocol] = None,
                seed: int = 0) -> List[Dict[str, Any]]:
    """Paper-protocol CCA of every ResNet stage between two random networks on random images.

    Rows: per-layer similarity seconds and values, then the warm run split into activation
    extraction (forward passes), similarity and the rest, then the end-to-end call warm and
    cold (compiles included). The split repeats compare_networks' own steps and its values
    must equal the end-to-end ones (checked), so the parts measure the same work.
    """
    protocol = protocol or compare.PaperCCAProtocol()
    a = random_model(depth, width, seed, image_size=image_size, name="random_a")
    b = random_model(depth, width, seed + 1, image_size=image_size, preprocessing="unit",
                     name="random_b")
    images = np.random.default_rng(seed).integers(0, 256, (num_images, image_size,
                                                            image_size, 3), dtype=np.uint8)

    t0 = time.perf_counter()
    compare.run_paper_protocol(a, b, images, protocol)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = compare.run_paper_protocol(a, b, images, protocol)
    warm_s = time.perf_counter() - t0

    layers = tuple(protocol.layers or resnet.stage_output_names(depth))
    shapes = act.layer_shapes(a, image_size, layers)
    draws = compare.make_plan(shapes, num_images, positions=protocol.positions,
                              num_channels=protocol.num_channels, repeats=protocol.repeats,
                              seed=protocol.seed)
    t0 = time.perf_counter()
    pairs = compare.collect_draws(a, b, images, draws, batch_size=protocol.batch_size)
    jax.block_until_ready(pairs)
    extract_s = time.perf_counter() - t0
    forwarded = sum(len(np.unique(np.concatenate([d.images for d in draws if d.repeat == r])))
                    for r in range(protocol.repeats))

    by_layer = {r["layer"]: r for r in result}
    rows, sim_total = [], 0.0
    for layer in layers:
        idx = [i for i, d in enumerate(draws) if d.layer == layer]
        t0 = time.perf_counter()
        vals = sim.similarity_many([pairs[i] for i in idx], protocol.method,
                                   epsilon=protocol.epsilon)
        dt = time.perf_counter() - t0
        sim_total += dt
        want = by_layer[layer]["values"]
        if not np.allclose(vals, want, atol=1e-6):
            raise RuntimeError(f"{layer}: split run gave {vals}, end to end {want}; the "
                               "breakdown no longer mirrors compare_networks.")
        rows.append(dict(what="similarity", layer=layer, seconds=dt,
                         images=len(draws[idx[0]].images),
                         datapoints=by_layer[layer]["datapoints"],
                         channels=by_layer[layer]["channels"],
                         value=by_layer[layer]["value"], note=""))
    setup = (f"ResNet{depth} w{width} {image_size}px, {protocol.method}, "
             f"{protocol.repeats} repeats, {protocol.positions} positions")
    total = dict(layer=f"all {len(layers)}", images=num_images, datapoints="", channels="",
                 value="")
    rows += [
        dict(total, what="extract (warm)", seconds=extract_s, images=forwarded,
             note="forward passes per network"),
        dict(total, what="similarity (warm)", seconds=sim_total, note="sum over layers"),
        dict(total, what="other (warm)", seconds=warm_s - extract_s - sim_total,
             note="shape tracing, planning, host work"),
        dict(total, what="end to end (warm)", seconds=warm_s, note=setup),
        dict(total, what="end to end (first, incl. compile)", seconds=first_s, note=setup),
    ]
    return rows
