"""Similarity kernels vs the google/svcca NumPy algorithm; two-network comparison end to end.

``run`` times :func:`similarity.similarity` (``route`` auto / qr / covariance) and, in the
same process on the same data, the **google/svcca algorithm in NumPy float64** — the code
a CPU user would otherwise run — re-implemented from its description (cca_core.py
``get_cca_similarity``: ``np.cov`` of the stacked (neurons, datapoints) activations,
max-rescaling, pruning of neurons with variance < epsilon, ``+ epsilon I``, ``pinv``,
matrix square root by ``eigh``, SVD of the whitened cross-covariance; SVCCA = SVD of the
centred activations, keep 99% of the variance, then that CCA; PWCCA = Morcos et al.'s
projection weighting through the canonical variates, with the two known bugs of
``pwcca.py`` fixed (the whitening is applied to the directions and the projections use
centred activations), so its value is the quantity our kernel computes; linear CKA =
Kornblith et al.'s ``feature_space_linear_cka`` in float64). Every row carries the speed
ratio *and* ``abs_diff`` between the two values.

Timings are interleaved (kernel, baseline, kernel, baseline, ...) and the fastest call of
each side is compared, so a background load that comes and goes hits both sides alike
and only ever adds time.

``run_network`` times the Revisiting study's CCA protocol (analysis/compare.py) between
two randomly initialised ResNets, split into activation extraction and similarity.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from medtransfer_jax.inference import activations as act
from medtransfer_jax.analysis import compare
from medtransfer_jax.analysis import similarity as sim
from medtransfer_jax.analysis import streaming
from medtransfer_jax.bench import common
from medtransfer_jax.errors import UserError
from medtransfer_jax.models import resnet
from medtransfer_jax.ticker import Ticker
from medtransfer_jax.weights.checkpoint import WeightsMetadata

# Methods with a google/svcca-style NumPy baseline (svcca has no CKA; Kornblith's colab
# is the linear-CKA baseline). Others are timed on device only.
BASELINE_METHODS = ("mean_cca", "paper_cca", "svcca", "pwcca", "linear_cka")

COLUMNS = ["method", "route", "svd", "p", "n", "jax_s", "compile_s", "numpy_s", "speedup",
           "value", "abs_diff", "diff_vs_default", "note"]

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


# ----------------------------------------------------------------------------- svcca baseline
def _psd_sqrt(a):
    """svcca positivedef_matrix_sqrt: V sqrt(w) V^T from eigh."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def svcca_cca(acts1, acts2, epsilon: float = EPSILON) -> Dict[str, Any]:
    """google/svcca ``get_cca_similarity`` core on (neurons, datapoints) arrays, float64.

    Returns {'s': correlations (min(kept_x, kept_y),), 'u', 'invsqrt_xx', 'x_idxs'}.
    """
    numx = acts1.shape[0]
    cov = np.cov(acts1, acts2)
    sxx, sxy, syy = cov[:numx, :numx], cov[:numx, numx:], cov[numx:, numx:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    if xmax == 0 or ymax == 0:
        return dict(s=np.zeros(0), u=None, invsqrt_xx=None, x_idxs=np.zeros(numx, bool))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    ix, iy = np.abs(np.diag(sxx)) >= epsilon, np.abs(np.diag(syy)) >= epsilon
    sxx, syy, sxy = sxx[ix][:, ix], syy[iy][:, iy], sxy[ix][:, iy]
    if not ix.any() or not iy.any():
        return dict(s=np.zeros(0), u=None, invsqrt_xx=None, x_idxs=ix)
    isx = _psd_sqrt(np.linalg.pinv(sxx + epsilon * np.eye(len(sxx))))
    isy = _psd_sqrt(np.linalg.pinv(syy + epsilon * np.eye(len(syy))))
    u, s, _ = np.linalg.svd(isx @ sxy @ isy)
    return dict(s=np.abs(s), u=u, invsqrt_xx=isx, x_idxs=ix)


def _svd_reduce(acts, keep):
    """SVCCA step 1 (svcca tutorial): SVD of the centred activations, keep the leading
    directions explaining ``keep`` of the variance: (d, datapoints)."""
    cacts = acts - acts.mean(axis=1, keepdims=True)
    _, s, v = np.linalg.svd(cacts, full_matrices=False)
    frac = np.cumsum(s ** 2) / np.sum(s ** 2)
    d = int(np.searchsorted(frac, keep)) + 1
    return s[:d, None] * v[:d]


def svcca_baseline(X, Y, method: str, *, keep: float = 0.99,
                   epsilon: Optional[float] = None) -> float:
    """The NumPy float64 value of ``method`` the google/svcca way; X (n, p), Y (n, q)."""
    if method not in BASELINE_METHODS:
        raise ValueError(f"No NumPy baseline for {method!r}; available: {BASELINE_METHODS}.")
    if method == "linear_cka":  # Kornblith et al.'s feature_space_linear_cka
        x = np.asarray(X, np.float64)
        y = np.asarray(Y, np.float64)
        x, y = x - x.mean(0), y - y.mean(0)
        den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
        return float(np.linalg.norm(x.T @ y) ** 2 / den) if den > 0 else 0.0
    eps = (1e-12 if method == "paper_cca" else EPSILON) if epsilon is None else epsilon
    a1, a2 = np.asarray(X).T, np.asarray(Y).T  # svcca layout: (neurons, datapoints)
    if method == "svcca":
        a1 = _svd_reduce(a1.astype(np.float64), keep)
        a2 = _svd_reduce(a2.astype(np.float64), keep)
    r = svcca_cca(a1, a2, eps)
    s = r["s"]
    if not s.size:
        return 0.0
    if method != "pwcca":
        return float(s.mean())
    ix = r["x_idxs"]
    cacts = a1[ix].astype(np.float64)
    cacts -= cacts.mean(axis=1, keepdims=True)
    dirns = (r["u"][:, :s.size].T @ r["invsqrt_xx"]) @ cacts  # canonical variates of X
    P, _ = np.linalg.qr(dirns.T)
    weights = np.sum(np.abs(P.T @ cacts.T), axis=1)
    return float(np.sum(weights * s) / weights.sum())


# ----------------------------------------------------------------------------- timing
def _jax_call(X, Y, method, route, svd="default"):
    if method.startswith(STREAMING_PREFIX):
        base = method[len(STREAMING_PREFIX):]

        def fn():
            state = streaming.init_covariance(X.shape[1], Y.shape[1])
            for i in range(0, X.shape[0], 20000):
                state = streaming.update_covariance(state, X[i:i + 20000], Y[i:i + 20000])
            return streaming.similarity_from_covariance(streaming.finish_covariance(state),
                                                        base)
        return fn
    return lambda: float(sim.similarity(X, Y, method, route=route, svd=svd))


def time_pair(X, Y, Xd, Yd, method: str, route: str = "auto", *, repeats: int = 3,
              baseline: bool = True, svd: str = "default") -> Dict[str, float]:
    """Interleaved timings of the kernel (device arrays Xd, Yd) and the NumPy baseline
    (host X, Y): the fastest of ``repeats`` calls each, compile timed separately."""
    fn = _jax_call(Xd, Yd, method, route, svd)
    t0 = time.perf_counter()
    value = fn()
    first = time.perf_counter() - t0
    base = method[len(STREAMING_PREFIX):] if method.startswith(STREAMING_PREFIX) else method
    jt, nt, ref = [], [], float("nan")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        value = fn()
        jt.append(time.perf_counter() - t0)
        if baseline and base in BASELINE_METHODS:
            t0 = time.perf_counter()
            ref = svcca_baseline(X, Y, base)
            nt.append(time.perf_counter() - t0)
    # The minimum of interleaved calls: background load only ever adds time, so on a
    # shared machine the fastest call is the best estimate of each side's own cost.
    jax_s = min(jt)
    return dict(jax_s=jax_s, compile_s=max(first - statistics.median(jt), 0.0),
                value=float(value), numpy_s=min(nt) if nt else float("nan"), ref=ref)


STREAMING_PREFIX = "streaming:"


def check_methods(methods: Sequence[str], *, flag: str = "methods",
                  streaming_ok: bool = True) -> None:
    """UserError unless every method is in the similarity registry or (``streaming_ok``)
    is ``streaming:<a covariance method>``; checked before any data is made."""
    bad = [m for m in methods if m not in sim.METHODS and not (
        streaming_ok and m.startswith(STREAMING_PREFIX)
        and m[len(STREAMING_PREFIX):] in streaming.COVARIANCE_METHODS)]
    if bad or not methods:
        also = (f" or {STREAMING_PREFIX}<one of {', '.join(streaming.COVARIANCE_METHODS)}>"
                if streaming_ok else "")
        raise UserError(f"{flag}: unknown method(s) {bad or '(none given)'}; choose from "
                        f"{', '.join(sim.METHODS)}{also}")


def run(neurons: Sequence[int] = (512, 1024, 2048), datapoints: Sequence[int] = (10000, 50000),
        methods: Sequence[str] = ("mean_cca", "svcca", "pwcca", "linear_cka"),
        repeats: int = 3, *, routes: Sequence[str] = ("auto",), seed: int = 0,
        compare_numpy: bool = True,
        svd_algorithms: Sequence[str] = ("default",)) -> List[Dict[str, Any]]:
    """One row per (neurons p = q, datapoints n, method, route, SVD algorithm): device vs
    NumPy, same run. A row of another SVD algorithm than ``default`` (QR route only)
    reports ``diff_vs_default``: |its value - the default algorithm's| on the same data."""
    check_methods(methods)
    rows = []
    for p in neurons:
        for n in datapoints:
            X, Y = make_data(n, p, seed=seed)
            Xd, Yd = jax.device_put(X), jax.device_put(Y)
            for m in methods:
                for route in routes:
                    ref = None
                    for alg in svd_algorithms:
                        if alg != "default" and not _has_svd_choice(m, route, n, p):
                            continue  # only the QR route has an SVD to choose
                        # NumPy runs once, beside the default SVD; other SVDs are compared
                        # with that same run's NumPy time and value.
                        row, numpy_value = _row(
                            X, Y, Xd, Yd, m, route, p, n, repeats,
                            compare_numpy and (alg == "default" or ref is None), alg)
                        if alg == "default":
                            ref, ref_numpy = row, numpy_value
                        elif ref is not None:
                            row["diff_vs_default"] = abs(row["value"] - ref["value"])
                            if compare_numpy and ref_numpy == ref_numpy:
                                row.update(numpy_s=ref["numpy_s"],
                                           speedup=ref["numpy_s"] / row["jax_s"], note="",
                                           abs_diff=abs(row["value"] - ref_numpy))
                        rows.append(row)
                        common.progress_row(row, COLUMNS)
            del Xd, Yd
    return rows


def _row(X, Y, Xd, Yd, m, route, p, n, repeats, compare_numpy,
         svd: str = "default") -> Tuple[Dict[str, Any], float]:
    """(the table row, the NumPy reference's value or NaN)."""
    nan = float("nan")
    base = m[len(STREAMING_PREFIX):] if m.startswith(STREAMING_PREFIX) else m
    row = dict(method=m, route="streaming" if base != m else route, svd=svd, p=p, n=n,
               jax_s=nan, compile_s=nan, numpy_s=nan, speedup=nan, value=nan, abs_diff=nan,
               diff_vs_default=nan, note="")
    if base in sim.CCA_FAMILY and n <= p:
        row["note"] = "skipped: CCA needs n > p"
        return row, nan
    if base == m and route != "auto":
        try:
            sim.resolve_route(route, m, n, p, p)
        except ValueError as e:
            row["note"] = f"skipped: {e}"
            return row, nan
    if base == m:
        row["route"] = f"{route}->{sim.resolve_route(route, m, n, p, p)}"
    t = time_pair(X, Y, Xd, Yd, m, route, repeats=repeats, baseline=compare_numpy, svd=svd)
    row.update(jax_s=t["jax_s"], compile_s=t["compile_s"], value=t["value"])
    if not compare_numpy:
        row["note"] = "NumPy not run"
    elif base in BASELINE_METHODS:
        row.update(numpy_s=t["numpy_s"], speedup=t["numpy_s"] / t["jax_s"],
                   abs_diff=abs(t["ref"] - t["value"]))
        return row, t["ref"]
    else:
        row["note"] = "no NumPy baseline"
    return row, nan


def _has_svd_choice(method: str, route: str, n: int, p: int) -> bool:
    """Whether ``method`` on this route runs the QR route's SVDs (``svd=`` applies)."""
    if method.startswith(STREAMING_PREFIX):
        return False
    try:
        return sim.resolve_route(route, method, n, p, p) == "qr"
    except ValueError:
        return False


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
    must equal the end-to-end ones (checked), so the parts measure the same work. Each of
    the three parts (minutes for ResNet50 on a CPU) prints a progress row on stderr when
    it starts and ends, with throttled lines in between.
    """
    protocol = protocol or compare.PaperCCAProtocol()
    a = random_model(depth, width, seed, image_size=image_size, name="random_a")
    b = random_model(depth, width, seed + 1, image_size=image_size, preprocessing="unit",
                     name="random_b")
    images = np.random.default_rng(seed).integers(0, 256, (num_images, image_size,
                                                            image_size, 3), dtype=np.uint8)

    def part(what):
        common.progress(f"network: {what} ...")
        return Ticker(f"network: {what}", echo=common.progress)

    t0 = time.perf_counter()
    compare.run_paper_protocol(a, b, images, protocol, progress=part("1/3 cold run (compiles "
                                                                     "included)"))
    first_s = time.perf_counter() - t0
    common.progress(f"network: 1/3 cold run: {first_s:.1f} s")
    t0 = time.perf_counter()
    result = compare.run_paper_protocol(a, b, images, protocol, progress=part("2/3 warm run"))
    warm_s = time.perf_counter() - t0
    common.progress(f"network: 2/3 warm run: {warm_s:.1f} s")

    layers = tuple(protocol.layers or resnet.stage_output_names(depth))
    shapes = act.layer_shapes(a, image_size, layers)
    draws = compare.make_plan(shapes, num_images, positions=protocol.positions,
                              num_channels=protocol.num_channels, repeats=protocol.repeats,
                              seed=protocol.seed)
    progress = part("3/3 split run (extract, then similarity per layer)")
    t0 = time.perf_counter()
    pairs = compare.collect_draws(a, b, images, draws, batch_size=protocol.batch_size,
                                  preprocessing=protocol.preprocessing, progress=progress)
    jax.block_until_ready(pairs)
    extract_s = time.perf_counter() - t0
    common.progress(f"network: 3/3 extract: {extract_s:.1f} s")
    forwarded = sum(len(np.unique(np.concatenate([d.images for d in draws if d.repeat == r])))
                    for r in range(protocol.repeats))

    by_layer = {r["layer"]: r for r in result}
    rows, sim_total = [], 0.0
    for layer in layers:
        idx = [i for i, d in enumerate(draws) if d.layer == layer]
        # Warm this layer's call first: the end-to-end warm run compared every layer in
        # one grouped call, so a per-layer call can meet a batch shape not yet compiled
        # (on an H200 one layer's split row took 4.8 s, more than the whole warm run).
        sim.similarity_many([pairs[i] for i in idx], protocol.method,
                            epsilon=protocol.epsilon)
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
    common.progress(f"network: 3/3 similarity: {sim_total:.1f} s over {len(layers)} layers")
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
