"""Layer x layer similarity maps of two networks (or one with itself) in one streamed pass.

``layer_map(a, b, images)`` compares every block output of A with every block output of B
(Kornblith et al. 2019 fig. 5, Nguyen et al. 2021's headline plot) with mean CCA, SVCCA,
PWCCA (from streamed covariances, float64 finish) and minibatch linear CKA (unbiased HSIC
per batch, Nguyen et al.). How it stays cheap and bounded:

* **One pass, one GEMM.** Each image batch goes through each network once (once in
  total for a self-map). The chosen features of all layers are concatenated into
  Z (b, D) and :func:`streaming.update_joint` adds Z^T Z to one D x D co-moment and the
  per-batch HSIC of every layer pair to an L x L matrix. Memory is O(D^2) whatever the
  number of images; compute is one (D x b) x (b x D) GEMM per batch.
* **Spatial handling is explicit** (``spatial``): ``'pool'`` = global average per image
  (one datapoint per image; layers of any size compare), ``'grid'`` = every layer brought
  to one common h x w grid (default: the smallest map among the layers; larger maps are
  average-pooled / resized, :func:`activations.match_spatial`'s rule) and every grid
  position a datapoint. The choice is in the result (``LayerMap.spatial``) and in the plot
  title.
* **Channel subsampling where it would not fit**: at most ``max_channels`` random channels
  per layer (same seed for both networks). ``None`` picks the largest power of two whose
  statistics (3 D^2 float32: co-moment, compensation, batch Gram) fit ``stats_budget_mb``.
* **Sharded**: batches are split over the ``data`` axis of ``mesh`` (the training mesh,
  default :func:`activations.forward_mesh`);
  XLA reduces Z^T Z across devices inside the jitted update, so statistics are global.
  On several hosts each process passes its own images (process-local rows of the global
  batch), as in training.

Per-layer whitening is computed once and reused for all pairs it appears in.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from medtransfer_jax import sharding
from medtransfer_jax.errors import TooFewDatapoints
from medtransfer_jax.inference import activations as act
from medtransfer_jax.analysis import covariance as cov_lib
from medtransfer_jax.analysis import similarity as sim
from medtransfer_jax.analysis import streaming
from medtransfer_jax.models import resnet
from medtransfer_jax.ticker import Ticker, format_duration

MAP_METHODS = sim.MAP_METHODS  # the registry's (similarity.REGISTRY) mappable methods
DEFAULT_MAP_METHODS = ("mean_cca", "svcca", "pwcca", "debiased_cka")
MAP_SPATIAL = ("pool", "grid")


def all_blocks(depth: int) -> Tuple[str, ...]:
    """conv1_relu and every residual block output (17 for ResNet50, 9 for ResNet18)."""
    return tuple(n for n in resnet.block_output_names(depth)
                 if n == "conv1_relu" or n.endswith("_out"))


@dataclasses.dataclass
class LayerMap:
    """``values[method]`` (len(layers_a), len(layers_b)) of ``datapoints`` rows."""
    name_a: str
    name_b: str
    layers_a: Tuple[str, ...]
    layers_b: Tuple[str, ...]
    values: Dict[str, np.ndarray]
    datapoints: int
    images: int
    spatial: str
    channels_a: Tuple[int, ...]
    channels_b: Tuple[int, ...]
    compute_dtype: str = "float32"
    #: Where the map's wall time went, seconds: ``first_batch`` (compiling the forward
    #: passes and the accumulation, one batch), ``stream`` (every batch, the first
    #: included, and the statistics' move to the host), ``finish`` (the float64 per-pair
    #: values on the host). On a GPU the stream is mostly device work and the rest host.
    timing: Dict[str, float] = dataclasses.field(default_factory=dict)

    def title(self, method: str) -> str:
        return (f"{method}: {self.name_a} vs {self.name_b}\n{self.spatial}, "
                f"n={self.datapoints} datapoints from {self.images} images, "
                f"<= {max(self.channels_a + self.channels_b)} channels/layer")

    def rows(self) -> List[dict]:
        """One dict per (method, layer_a, layer_b), ready for CSV/JSON."""
        out = []
        for m, mat in self.values.items():
            for i, la in enumerate(self.layers_a):
                for j, lb in enumerate(self.layers_b):
                    out.append(dict(model_a=self.name_a, model_b=self.name_b,
                                    layer=f"{la}~{lb}", layer_a=la, layer_b=lb, method=m,
                                    value=float(mat[i, j]), datapoints=self.datapoints,
                                    images=self.images, channels_a=self.channels_a[i],
                                    channels_b=self.channels_b[j], spatial=self.spatial,
                                    compute_dtype=self.compute_dtype))
        return out


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Which features go into Z: per layer (network, name, channels), its column segment."""
    layers: Tuple[Tuple[str, str, Optional[np.ndarray]], ...]
    segments: Tuple[Tuple[int, int], ...]
    grid: Optional[Tuple[int, int]]


def _channels(shapes: Dict[str, tuple], cap: Optional[int], rng) -> Dict[str, Optional[np.ndarray]]:
    out = {}
    for name, shape in shapes.items():
        c = shape[-1]
        out[name] = (np.sort(rng.choice(c, cap, replace=False)) if cap and cap < c else None)
    return out


def _auto_cap(widths: Sequence[int], budget_mb: float) -> Optional[int]:
    """Largest power-of-two channel cap whose 3 D^2 float32 statistics fit the budget."""
    cap = max(widths)
    while cap > 1:
        d = sum(min(w, cap) for w in widths)
        if 3 * d * d * 4 <= budget_mb * 2 ** 20:
            return None if cap == max(widths) else cap
        cap //= 2
    return 1


def _plan(a, b, image_hw, layers_a, layers_b, spatial, grid, max_channels, budget_mb,
          seed) -> _Plan:
    sa = act.layer_shapes(a, image_hw, layers_a)
    sb = act.layer_shapes(b, image_hw, layers_b) if b is not None else {}
    maps = [s for s in list(sa.values()) + list(sb.values()) if len(s) == 3]
    if spatial == "grid":
        grid = tuple(grid) if grid else (min(s[0] for s in maps), min(s[1] for s in maps))
    else:
        grid = None
    widths = [s[-1] for s in list(sa.values()) + list(sb.values())]
    cap = max_channels if max_channels is not None else _auto_cap(widths, budget_mb)
    rng = np.random.default_rng(seed)
    ch_a = _channels(sa, cap, rng)
    # the same draw for B's layers of the same width, so a network compared with a copy
    # of itself uses the same channels
    ch_b = {l: (ch_a[l] if l in ch_a and sb[l] == sa[l] else c)
            for l, c in _channels(sb, cap, rng).items()}
    entries, segments, start = [], [], 0
    for net, chans, shapes in (("a", ch_a, sa), ("b", ch_b, sb)):
        for name, ch in chans.items():
            width = len(ch) if ch is not None else shapes[name][-1]
            entries.append((net, name, ch))
            segments.append((start, start + width))
            start += width
    return _Plan(tuple(entries), tuple(segments), grid)


def _featurizer(plan: _Plan):
    """Jitted (acts_a, acts_b) -> Z (rows, D) float32 for the plan's layers."""
    def features(acts_a, acts_b):
        cols = []
        for net, name, ch in plan.layers:
            x = (acts_a if net == "a" else acts_b)[name].astype(jnp.float32)
            if x.ndim == 4 and plan.grid is None:
                x = jnp.mean(x, axis=(1, 2))
            elif x.ndim == 4:
                x = act._to_grid(x, *plan.grid).reshape(-1, x.shape[-1])
            cols.append(x if ch is None else x[:, jnp.asarray(ch)])
        return jnp.concatenate(cols, axis=1)
    return jax.jit(features)


def layer_map(weights_a, weights_b, images, *, layers: Union[str, Sequence[str]] = "all_blocks",
              layers_b: Union[None, str, Sequence[str]] = None,
              methods: Sequence[str] = DEFAULT_MAP_METHODS, spatial: str = "pool",
              grid: Optional[Tuple[int, int]] = None, max_channels: Optional[int] = None,
              stats_budget_mb: float = 1024.0, batch_size: int = 64,
              preprocessing: Optional[str] = None, seed: int = 0, mesh=None,
              compute_dtype: str = "float32", rtol: float = streaming.DEFAULT_STREAMING_RTOL,
              epsilon: float = 1e-12, keep: float = 0.99, name_a: Optional[str] = None,
              name_b: Optional[str] = None, progress: Optional[Ticker] = None) -> LayerMap:
    """Every layer of A against every layer of B on the same ``images`` (N, H, W[, C]).

    ``weights_b=None`` (or the same weights) maps A against itself with one forward pass
    per batch. ``layers``/``layers_b``: ``'all_blocks'`` or Keras names. ``methods`` from
    :data:`MAP_METHODS` (``debiased_cka`` = minibatch linear CKA, unbiased HSIC per
    batch; ``linear_cka`` = biased CKA of all datapoints). ``spatial``: ``'pool'`` or
    ``'grid'`` (module docstring). ``mesh``: a 1-D ``data`` mesh (default: every device);
    ``batch_size`` must be a multiple of its size. ``compute_dtype='bfloat16'`` runs the
    forward passes in bf16 (statistics stay float32; see BENCHMARKS for its effect).
    ``progress``: throttled lines of the streamed pass (images done, ETA), then one line
    per method finished.
    """
    methods = sim.check_methods(methods, need="maps", what="layer_map: methods")
    if spatial not in MAP_SPATIAL:
        raise ValueError(f"layer_map: spatial={spatial!r}; choose 'pool' (global average per "
                         "image) or 'grid' (every position of a common grid).")
    a = act.load_model(weights_a, name_a)
    same = weights_b is None or weights_b is weights_a or (
        isinstance(weights_b, str) and weights_b == weights_a)
    b = None if same else act.load_model(weights_b, name_b)
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.shape[0] < 4:
        raise ValueError(f"layer_map: images must be (N, H, W[, C]) with N >= 4, got "
                         f"{images.shape}.")
    la = all_blocks(a.depth) if layers == "all_blocks" else act.check_layers(a, layers)
    lb_src = layers if layers_b is None else layers_b
    other = b or a
    lb = all_blocks(other.depth) if lb_src == "all_blocks" else act.check_layers(other, lb_src)
    try:
        mesh = act.forward_mesh(batch_size, mesh)
    except ValueError as e:
        raise ValueError(f"layer_map: {e}") from None
    plan = _plan(a, b, images.shape[1:3], la, () if b is None else lb, spatial, grid,
                 max_channels, stats_budget_mb, seed)
    timing = {}
    t0 = time.perf_counter()
    state = _stream(a, b, plan, images, batch_size, preprocessing, mesh, compute_dtype,
                    progress, timing)
    names = [f"{net}:{name}" for net, name, _ in plan.layers]
    joint, cka = streaming.finish_joint(state, plan.segments, names)
    t1 = time.perf_counter()
    out = _finish(a, b, plan, la, lb, joint, cka, methods, images.shape[0], spatial,
                  compute_dtype, dict(rtol=rtol, epsilon=epsilon, keep=keep), progress)
    out.timing = dict(timing, stream=t1 - t0, finish=time.perf_counter() - t1)
    if progress is not None:
        t = out.timing
        progress.say(f"map done in {format_duration(t['stream'] + t['finish'])}: first batch "
                     f"{format_duration(t['first_batch'])} (compilation), the other batches "
                     f"{format_duration(t['stream'] - t['first_batch'])}, per-pair finish "
                     f"{format_duration(t['finish'])}")
    return out


def _stream(a, b, plan, images, batch_size, preprocessing, mesh, compute_dtype, progress=None,
            timing=None):
    """The one pass: forward each batch through each network, accumulate on device;
    ``progress`` waits for the statistics only when its line is due. ``timing`` (a dict)
    gets ``first_batch``: the first batch waited for, its compilation included."""
    layers_a = tuple(sorted({n for net, n, _ in plan.layers if net == "a"}))
    layers_b = tuple(sorted({n for net, n, _ in plan.layers if net == "b"}))
    run_a = act._extractor(act.with_dtype(a.model, compute_dtype), layers_a)
    run_b = act._extractor(act.with_dtype(b.model, compute_dtype), layers_b) if b else None
    feats = _featurizer(plan)
    rows_per_image = 1 if plan.grid is None else plan.grid[0] * plan.grid[1]
    va = act.replicate(a.variables, mesh)
    vb = act.replicate(b.variables, mesh) if b else None
    state = act.replicate(streaming.init_joint(plan.segments[-1][1], len(plan.segments)), mesh)
    mode_a = preprocessing or a.metadata.preprocessing
    mode_b = preprocessing or (b.metadata.preprocessing if b else mode_a)
    n = images.shape[0]
    # Every process holds the same stimulus array and feeds its own slice of each global
    # batch (multi-host: rows [lo, lo + local) of the batch live on this host's devices).
    local = batch_size // jax.process_count()
    lo = jax.process_index() * local
    put = lambda x: act.shard_rows(x, mesh)  # noqa: E731
    norm = act.normalize_on_device
    if progress is not None:
        progress.start(n)
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        valid = min(batch_size, n - start)
        idx = np.r_[np.arange(start, start + valid), np.full(batch_size - valid, start)]
        idx = idx[lo:lo + local]
        raw = act.put_raw(images[idx], mesh)  # one transfer, normalised on device
        acts_a = run_a(va, norm(raw, mode_a))
        acts_b = run_b(vb, norm(raw, mode_b)) if b else {}
        keep = (np.arange(batch_size) < valid).astype(np.float32)[lo:lo + local]
        z = sharding.settled(feats(acts_a, acts_b))
        state = streaming.update_joint(state, z,
                                       put(np.repeat(keep, rows_per_image)), plan.segments)
        if start == 0 and timing is not None:  # one wait, after the compiling batch
            jax.block_until_ready(state)
            timing["first_batch"] = time.perf_counter() - t0
        if progress is not None:
            progress.update(start + valid, wait=lambda: jax.block_until_ready(state))
    return state


def _finish(a, b, plan, la, lb, joint, cka, methods, num_images, spatial, compute_dtype,
            opts, progress=None) -> LayerMap:
    """Per-layer sides once, then every (layer of A, layer of B) pair, float64 on host;
    a ``progress`` line per method."""
    index = {(net, name): i for i, (net, name, _) in enumerate(plan.layers)}
    rows_a = [index[("a", l)] for l in la]
    rows_b = [index[("b" if b is not None else "a", l)] for l in lb]
    seg = plan.segments
    block = lambda i, j: joint.sxx[seg[i][0]:seg[i][1], seg[j][0]:seg[j][1]]  # noqa: E731
    width = lambda i: seg[i][1] - seg[i][0]  # noqa: E731
    cca = [m for m in methods if m in ("mean_cca", "svcca", "pwcca", "paper_cca")]
    too_wide = [plan.layers[i][1] for i in set(rows_a + rows_b) if width(i) >= joint.n]
    if cca and too_wide:
        raise TooFewDatapoints(
            f"layer_map: CCA needs more datapoints than channels, but {joint.n} datapoints "
            f"< the channels of {sorted(too_wide)}. Use more images, spatial='grid', or a "
            "smaller max_channels (or only CKA methods).")
    values = {}
    for k, m in enumerate(methods):
        t0 = progress.clock() if progress is not None else 0.0
        mat = np.zeros((len(rows_a), len(rows_b)))
        if m == "debiased_cka":
            mat = cka[np.ix_(rows_a, rows_b)]
        elif m == "linear_cka":
            for p, i in enumerate(rows_a):
                for q, j in enumerate(rows_b):
                    den = np.linalg.norm(block(i, i)) * np.linalg.norm(block(j, j))
                    mat[p, q] = np.sum(block(i, j) ** 2) / den if den > 0 else 0.0
        else:
            side = _side_fn(m, opts)
            sides = {i: side(block(i, i)) for i in set(rows_a + rows_b)}
            for p, i in enumerate(rows_a):
                for q, j in enumerate(rows_b):
                    mat[p, q] = cov_lib.pair_value(m, sides[i], sides[j], block(i, j))
        values[m] = mat
        if progress is not None:
            progress.say(f"{m} {len(rows_a)}x{len(rows_b)} ({k + 1}/{len(methods)} methods), "
                         f"{format_duration(progress.clock() - t0)}")
    sp = "pool (global average per image)" if plan.grid is None else (
        f"grid {plan.grid[0]}x{plan.grid[1]} (every position of a common grid)")
    other = b or a
    return LayerMap(a.name, other.name, tuple(la), tuple(lb), values, joint.n, num_images, sp,
                    tuple(width(i) for i in rows_a), tuple(width(j) for j in rows_b),
                    compute_dtype)


def _side_fn(method, opts):
    if method == "svcca":
        return functools.partial(cov_lib.svcca_side, keep=opts["keep"], rtol=opts["rtol"])
    eps = opts["epsilon"] if method == "paper_cca" else None
    return functools.partial(cov_lib.cca_side, rtol=opts["rtol"], epsilon=eps)
