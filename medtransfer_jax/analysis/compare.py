"""Layer-by-layer comparison of two networks on the same images.

* :class:`PaperCCAProtocol` is the Revisiting study's CCA exactly: mean CCA (all canonical
  correlations, svcca covariance semantics, epsilon 1e-12) on the five stage outputs
  (``stage_output_names(50)``: conv1_relu, conv2_block3_out, conv3_block4_out,
  conv4_block6_out, conv5_block3_out); per layer ``round(10000 / (h*w))`` images, every
  spatial position a datapoint; a random subset of 64 channels shared by both networks;
  5 repeats with new images and channels, averaged. One deliberate difference from the
  study's script: within a repeat all layers take their images as prefixes of one random
  permutation of the pool (the script drew an independent batch per layer), so each
  repeat needs one forward pass per network instead of one per layer; every layer still
  gets a uniformly random image subset per repeat, so per-layer values have the same
  distribution.
* :func:`compare_networks` is the general form: any layers, any :data:`similarity.METHODS`,
  ``spatial='positions'`` or ``'pool'``, optional channel subsampling, repeats; or
  ``streaming=True`` to use every position of every image through the streaming
  accumulators (covariance-based methods and minibatch debiased CKA).

Rows returned (one per layer and method) are plain dicts, ready for CSV/JSON:
``model_a, model_b, layer, method, value (mean over repeats), std, repeats, datapoints,
channels, spatial, values (per repeat)``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from medtransfer_jax.inference import activations as act
from medtransfer_jax.analysis import layer_map
from medtransfer_jax.analysis import similarity as sim
from medtransfer_jax.analysis import streaming
from medtransfer_jax.models import resnet
from medtransfer_jax.ticker import Ticker

ModelLike = Union[str, act.LoadedModel]


# CCA.py's stimulus resolution per dataset (fine-tuning used 256 px for breast/thyroid).
PAPER_CCA_IMAGE_SIZE = {"pcam": 96, "pcam-small": 96, "pcam-middle": 96, "breast": 224,
                        "mammograms": 224, "thyroid": 224}
PAPER_CCA_DEFAULT_IMAGE_SIZE = 112  # chest, knee, isic


@dataclasses.dataclass(frozen=True)
class PaperCCAProtocol:
    """The Revisiting study's CCA protocol (defaults = the paper's CCA.py).

    Inputs, as CCA.py did them (DovileDo/revisiting-transfer ``src/CCA.py``):
    * ``preprocessing='caffe'``: Keras ``preprocess_input`` (caffe: RGB->BGR, mean
      subtracted, no scaling) is fed to **every** model, RadImageNet included, although
      RadImageNet was fine-tuned on (BGR - mean)/255. ``None`` gives each model its own
      metadata preprocessing instead (what a model was trained on; not the paper).
    * ``stimulus_split='val'``: the stimuli are images of one split of the fold; the
      published results used the validation-fold CSV.
    * ``image_size``: stimulus resolution; None = :func:`paper_image_size` of the dataset
      (224 for breast, mammograms, thyroid; 96 for pcam; 112 otherwise), which callers
      loading the stimuli should use. Images of another size are refused.
    """
    layers: Optional[Tuple[str, ...]] = None  # None -> stage_output_names(depth)
    positions: int = 10000
    num_channels: int = 64
    repeats: int = 5
    method: str = "paper_cca"
    epsilon: float = 1e-12
    seed: int = 0
    batch_size: int = 64
    preprocessing: Optional[str] = "caffe"
    stimulus_split: str = "val"
    image_size: Optional[int] = None

    @classmethod
    def for_dataset(cls, dataset: str, **overrides) -> "PaperCCAProtocol":
        """The paper's protocol for ``dataset`` (its CCA.py stimulus size filled in)."""
        return cls(**{"image_size": paper_image_size(dataset), **overrides})


def paper_image_size(dataset: str) -> int:
    """CCA.py's stimulus size for a dataset key (breast, thyroid, mammograms: 224)."""
    return PAPER_CCA_IMAGE_SIZE.get(dataset.split("/")[0], PAPER_CCA_DEFAULT_IMAGE_SIZE)


@dataclasses.dataclass
class Draw:
    """The datapoints of one (layer, repeat): image indices into the pool and channels."""
    layer: str
    repeat: int
    images: np.ndarray
    channels: Optional[np.ndarray]


def make_plan(shapes: Dict[str, Tuple[int, ...]], num_images: int, *, positions: int,
              num_channels: Optional[int], repeats: int, seed: int,
              spatial: str = "positions") -> List[Draw]:
    """Random draws per (layer, repeat), deterministic from ``seed``.

    ``shapes``: per-image activation shape per layer ((h, w, C) or (C,)). In ``positions``
    mode a layer with an h x w map takes ``min(N, round(positions/(h*w)))`` images; in
    ``pool`` mode all N images. Within a repeat, layers use prefixes of one permutation.
    """
    rng = np.random.default_rng(seed)
    draws = []
    for r in range(repeats):
        perm = rng.permutation(num_images)
        for layer, shape in shapes.items():
            if spatial == "positions" and len(shape) == 3:
                n_img = min(num_images, act.images_per_layer(shape[0], shape[1], positions))
            else:
                n_img = num_images
            c = shape[-1]
            ch = None
            if num_channels is not None and num_channels < c:
                ch = np.sort(rng.choice(c, num_channels, replace=False))
            draws.append(Draw(layer, r, np.sort(perm[:n_img]), ch))
    return draws


#: CCA of n datapoints in p dimensions is biased towards 1 as p/n grows; below this many
#: datapoints per channel a warning says so (SVCCA's authors suggest well over 10).
MIN_DATAPOINTS_PER_CHANNEL = 10


def warn_few_datapoints(draws: Sequence[Draw], shapes, spatial: str, positions: int,
                        methods: Sequence[str]) -> List[str]:
    """Returns one warning per layer whose first draw has fewer datapoints than the
    protocol asks (``positions``) or, for the CCA family, fewer than
    MIN_DATAPOINTS_PER_CHANNEL per channel (values there are inflated, silently otherwise),
    and logs each distinct one once per process."""
    cca = any(sim.REGISTRY[m].cca for m in methods if m in sim.REGISTRY)
    out = []
    for d in draws:
        if d.repeat != 0:
            continue
        shape = shapes[d.layer]
        per_image = shape[0] * shape[1] if spatial == "positions" and len(shape) == 3 else 1
        n = len(d.images) * per_image
        p = len(d.channels) if d.channels is not None else shape[-1]
        short = spatial == "positions" and len(shape) == 3 and n < 0.9 * positions
        if short or (cca and n < MIN_DATAPOINTS_PER_CHANNEL * p):
            out.append(f"{d.layer}: {n} datapoints from {len(d.images)} image(s) for {p} "
                       f"channels" + (f" (the protocol asks ~{positions})" if short else "")
                       + (f"; CCA is biased upward below {MIN_DATAPOINTS_PER_CHANNEL} per "
                          "channel" if cca and n < MIN_DATAPOINTS_PER_CHANNEL * p else "")
                       + ": give more images")
            if out[-1] not in _WARNED:  # a study compares many pairs on the same shapes
                _WARNED.add(out[-1])
                logging.warning("compare: %s", out[-1])
    return out


_WARNED: set = set()


def _shapes_for(a: act.LoadedModel, b: act.LoadedModel, image_hw, layers):
    sa = act.layer_shapes(a, image_hw, layers)
    sb = act.layer_shapes(b, image_hw, layers)
    for l in layers:
        if sa[l] != sb[l]:
            raise ValueError(
                f"Layer {l} has shape {sa[l]} in {a.name} but {sb[l]} in {b.name}; the two "
                "networks must share the architecture (depth/width) to compare the same "
                "channels. Compare pooled features of different widths with spatial='pool' "
                "and num_channels=None, or different layers via layer_pairs.")
    return sa


def collect_draws(a: act.LoadedModel, b: act.LoadedModel, images, draws: Sequence[Draw], *,
                  spatial: str = "positions", batch_size: int = 64,
                  preprocessing: Optional[str] = None,
                  layer_pairs: Optional[Dict[str, Tuple[str, str]]] = None, mesh=None,
                  compute_dtype: str = "float32", progress: Optional[Ticker] = None
                  ) -> List[Tuple[jnp.ndarray, jnp.ndarray]]:
    """Datapoint matrices (X (n, p), Y (n, q)) for every draw, kept on device.

    One forward pass per network and repeat over the union of that repeat's images, in
    fixed-shape batches (normalised batch by batch); after each batch only the rows and
    channels some draw needs are kept, so memory is O(datapoints x channels) rather than
    all stage maps of all images. ``layer_pairs`` maps a row name to (layer of A, layer of
    B) for cross-layer comparisons (maps brought to a common grid by
    :func:`activations.match_spatial`). Rows are ordered by image index. Forward batches
    are split over ``mesh`` (default :func:`activations.forward_mesh`). ``progress``: its
    throttled line after a batch (images forwarded of all repeats, the repeat), once
    that batch's arrays are computed.
    """
    mesh = act.forward_mesh(batch_size, mesh)
    va, vb = act.replicate(a.variables, mesh), act.replicate(b.variables, mesh)
    layer_pairs = layer_pairs or {d.layer: (d.layer, d.layer) for d in draws}
    run_a = act._extractor(act.with_dtype(a.model, compute_dtype),
                           tuple(sorted({layer_pairs[d.layer][0] for d in draws})))
    run_b = act._extractor(act.with_dtype(b.model, compute_dtype),
                           tuple(sorted({layer_pairs[d.layer][1] for d in draws})))
    mode_a = preprocessing or a.metadata.preprocessing
    mode_b = preprocessing or b.metadata.preprocessing
    images = np.asarray(images)
    parts: List[List[Tuple]] = [[] for _ in draws]
    by_repeat: Dict[int, List[int]] = {}
    for i, d in enumerate(draws):
        by_repeat.setdefault(d.repeat, []).append(i)
    needs = [np.unique(np.concatenate([draws[i].images for i in idx]))
             for _, idx in sorted(by_repeat.items())]
    if progress is not None:
        progress.start(sum(len(n) for n in needs))
    done = 0
    for r, ((_, idx), needed) in enumerate(zip(sorted(by_repeat.items()), needs)):
        for start in range(0, len(needed), batch_size):
            chunk = needed[start:start + batch_size]
            pad = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[0])])
            raw = act.put_raw(images[pad], mesh)  # one transfer, normalised on device
            acts_a = run_a(va, act.normalize_on_device(raw, mode_a))
            acts_b = run_b(vb, act.normalize_on_device(raw, mode_b))
            # The per-draw row/channel picks below are irregular eager gathers: run them on
            # one replicated copy of this batch's maps, not on data-sharded arrays (XLA:CPU
            # aborted now and then reshaping such a gather over 8 devices).
            acts_a, acts_b = act.replicate(acts_a, mesh), act.replicate(acts_b, mesh)
            for i in idx:
                d = draws[i]
                rows = np.nonzero(np.isin(chunk, d.images))[0]
                if rows.size == 0:
                    continue
                name_a, name_b = layer_pairs[d.layer]
                A = acts_a[name_a][rows].astype(jnp.float32)
                B = acts_b[name_b][rows].astype(jnp.float32)
                if spatial == "positions":
                    A, B = act.match_spatial(A, B)
                X = act.spatial_datapoints(A, spatial)
                Y = act.spatial_datapoints(B, spatial)
                if d.channels is not None:
                    ch = jnp.asarray(d.channels)
                    X, Y = X[:, ch], Y[:, ch]
                parts[i].append((X, Y))
            done += len(chunk)
            if progress is not None:
                progress.update(done, f"repeat {r + 1}/{len(needs)}",
                                wait=lambda: jax.block_until_ready((acts_a, acts_b, parts)))
    return [(jnp.concatenate([p[0] for p in ps]), jnp.concatenate([p[1] for p in ps]))
            for ps in parts]


def _summarise(draws, values, method, a, b, spatial, pairs_xy) -> List[dict]:
    rows = []
    layers = list(dict.fromkeys(d.layer for d in draws))
    for layer in layers:
        sel = [i for i, d in enumerate(draws) if d.layer == layer]
        vals = [float(values[i]) for i in sel]
        X, Y = pairs_xy[sel[0]]
        rows.append(dict(model_a=a.name, model_b=b.name, layer=layer, method=method,
                         value=float(np.mean(vals)), std=float(np.std(vals)),
                         repeats=len(vals), datapoints=int(X.shape[0]),
                         channels=int(X.shape[1]), spatial=spatial, values=vals))
    return rows


def compare_networks(weights_a: ModelLike, weights_b: ModelLike, images, *,
                     layers: Optional[Sequence[str]] = None,
                     method: Union[str, Sequence[str]] = "mean_cca",
                     spatial: str = "positions", positions: int = 10000,
                     num_channels: Optional[int] = None, repeats: int = 1, seed: int = 0,
                     batch_size: int = 64, preprocessing: Optional[str] = None,
                     layer_pairs: Optional[Dict[str, Tuple[str, str]]] = None,
                     streaming_mode: bool = False, name_a: Optional[str] = None,
                     name_b: Optional[str] = None, pairs: str = "same",
                     max_channels: Optional[int] = None, mesh=None,
                     compute_dtype: str = "float32", progress: Optional[Ticker] = None,
                     **options) -> List[dict]:
    """Similarity of two networks layer by layer on the same ``images``.

    Args:
      weights_a, weights_b: weights directories or :class:`activations.LoadedModel`.
      images: raw pixels (N, H, W[, C]) in [0, 255]; each network normalises them with its
        own ``metadata.preprocessing`` unless ``preprocessing`` is given.
      layers: Keras names (default: the stage outputs). ``layer_pairs`` instead maps a row
        name to (layer of A, layer of B).
      method: one name or a list from :data:`similarity.METHODS`; all are computed on the
        same draws.
      spatial: ``positions`` (round(positions/(h*w)) images per layer, every position a
        datapoint) or ``pool`` (global average, one datapoint per image).
      num_channels: random channel subset shared by both networks (None = all).
      repeats: independent draws of images (and channels), averaged.
      streaming_mode: use every position of every image (no ``positions`` cap) through
        :class:`streaming.StreamingSimilarity`; methods limited to covariance-based ones
        and debiased_cka (minibatch estimator, one HSIC per forward batch).
      pairs: ``'same'`` (layer i of A vs layer i of B) or ``'all'``: every layer of A
        against every layer of B in one streamed pass (:func:`layer_map.layer_map`; methods
        from :data:`layer_map.MAP_METHODS`, ``spatial`` 'pool' or 'grid', channel cap
        ``max_channels``, ``mesh``/``compute_dtype`` for the forward passes); rows then
        carry ``layer_a``/``layer_b`` and ``layer`` = 'A~B'.
      layers: Keras names, ``'all_blocks'`` (conv1_relu + every block output) or None
        (the stage outputs).
      progress: a :class:`ticker.Ticker` for throttled lines of the forward passes
        (images done of all repeats, ETA); None: silent.
      options: passed to the kernels (``rtol``, ``epsilon``, ``keep``, ``threshold``,
        ``kernel``, ``route``).
    Returns:
      rows (see module docstring).
    """
    if pairs not in ("same", "all"):
        raise ValueError(f"pairs={pairs!r}: choose 'same' (layer by layer) or 'all' (every "
                         "layer of A against every layer of B).")
    if pairs == "all":
        methods = [method] if isinstance(method, str) else list(method)
        kw = {k: v for k, v in options.items() if k in ("rtol", "epsilon", "keep")}
        lmap = layer_map.layer_map(
            weights_a, weights_b, images, layers=layers or "all_blocks", methods=methods,
            spatial=spatial, max_channels=max_channels or num_channels,
            batch_size=batch_size, preprocessing=preprocessing, seed=seed, mesh=mesh,
            compute_dtype=compute_dtype, name_a=name_a, name_b=name_b, progress=progress, **kw)
        return lmap.rows()
    a = act.load_model(weights_a, name_a)
    b = act.load_model(weights_b, name_b)
    if name_a:
        a = dataclasses.replace(a, name=name_a)
    if name_b:
        b = dataclasses.replace(b, name=name_b)
    methods = [method] if isinstance(method, str) else list(method)
    sim.check_methods(methods, what="compare_networks")
    if spatial not in act.SPATIAL_MODES:
        raise ValueError(f"spatial={spatial!r}: choose one of {act.SPATIAL_MODES}.")
    images = np.asarray(images)
    if images.ndim not in (3, 4) or images.shape[0] < 2:
        raise ValueError(f"images must be (N, H, W[, C]) with N >= 2, got {images.shape}.")
    layer_pairs, shapes = _resolve_layers(a, b, images.shape[1:3], layers, layer_pairs,
                                          num_channels)
    if streaming_mode:
        return _compare_streaming(a, b, images, layer_pairs, methods, spatial, num_channels,
                                  seed, batch_size, preprocessing, shapes, options, mesh,
                                  progress)
    draws = make_plan(shapes, images.shape[0], positions=positions, num_channels=num_channels,
                      repeats=repeats, seed=seed, spatial=spatial)
    warn_few_datapoints(draws, shapes, spatial, positions, methods)
    pairs = collect_draws(a, b, images, draws, spatial=spatial, batch_size=batch_size,
                          preprocessing=preprocessing, layer_pairs=layer_pairs, mesh=mesh,
                          compute_dtype=compute_dtype, progress=progress)
    rows: List[dict] = []
    for m in methods:
        opts = _method_options(m, options)
        try:
            values = sim.similarity_many(pairs, m, labels=[d.layer for d in draws], **opts)
        except ValueError as e:
            raise type(e)(f"{a.name} vs {b.name}: {e}") from e
        rows.extend(_summarise(draws, values, m, a, b, spatial, pairs))
    return rows


def _resolve_layers(a, b, image_hw, layers, layer_pairs, num_channels):
    """(layer_pairs {row: (layer of A, layer of B)}, per-row activation shape) for
    ``layers`` (names, 'all_blocks' or None = stage outputs) or explicit ``layer_pairs``."""
    if layer_pairs is None:
        layers = (layer_map.all_blocks(a.depth) if layers == "all_blocks" else
                  tuple(layers) if layers else resnet.stage_output_names(a.depth))
        act.check_layers(a, layers)
        act.check_layers(b, layers)
        return {l: (l, l) for l in layers}, _shapes_for(a, b, image_hw, layers)
    act.check_layers(a, [p[0] for p in layer_pairs.values()])
    act.check_layers(b, [p[1] for p in layer_pairs.values()])
    sa = act.layer_shapes(a, image_hw, [p[0] for p in layer_pairs.values()])
    sb = act.layer_shapes(b, image_hw, [p[1] for p in layer_pairs.values()])
    shapes = {}
    for name, (la, lb) in layer_pairs.items():
        ta, tb = sa[la], sb[lb]
        if num_channels is not None and ta[-1] != tb[-1]:
            raise ValueError(f"{name}: {la} has {ta[-1]} channels and {lb} {tb[-1]}; a "
                             "shared channel subset needs equal counts (num_channels=None).")
        hw = tuple(min(x, y) for x, y in zip(ta[:-1], tb[:-1]))
        shapes[name] = hw + (ta[-1],)
    return layer_pairs, shapes


def _method_options(method: str, options: dict) -> dict:
    allowed = {"mean_cca": ("rtol", "route"), "paper_cca": ("rtol", "epsilon", "route"),
               "svcca": ("rtol", "keep", "route"), "pwcca": ("rtol", "route"),
               "linear_cka": ("route",),
               "rbf_cka": ("threshold",), "debiased_cka": ("kernel", "threshold"),
               "procrustes": ()}[method]
    return {k: v for k, v in options.items() if k in allowed and v is not None}


def run_paper_protocol(weights_a: ModelLike, weights_b: ModelLike, images,
                       protocol: PaperCCAProtocol = PaperCCAProtocol(), *,
                       preprocessing: Optional[str] = None, name_a: Optional[str] = None,
                       name_b: Optional[str] = None, mesh=None,
                       compute_dtype: str = "float32", progress: Optional[Ticker] = None
                       ) -> List[dict]:
    """The Revisiting CCA (``protocol`` defaults) between two networks; rows as
    :func:`compare_networks`. Layers with fewer channels than ``num_channels`` use all.

    ``preprocessing`` overrides ``protocol.preprocessing`` (caffe for every model, as the
    paper); ``images`` must be ``protocol.image_size`` px when that is set.
    """
    images = np.asarray(images)
    if protocol.image_size and tuple(images.shape[1:3]) != (protocol.image_size,) * 2:
        raise ValueError(
            f"The paper CCA protocol uses {protocol.image_size} px stimuli (CCA.py), got "
            f"images of {images.shape[1]}x{images.shape[2]}; load the "
            f"'{protocol.stimulus_split}' split at {protocol.image_size} px or set "
            "image_size=None in the protocol.")
    a = act.load_model(weights_a, name_a)
    layers = protocol.layers or resnet.stage_output_names(a.depth)
    return compare_networks(
        a, weights_b, images, layers=layers, method=protocol.method, spatial="positions",
        positions=protocol.positions, num_channels=protocol.num_channels,
        repeats=protocol.repeats, seed=protocol.seed, batch_size=protocol.batch_size,
        preprocessing=preprocessing or protocol.preprocessing, epsilon=protocol.epsilon,
        name_a=name_a, name_b=name_b, mesh=mesh, compute_dtype=compute_dtype,
        progress=progress)


def _compare_streaming(a, b, images, layer_pairs, methods, spatial, num_channels, seed,
                       batch_size, preprocessing, shapes, options, mesh=None,
                       progress: Optional[Ticker] = None) -> List[dict]:
    sim.check_methods(methods, need="streaming", what="streaming_mode")
    rng = np.random.default_rng(seed)
    channels = {}
    for name, shape in shapes.items():
        c = shape[-1]
        channels[name] = (np.sort(rng.choice(c, num_channels, replace=False))
                          if num_channels is not None and num_channels < c else None)
    dims = {n: (len(ch) if ch is not None else shapes[n][-1],) * 2 for n, ch in channels.items()}
    kw = {k: v for k, v in options.items() if k in ("rtol", "epsilon", "keep", "kernel",
                                                    "threshold") and v is not None}
    acc = streaming.StreamingSimilarity(dims, methods, **kw)
    mode_a = preprocessing or a.metadata.preprocessing
    mode_b = preprocessing or b.metadata.preprocessing
    run_a = act._extractor(a.model, tuple(sorted({p[0] for p in layer_pairs.values()})))
    run_b = act._extractor(b.model, tuple(sorted({p[1] for p in layer_pairs.values()})))
    n = images.shape[0]
    mesh = act.forward_mesh(batch_size, mesh)
    va, vb = act.replicate(a.variables, mesh), act.replicate(b.variables, mesh)
    if progress is not None:
        progress.start(n)
    for start in range(0, n, batch_size):
        # Fixed batch shape (padded rows masked out): one compile for the whole stream.
        valid = min(batch_size, n - start)
        idx = np.r_[np.arange(start, start + valid), np.full(batch_size - valid, start)]
        raw = act.put_raw(images[idx], mesh)  # one transfer, normalised on device
        acts_a = run_a(va, act.normalize_on_device(raw, mode_a))
        acts_b = run_b(vb, act.normalize_on_device(raw, mode_b))
        image_mask = (np.arange(batch_size) < valid).astype(np.float32)
        xs, ys, masks = {}, {}, {}
        for name, (na, nb) in layer_pairs.items():
            A, B = acts_a[na], acts_b[nb]
            if spatial == "positions":
                A, B = act.match_spatial(A, B)
            X, Y = act.spatial_datapoints(A, spatial), act.spatial_datapoints(B, spatial)
            if channels[name] is not None:
                ch = jnp.asarray(channels[name])
                X, Y = X[:, ch], Y[:, ch]
            xs[name], ys[name] = X, Y
            masks[name] = jnp.asarray(np.repeat(image_mask, X.shape[0] // batch_size))
        acc.update(xs, ys, masks)
        if progress is not None:
            progress.update(start + valid, wait=lambda: jax.block_until_ready((acc.cov, acc.mb)))
    table = acc.finish()
    rows = []
    for name in layer_pairs:
        for m in methods:
            rows.append(dict(model_a=a.name, model_b=b.name, layer=name, method=m,
                             value=float(table[name][m]), std=0.0, repeats=1,
                             datapoints=table[name]["datapoints"], channels=dims[name][0],
                             spatial=f"{spatial}+streaming", values=[float(table[name][m])]))
    return rows
