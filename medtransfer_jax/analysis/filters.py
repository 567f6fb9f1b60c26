"""3x3 filter distributions (Gavrikov & Keuper, "CNN Filter DB", CVPR 2022).

Pipeline (NumPy float64 on host; a ResNet50 has ~1.3M 3x3 filters, seconds of work):

1. :func:`extract_filters`: every 3x3 conv kernel (Flax HWIO (3, 3, in, out)) becomes an
   (out*in, 9) matrix, rows in torch order (out, in) and each filter row-major; each layer
   gets a normalised depth ``i / (L - 1)`` (i = index among the model's 3x3 conv layers in
   forward order).
2. :func:`scale_filters`: each filter divided by its own max |w| (all-zero filters stay 0).
3. :func:`fit_pca`: 9-component PCA (centred) on the scaled filters of *all* compared
   models, so every model is described in the same basis; coefficients c0..c8.
4. :func:`coefficient_histograms`: per group (model x depth bin of 0.1, or layer), a 70-bin
   histogram per coefficient over the global range of that coefficient; empty bins get
   float32 eps and the masses are renormalised (so KL is finite).
5. :func:`kl_drift`: ``sum_i w_i [KL(p_i||q_i) + KL(q_i||p_i)]`` with w_i the PCA
   explained-variance ratios (natural log).

Per-layer statistics on the raw filters:

* :func:`sparsity`: fraction of filters whose 9 weights all satisfy |w| < 0.01 * max|W_layer|.
* :func:`variance_entropy`: entropy (log10) of the normalised singular-value^2 spectrum of
  the centred (n, 9) filter matrix; 0 = all variance in one direction, log10(9) ~ 0.954 =
  isotropic (random-looking) filters.
* :func:`spikiness` (defined here): explained-variance-weighted mean of the *excess
  kurtosis* of the PCA coefficients of a layer's scaled filters. 0 for Gaussian-like
  coefficient distributions; large positive when most filters sit in a narrow spike with
  heavy tails (e.g. many near-degenerate filters plus a few strong ones), negative for flat
  distributions (uniform: -1.2).
* :func:`orthogonality` (optional): 1 - mean |cos| between the layer's output filters
  (each flattened over (3, 3, in)).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from medtransfer_jax.analysis.weight_change import layer_order

EPS32 = float(np.finfo(np.float32).eps)
NUM_BINS = 70


@dataclasses.dataclass
class LayerFilters:
    layer: str
    depth: float
    filters: np.ndarray  # (out*in, 9) raw weights, float64
    kernel_shape: Tuple[int, ...]  # HWIO


def extract_filters(params: Mapping, kernel_size: Tuple[int, int] = (3, 3)) -> List[LayerFilters]:
    """All ``kernel_size`` conv kernels of a Flax params tree (Keras layer names), in order."""
    params = dict(params.get("params", params))
    names = [n for n in layer_order(params)
             if "kernel" in params[n] and np.ndim(params[n]["kernel"]) == 4
             and tuple(np.shape(params[n]["kernel"])[:2]) == tuple(kernel_size)]
    if not names:
        raise ValueError(f"No {kernel_size[0]}x{kernel_size[1]} conv kernels found in the params "
                         "tree; is it a ResNet params dict (layer -> {'kernel', ...})?")
    out = []
    for i, n in enumerate(names):
        k = np.asarray(params[n]["kernel"], np.float64)
        f = k.transpose(3, 2, 0, 1).reshape(-1, kernel_size[0] * kernel_size[1])
        out.append(LayerFilters(n, i / max(len(names) - 1, 1), f, k.shape))
    return out


def scale_filters(f: np.ndarray) -> np.ndarray:
    """(n, 9) -> each row divided by its max |w|; all-zero rows stay zero."""
    m = np.abs(f).max(axis=1, keepdims=True)
    return np.where(m > 0, f / np.where(m > 0, m, 1.0), 0.0)


@dataclasses.dataclass
class FilterPCA:
    mean: np.ndarray  # (9,)
    components: np.ndarray  # (9, 9), rows orthonormal, by decreasing variance
    explained_variance_ratio: np.ndarray  # (9,)

    def transform(self, f: np.ndarray) -> np.ndarray:
        return (f - self.mean) @ self.components.T


def fit_pca(filter_sets: Sequence[np.ndarray]) -> FilterPCA:
    """PCA of the pooled (scaled) filters of every set; each (n_i, 9)."""
    X = np.concatenate([np.asarray(f, np.float64) for f in filter_sets])
    mean = X.mean(0)
    cov = (X - mean).T @ (X - mean) / max(len(X) - 1, 1)
    lam, V = np.linalg.eigh(cov)
    lam, V = np.maximum(lam[::-1], 0), V[:, ::-1]
    # fix signs (largest |loading| positive) so bases are reproducible
    V = V * np.sign(V[np.argmax(np.abs(V), axis=0), np.arange(V.shape[1])])
    ratio = lam / lam.sum() if lam.sum() > 0 else np.full_like(lam, 1 / lam.size)
    return FilterPCA(mean, V.T, ratio)


def global_ranges(coefficient_sets: Sequence[np.ndarray]) -> np.ndarray:
    """(9, 2) min/max of each coefficient over all sets (a zero-width range is widened)."""
    X = np.concatenate(coefficient_sets)
    lo, hi = X.min(0), X.max(0)
    same = hi <= lo
    return np.stack([np.where(same, lo - 0.5, lo), np.where(same, hi + 0.5, hi)], 1)


def coefficient_histograms(coeffs: np.ndarray, ranges: np.ndarray,
                           bins: int = NUM_BINS) -> np.ndarray:
    """(n, 9) coefficients -> (9, bins) probability masses over the global ``ranges``.

    Empty bins are set to float32 eps and each row renormalised to sum 1. (Multiply by
    bins / (hi - lo) for densities.)
    """
    out = np.zeros((coeffs.shape[1], bins))
    for i in range(coeffs.shape[1]):
        h, _ = np.histogram(coeffs[:, i], bins=bins, range=tuple(ranges[i]))
        h = h.astype(np.float64)
        h = h / h.sum() if h.sum() > 0 else np.zeros_like(h)
        h = np.where(h > 0, h, EPS32)
        out[i] = h / h.sum()
    return out


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) = sum p log(p / q) over the last axis (natural log); p, q positive."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def symmetric_kl(p, q) -> np.ndarray:
    return kl_divergence(p, q) + kl_divergence(q, p)


def kl_drift(hist_p: np.ndarray, hist_q: np.ndarray, weights: np.ndarray) -> float:
    """sum_i w_i [KL(p_i||q_i) + KL(q_i||p_i)] for (9, bins) histograms, w (9,)."""
    return float(np.sum(np.asarray(weights) * symmetric_kl(hist_p, hist_q)))


def sparsity(filters: np.ndarray, tol: float = 0.01) -> float:
    """Fraction of filters (rows) with every |w| < tol * max|W_layer| (raw weights)."""
    m = np.abs(filters).max()
    if m == 0:
        return 1.0
    return float(np.mean(np.all(np.abs(filters) < tol * m, axis=1)))


def variance_entropy(filters: np.ndarray) -> float:
    """log10 entropy of the normalised singular-value^2 spectrum of centred (n, 9) filters."""
    X = filters - filters.mean(0)
    s = np.linalg.svd(X, compute_uv=False)
    v = s ** 2
    if v.sum() == 0:
        return 0.0
    p = v / v.sum()
    p = p[p > 0]
    return float(-(p * np.log10(p)).sum())


def excess_kurtosis(x: np.ndarray) -> np.ndarray:
    """Fisher excess kurtosis per column (0 for a Gaussian); 0 for constant columns."""
    x = x - x.mean(0)
    m2 = (x ** 2).mean(0)
    m4 = (x ** 4).mean(0)
    return np.where(m2 > 0, m4 / np.where(m2 > 0, m2, 1.0) ** 2 - 3.0, 0.0)


def spikiness(coeffs: np.ndarray, weights: np.ndarray) -> float:
    """Explained-variance-weighted excess kurtosis of (n, 9) PCA coefficients."""
    if coeffs.shape[0] < 4:
        return float("nan")
    w = np.asarray(weights, np.float64)
    return float(np.sum(w * excess_kurtosis(coeffs)) / w.sum())


def orthogonality(kernel: np.ndarray) -> float:
    """1 - mean |cos| between output filters of an HWIO kernel (off-diagonal pairs)."""
    k = np.asarray(kernel, np.float64)
    W = k.reshape(-1, k.shape[-1]).T  # (out, h*w*in)
    n = np.linalg.norm(W, axis=1, keepdims=True)
    W = W / np.where(n > 0, n, 1.0)
    C = np.abs(W @ W.T)
    o = C.shape[0]
    if o < 2:
        return float("nan")
    return float(1.0 - (C.sum() - np.trace(C)) / (o * (o - 1)))


def depth_bin(depth: float, width: float = 0.1) -> str:
    nb = int(round(1 / width))
    i = min(int(np.floor(depth / width + 1e-9)), nb - 1)
    return f"{i * width:.1f}-{(i + 1) * width:.1f}"


@dataclasses.dataclass
class FilterReport:
    pca: FilterPCA
    ranges: np.ndarray  # (9, 2)
    layer_rows: List[dict]  # per model x layer statistics
    drift_rows: List[dict]  # per pair x (depth bin | layer)
    # (model or group, depth bin like '0.3-0.4' or 'all') -> (9, bins)
    histograms: Dict[Tuple[str, str], np.ndarray]
    layer_histograms: Dict[Tuple[str, str], np.ndarray]  # (model, layer) -> (9, bins)

    def bin_edges(self, bins: int = NUM_BINS) -> np.ndarray:
        return np.stack([np.linspace(lo, hi, bins + 1) for lo, hi in self.ranges])


def analyse_filters(models: Mapping[str, Mapping], *, groups: Optional[Mapping[str, Sequence[str]]]
                    = None, bins: int = NUM_BINS, depth_width: float = 0.1,
                    with_orthogonality: bool = False) -> FilterReport:
    """Filter distributions of several models (name -> params tree) and their drifts.

    Drift rows compare every pair of models (or of ``groups``: name -> model names, pooled)
    per depth bin (``scope='depth_bin'``) and over all depths (``scope='all'``), and every
    pair of models layer by layer where layer names match (``scope='layer'``).
    """
    if not models:
        raise ValueError("analyse_filters: give at least one model.")
    extracted = {m: extract_filters(p) for m, p in models.items()}
    scaled = {m: [scale_filters(lf.filters) for lf in lfs] for m, lfs in extracted.items()}
    pca = fit_pca([f for fs in scaled.values() for f in fs])
    coeffs = {m: [pca.transform(f) for f in fs] for m, fs in scaled.items()}
    ranges = global_ranges([c for cs in coeffs.values() for c in cs])
    w = pca.explained_variance_ratio

    layer_rows, layer_hist = [], {}
    binned: Dict[Tuple[str, str], List[np.ndarray]] = {}
    for m, lfs in extracted.items():
        for lf, c in zip(lfs, coeffs[m]):
            row = dict(model=m, layer=lf.layer, depth=lf.depth, depth_bin=depth_bin(lf.depth,
                                                                                   depth_width),
                       n_filters=int(lf.filters.shape[0]), sparsity=sparsity(lf.filters),
                       variance_entropy=variance_entropy(lf.filters),
                       spikiness=spikiness(c, w))
            if with_orthogonality:
                row["orthogonality"] = orthogonality(
                    lf.filters.reshape(lf.kernel_shape[3], lf.kernel_shape[2], 3, 3)
                    .transpose(2, 3, 1, 0))
            layer_rows.append(row)
            layer_hist[(m, lf.layer)] = coefficient_histograms(c, ranges, bins)
            binned.setdefault((m, row["depth_bin"]), []).append(c)
    hist = {k: coefficient_histograms(np.concatenate(v), ranges, bins) for k, v in binned.items()}
    for m in models:  # each model pooled over all depths
        hist[(m, "all")] = coefficient_histograms(np.concatenate(coeffs[m]), ranges, bins)

    units = dict(groups) if groups else {m: [m] for m in models}
    missing = [m for g in units.values() for m in g if m not in models]
    if missing:
        raise ValueError(f"groups name unknown models {missing}; known: {list(models)}.")
    if groups:
        for g, members in units.items():
            for b in sorted({k[1] for k in binned}) + ["all"]:
                cs = ([c for m in members for c in coeffs[m]] if b == "all" else
                      [c for m in members for c in binned.get((m, b), [])])
                if cs:
                    hist[(g, b)] = coefficient_histograms(np.concatenate(cs), ranges, bins)

    drift_rows = []
    for ga, gb in itertools.combinations(units, 2):
        for b in sorted({k[1] for k in hist if k[0] in (ga, gb)}):
            if (ga, b) in hist and (gb, b) in hist:
                drift_rows.append(dict(a=ga, b=gb, scope="all" if b == "all" else "depth_bin",
                                       key=b,
                                       drift=kl_drift(hist[(ga, b)], hist[(gb, b)], w)))
    for ma, mb in itertools.combinations(models, 2):
        for lf in extracted[ma]:
            if (mb, lf.layer) in layer_hist:
                drift_rows.append(dict(a=ma, b=mb, scope="layer", key=lf.layer, depth=lf.depth,
                                       drift=kl_drift(layer_hist[(ma, lf.layer)],
                                                      layer_hist[(mb, lf.layer)], w)))
    return FilterReport(pca, ranges, layer_rows, drift_rows, hist, layer_hist)
