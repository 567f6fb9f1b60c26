"""3x3 filter distributions (Gavrikov & Keuper, "CNN Filter DB", CVPR 2022).

Pipeline (NumPy float64 on host; a ResNet50 has ~1.3M 3x3 filters, seconds of work):

1. :func:`extract_filters`: every 3x3 conv kernel (Flax HWIO (3, 3, in, out)) becomes an
   (out*in, 9) matrix, rows in torch order (out, in) and each filter row-major; each layer
   gets the normalised depth CNN-Filter-DB's extractor gave it (onnxzoo2filterdb
   ``extract_filters.py``: the rank of its graph level among the distinct levels that
   hold a conv of *any* kernel size, over (levels - 1); :func:`conv_depths`). In a ResNet
   the 7x7 stem and the 1x1 convs count, and a projection shortcut shares its block's
   first level: ResNet18's 3x3 layers sit at k/16, ResNet50's at (3k + 2)/48. (An
   earlier version ranked the 3x3 layers alone, which put 6 of ResNet18's 16 in another
   0.1 bin and moved per-bin drift by up to +-140 %.)
2. :func:`scale_filters`: each filter divided by its own max |w| (all-zero filters stay 0).
3. :func:`fit_basis`: 9-component PCA (centred) on the scaled filters of *all* compared
   models, so every model is described in the same basis (a study streams all of its
   models through it, two passes, none held); coefficients c0..c8, each
   component's sign as the notebook's scikit-learn 0.24 ``PCA`` left it (``svd_flip`` on
   the scores: the largest |coefficient| positive; the range is asymmetric, so a flipped
   component lands in other bins: ~2 % of drift).
4. :func:`coefficient_histograms`: per group (model x depth bin, or layer), a 70-bin
   ``np.histogram(..., density=True)`` per coefficient, all nine over **one** range (the min
   and max over every coefficient of every compared filter, fitted with the basis); empty
   bins are set to float32 eps *on the density values* and each row renormalised to sum 1
   (so KL is finite). Depth bins follow CNN-Filter-DB's notebook, ``pandas.cut(depth,
   arange(0, 1.1, .1), include_lowest=True)``: right-closed (a, b] with the first bin
   [0, 0.1] (:func:`depth_bin`).
5. :func:`kl_drift`: ``sum_i w_i [KL(p_i||q_i) + KL(q_i||p_i)]`` with w_i the PCA
   explained-variance ratios (natural log).

These three conventions (bins, one range, floor on densities) are the published
definition, checked against CNN-Filter-DB's ``main.ipynb``; an earlier version of this file
used [a, b) bins, a range per coefficient and the floor on masses, which moves per-bin
drift by up to ~230% with 16 3x3 layers, so drifts were not comparable to the paper.
With few filters per group the histograms are noisy: :func:`drift_noise_floor` is the
drift between two random halves of one group, the level below which a drift means nothing.

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
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from medtransfer_jax.analysis.weight_change import layer_order
from medtransfer_jax.ticker import Ticker
from medtransfer_jax.weights import checkpoint

EPS32 = float(np.finfo(np.float32).eps)
NUM_BINS = 70


@dataclasses.dataclass
class LayerFilters:
    layer: str
    depth: float
    filters: np.ndarray  # (out*in, 9) raw weights, float64
    kernel_shape: Tuple[int, ...]  # HWIO


def _conv_layers(params: Mapping) -> List[str]:
    """The layers with a 4-D (HWIO) kernel, in forward order."""
    return [n for n in layer_order(params) if isinstance(params[n], Mapping)
            and "kernel" in params[n] and np.ndim(params[n]["kernel"]) == 4]


def conv_depths(params: Mapping) -> Dict[str, float]:
    """Every conv layer's normalised depth as CNN-Filter-DB's extractor measured it: the
    rank of the layer's graph level (longest path from the input) among the distinct
    levels holding any conv, over (levels - 1). For Keras-named ResNets the levels follow
    the forward order of the convs, with a projection shortcut (``..._0_conv``) on the
    level of its block's first conv (``..._1_conv``): both read the block's input."""
    params = dict(params.get("params", params))
    convs = _conv_layers(params)
    level_of = {n: (n[:-len("_0_conv")] + "_1_conv" if n.endswith("_0_conv") else n)
                for n in convs}
    rank = {lv: i for i, lv in enumerate(dict.fromkeys(level_of[n] for n in convs))}
    top = max(len(rank) - 1, 1)
    return {n: rank[level_of[n]] / top for n in convs}


def extract_filters(params: Mapping, kernel_size: Tuple[int, int] = (3, 3)) -> List[LayerFilters]:
    """All ``kernel_size`` conv kernels of a Flax params tree (Keras layer names), in
    order, each with its :func:`conv_depths` depth."""
    params = dict(params.get("params", params))
    names = [n for n in _conv_layers(params)
             if tuple(np.shape(params[n]["kernel"])[:2]) == tuple(kernel_size)]
    if not names:
        raise ValueError(f"No {kernel_size[0]}x{kernel_size[1]} conv kernels found in the params "
                         "tree; is it a ResNet params dict (layer -> {'kernel', ...})?")
    depths = conv_depths(params)
    out = []
    for n in names:
        k = np.asarray(params[n]["kernel"], np.float64)
        f = k.transpose(3, 2, 0, 1).reshape(-1, kernel_size[0] * kernel_size[1])
        out.append(LayerFilters(n, depths[n], f, k.shape))
    return out


def scaled_filters(params: Mapping) -> np.ndarray:
    """Every 3x3 filter of a params tree, each scaled to max |w| = 1, as one (n, 9) array:
    what :func:`fit_basis` pools, one model at a time."""
    return np.concatenate([scale_filters(lf.filters) for lf in extract_filters(params)])


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


@dataclasses.dataclass
class FilterBasis:
    """What makes drifts comparable: one PCA basis and one histogram range. CNN-Filter-DB
    fits both once over its whole database; a study fits them once over every model it
    compares (:func:`fit_basis`), so every pair's drift is in the same units."""
    pca: FilterPCA
    ranges: np.ndarray  # (9, 2), the same (min, max) in every row
    num_filters: int

    def to_json(self) -> dict:
        return dict(mean=self.pca.mean.tolist(), components=self.pca.components.tolist(),
                    explained_variance_ratio=self.pca.explained_variance_ratio.tolist(),
                    range=self.ranges[0].tolist(), num_filters=self.num_filters)

    @classmethod
    def from_json(cls, d: Mapping) -> "FilterBasis":
        pca = FilterPCA(np.asarray(d["mean"], np.float64),
                        np.asarray(d["components"], np.float64),
                        np.asarray(d["explained_variance_ratio"], np.float64))
        return cls(pca, np.tile(np.asarray(d["range"], np.float64), (pca.mean.size, 1)),
                   int(d["num_filters"]))


def _moments(filter_sets: Iterable[np.ndarray]) -> Tuple[int, np.ndarray, np.ndarray]:
    """(n, mean, centred sum of squares) of the pooled rows of every set, merged set by set
    (Chan, Golub & LeVeque's pairwise update) so that the sets need not fit in memory at
    once."""
    n, mean, m2 = 0, np.zeros(9), np.zeros((9, 9))
    for f in filter_sets:
        f = np.asarray(f, np.float64)
        k = f.shape[0]
        if not k:
            continue
        mu = f.mean(0)
        d = f - mu
        delta, total = mu - mean, n + k
        mean = mean + delta * (k / total)
        m2 = m2 + d.T @ d + np.outer(delta, delta) * (n * k / total)
        n = total
    return n, mean, m2


def fit_basis(filter_sets: Callable[[], Iterable[np.ndarray]]) -> FilterBasis:
    """The PCA basis and the histogram range of the pooled (scaled) filters of every set.

    ``filter_sets()`` returns a fresh iterable of (n_i, 9) arrays and is called twice (the
    moments, then the scores' signs and extent), so a study can stream its models from
    disk instead of holding a Revisiting study's 178 ResNet50s' filters. Equal to a PCA
    of the concatenated rows: each component's sign as the notebook's scikit-learn 0.24 ``PCA`` left it
    (``svd_flip`` on the scores: the first largest |score| positive; the range is
    asymmetric, so a flipped component lands in other bins: ~2 % of drift), and the range
    CNN-Filter-DB's ``dX_n_range``: one (min, max) over every coefficient of every filter.
    """
    n, mean, m2 = _moments(filter_sets())
    if n == 0:
        raise ValueError("fit_basis: no filters to fit a basis to.")
    lam, V = np.linalg.eigh(m2 / max(n - 1, 1))
    lam, V = np.maximum(lam[::-1], 0), V[:, ::-1]
    cols = np.arange(V.shape[1])
    best, sign = np.full(V.shape[1], -1.0), np.ones(V.shape[1])
    lo, hi = np.full(V.shape[1], np.inf), np.full(V.shape[1], -np.inf)
    for f in filter_sets():
        f = np.asarray(f, np.float64)
        if not f.shape[0]:
            continue
        scores = (f - mean) @ V
        top = np.argmax(np.abs(scores), axis=0)
        val = scores[top, cols]
        better = np.abs(val) > best  # strictly: the first maximum wins, as np.argmax
        best = np.where(better, np.abs(val), best)
        sign = np.where(better & (val != 0), np.sign(val), sign)
        lo, hi = np.minimum(lo, scores.min(0)), np.maximum(hi, scores.max(0))
    V = V * sign
    lo, hi = float(np.where(sign > 0, lo, -hi).min()), float(np.where(sign > 0, hi, -lo).max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    ratio = lam / lam.sum() if lam.sum() > 0 else np.full_like(lam, 1 / lam.size)
    return FilterBasis(FilterPCA(mean, V.T, ratio), np.tile([lo, hi], (V.shape[1], 1)), n)


def fit_basis_of_weights(dirs: Sequence[str]) -> FilterBasis:
    """:func:`fit_basis` over weights dirs, each loaded when a pass reaches it: one model's
    filters in memory at a time."""
    def stream():
        for d in dirs:
            yield scaled_filters(checkpoint.load_weights(d)[0]["params"])

    return fit_basis(stream)


def coefficient_histograms(coeffs: np.ndarray, ranges: np.ndarray,
                           bins: int = NUM_BINS) -> np.ndarray:
    """(n, 9) coefficients -> (9, bins) probabilities, as CNN-Filter-DB's notebook.

    Per coefficient: ``np.histogram(density=True)`` over ``ranges[i]``, empty bins set to
    float32 eps on those density values (not on masses: with a bin width w the floor is
    eps*w in mass units, which is what the published drifts used), then renormalised to
    sum 1. A group with no filters is all-eps, i.e. uniform.
    """
    out = np.zeros((coeffs.shape[1], bins))
    for i in range(coeffs.shape[1]):
        if coeffs.shape[0]:
            h, _ = np.histogram(coeffs[:, i], bins=bins, range=tuple(ranges[i]), density=True)
        else:
            h = np.zeros(bins)
        h = h.astype(np.float64)
        h[h == 0] = EPS32
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


DEPTH_EDGES = np.arange(0, 1.0 + 0.10, 0.10)  # the notebook's edges, float rounding included


def depth_bin_index(depth: float, edges: np.ndarray = DEPTH_EDGES) -> int:
    """Index of the right-closed bin (edges[i], edges[i+1]] holding ``depth``; the first
    bin also holds edges[0] (pandas ``cut(..., include_lowest=True)``)."""
    if not edges[0] <= depth <= edges[-1]:
        raise ValueError(f"depth {depth} outside [{edges[0]}, {edges[-1]}]")
    return max(int(np.searchsorted(edges, depth, side="left")) - 1, 0)


def depth_bin(depth: float, edges: np.ndarray = DEPTH_EDGES) -> str:
    """The notebook's label of ``depth``'s bin: '[0.0, 0.1]', '(0.1, 0.2]', ..."""
    i = depth_bin_index(depth, edges)
    return f"{'[' if i == 0 else '('}{edges[i]:.1f}, {edges[i + 1]:.1f}]"


def drift_noise_floor(coeffs: np.ndarray, ranges: np.ndarray, weights: np.ndarray, *,
                      repeats: int = 5, seed: int = 0, bins: int = NUM_BINS) -> Tuple[float, float]:
    """(mean, sample sd) of the drift between two random halves of one group's (n, 9)
    coefficients: what :func:`kl_drift` reads when nothing changed but the sample."""
    rng = np.random.default_rng(seed)
    n = coeffs.shape[0]
    if n < 4:
        return float("nan"), float("nan")
    vals = []
    for _ in range(repeats):
        perm = rng.permutation(n)
        a, b = coeffs[perm[:n // 2]], coeffs[perm[n // 2:2 * (n // 2)]]
        vals.append(kl_drift(coefficient_histograms(a, ranges, bins),
                             coefficient_histograms(b, ranges, bins), weights))
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if repeats > 1 else float("nan")


@dataclasses.dataclass
class FilterReport:
    pca: FilterPCA
    ranges: np.ndarray  # (9, 2)
    layer_rows: List[dict]  # per model x layer statistics
    drift_rows: List[dict]  # per pair x (depth bin | layer)
    # (model or group, depth bin like '(0.3, 0.4]' or 'all') -> (9, bins)
    histograms: Dict[Tuple[str, str], np.ndarray]
    layer_histograms: Dict[Tuple[str, str], np.ndarray]  # (model, layer) -> (9, bins)

    def bin_edges(self, bins: int = NUM_BINS) -> np.ndarray:
        return np.stack([np.linspace(lo, hi, bins + 1) for lo, hi in self.ranges])


def _bin_order(label: str) -> float:
    """Sort key of a depth-bin label ('[0.0, 0.1]', '(0.1, 0.2]', ...; 'all' last)."""
    return 2.0 if label == "all" else float(label[1:].split(",")[0])


def _per_layer(m, lfs, coeffs, ranges, w, bins, with_orthogonality):
    """Model ``m``'s layer statistics rows, per-layer histograms and per-(model, depth bin)
    coefficients (``lfs``: its extracted layers, ``coeffs``: their PCA coefficients)."""
    layer_rows, layer_hist = [], {}
    binned: Dict[Tuple[str, str], List[np.ndarray]] = {}
    for lf, c in zip(lfs, coeffs):
        row = dict(model=m, layer=lf.layer, depth=lf.depth, depth_bin=depth_bin(lf.depth),
                   n_filters=int(lf.filters.shape[0]), sparsity=sparsity(lf.filters),
                   variance_entropy=variance_entropy(lf.filters), spikiness=spikiness(c, w))
        if with_orthogonality:
            row["orthogonality"] = orthogonality(
                lf.filters.reshape(lf.kernel_shape[3], lf.kernel_shape[2], 3, 3)
                .transpose(2, 3, 1, 0))
        layer_rows.append(row)
        layer_hist[(m, lf.layer)] = coefficient_histograms(c, ranges, bins)
        binned.setdefault((m, row["depth_bin"]), []).append(c)
    return layer_rows, layer_hist, binned


def _pool_units(units, coeffs, binned) -> Dict[Tuple[str, str], np.ndarray]:
    """(unit, depth bin or 'all') -> the pooled (n, 9) coefficients of the unit's models."""
    labels = sorted({k[1] for k in binned}, key=_bin_order)
    pooled = {}
    for g, members in units.items():
        pooled[(g, "all")] = np.concatenate([c for m in members for c in coeffs[m]])
        for b in labels:
            cs = [c for m in members for c in binned.get((m, b), [])]
            if cs:
                pooled[(g, b)] = np.concatenate(cs)
    return pooled


def analyse_filters(models: Mapping[str, Mapping], *, groups: Optional[Mapping[str, Sequence[str]]]
                    = None, bins: int = NUM_BINS, with_orthogonality: bool = False,
                    noise_repeats: int = 3, basis: Optional[FilterBasis] = None,
                    progress: Optional[Ticker] = None) -> FilterReport:
    """Filter distributions of several models (name -> params tree) and their drifts.

    ``basis``: the PCA basis and range to describe them in (a study's, fitted over all of
    its models: :func:`fit_basis_of_weights`); default: fitted over these
    models. Coefficients outside a given basis's range fall out of the histograms, as
    ``np.histogram`` drops them.

    Drift rows compare every pair of models (or of ``groups``: name -> model names, pooled)
    per depth bin (``scope='depth_bin'``) and over all depths (``scope='all'``), and every
    pair of models layer by layer where layer names match (``scope='layer'``). Each row
    carries ``noise_floor`` (+ ``noise_floor_sd``): :func:`drift_noise_floor` of side a's
    filters (``noise_repeats`` random halvings; 0 skips it), so a reader sees whether a
    drift is above what resampling alone gives.

    ``progress``: one line per model whose filters are described (seconds each for a
    ResNet50), before the drifts.
    """
    if not models:
        raise ValueError("analyse_filters: give at least one model.")
    units = dict(groups) if groups else {m: [m] for m in models}
    missing = [m for g in units.values() for m in g if m not in models]
    if missing:
        raise ValueError(f"groups name unknown models {missing}; known: {list(models)}.")
    if progress is not None:
        progress.start(len(models), "models")
    extracted = {m: extract_filters(p) for m, p in models.items()}
    scaled = {m: [scale_filters(lf.filters) for lf in lfs] for m, lfs in extracted.items()}
    if basis is None:
        basis = fit_basis(lambda: (f for fs in scaled.values() for f in fs))
    pca, ranges = basis.pca, basis.ranges
    w = pca.explained_variance_ratio
    coeffs: Dict[str, List[np.ndarray]] = {}
    layer_rows, layer_hist, binned = [], {}, {}
    for k, m in enumerate(models):
        coeffs[m] = [pca.transform(f) for f in scaled[m]]
        rows, hists, bins_m = _per_layer(m, extracted[m], coeffs[m], ranges, w, bins,
                                         with_orthogonality)
        layer_rows += rows
        layer_hist.update(hists)
        binned.update(bins_m)
        if progress is not None:
            progress.update(k + 1, f"{m} ({len(rows)} layers)", force=True)
    pooled = _pool_units({m: [m] for m in models}, coeffs, binned)
    pooled.update(_pool_units(units, coeffs, binned))
    hist = {k: coefficient_histograms(c, ranges, bins) for k, c in pooled.items()}

    floors: Dict[tuple, Tuple[float, float]] = {}

    def floor(key, c):
        if key not in floors:
            floors[key] = (drift_noise_floor(c, ranges, w, repeats=noise_repeats, bins=bins)
                           if noise_repeats else (float("nan"), float("nan")))
        return dict(zip(("noise_floor", "noise_floor_sd"), floors[key]))

    drift_rows = []
    for ga, gb in itertools.combinations(units, 2):
        for b in sorted({k[1] for k in hist if k[0] == ga}, key=_bin_order):
            if (gb, b) in hist:
                drift_rows.append(dict(a=ga, b=gb, scope="all" if b == "all" else "depth_bin",
                                       key=b, drift=kl_drift(hist[(ga, b)], hist[(gb, b)], w),
                                       **floor((ga, b), pooled[(ga, b)])))
    for ma, mb in itertools.combinations(models, 2):
        for lf, c in zip(extracted[ma], coeffs[ma]):
            if (mb, lf.layer) in layer_hist:
                drift_rows.append(dict(a=ma, b=mb, scope="layer", key=lf.layer, depth=lf.depth,
                                       drift=kl_drift(layer_hist[(ma, lf.layer)],
                                                      layer_hist[(mb, lf.layer)], w),
                                       **floor(("layer", ma, lf.layer), c)))
    return FilterReport(pca, ranges, layer_rows, drift_rows, hist, layer_hist)
