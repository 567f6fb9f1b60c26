"""The one mesh-sharded forward pass: a classifier over every example of a source, once.

Used by training (periodic validation and the final evaluation), by
``python -m medtransfer_jax.evaluate`` (:mod:`medtransfer_jax.inference.evaluation`) and
by the benchmarks. Batches are global arrays split over the mesh's ``data`` axis
(sharding.make_global_batch); outputs are gathered to every host and put back in source
order, so the result does not depend on the number of devices or hosts.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from medtransfer_jax import data as data_lib
from medtransfer_jax import sharding as shard_lib
from medtransfer_jax.inference import metrics as metrics_lib
from medtransfer_jax.ticker import Ticker


#: Eval batches queued on the device before the oldest one's outputs are read.
EVAL_LAG = 2


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy (B,) of logits (B, K) against int labels (B,),
    in float32 (the train step's loss and the eval step's ``loss`` output)."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)


def make_eval_step(model, mesh: Mesh, variables_sharding: Any, *, num_classes: int) -> Callable:
    """Returns ``eval_step(variables, batch) -> outputs`` (inference mode).

    batch: {'image': (B, H, W, 3), 'label': (B,), optional 'weight', 'index': (B,)}.
    outputs: {'probs': (B, K) softmax, 'loss': (B,) per-example cross-entropy, 'label',
    'weight', 'index': passed through} -- all sharded over ``data`` like the batch, so
    sharding.gather_to_host can assemble them on every host.
    """

    def eval_step(variables, batch):
        logits = model.apply(variables, batch["image"], train=False)
        out = {"probs": jax.nn.softmax(logits.astype(jnp.float32), -1),
               "loss": cross_entropy(logits, batch["label"], num_classes)}
        for k in ("label", "weight", "index"):
            if k in batch:
                out[k] = batch[k]
        return out

    bs = shard_lib.batch_sharding(mesh)
    return jax.jit(eval_step, in_shardings=(variables_sharding, bs), out_shardings=bs)


def evaluate_source(eval_step, variables, source, mesh, *, image_size: int, preprocessing: str,
                    batch_size: int, worker_count: int = 0, resize_method: str = "bilinear",
                    reported_auc: Optional[str] = None, batches: Optional[Any] = None,
                    progress: Optional[Ticker] = None) -> Tuple[Dict[str, float], Dict]:
    """Runs ``eval_step`` over every example of ``source`` once.

    ``batch_size``: the global batch (a multiple of the mesh size; the last batch is
    padded with weight-0 rows, which are dropped). ``batches``: the eval batches of
    ``source`` when they come from elsewhere (the device-resident cache); else the grain
    eval pipeline reads ``source``. ``progress``: throttled lines (images done, img/s,
    ETA) as batches come back to the host; None (training's evaluations): silent.

    Returns:
      (metrics dict (metrics.classification_metrics), arrays {'index': (N,),
      'label': (N,), 'probs': (N, K), 'loss': (N,)} in source order).
    """
    it = batches if batches is not None else data_lib.make_eval_iter(
        source, image_size=image_size, preprocessing=preprocessing, global_batch_size=batch_size,
        worker_count=worker_count, resize_method=resize_method)
    outs: Dict[str, List[np.ndarray]] = {}
    queued: collections.deque = collections.deque()
    done = 0
    if progress is not None:
        progress.start(len(source), rate_unit="img/s")

    def collect():  # the oldest queued batch's outputs, to the host
        nonlocal done
        for k, v in queued.popleft().items():
            outs.setdefault(k, []).append(shard_lib.gather_to_host(v))
        done += int(np.sum(outs["weight"][-1] > 0))
        if progress is not None:
            progress.update(done)

    for batch in it:
        batch = {k: batch[k] for k in ("image", "label", "weight", "index")}
        queued.append(eval_step(variables, shard_lib.make_global_batch(mesh, batch)))
        # Read a batch's outputs only once the next ones are queued, so the device never
        # waits on the host between batches; the lag bounds what stays on the device.
        if len(queued) > EVAL_LAG:
            collect()
    while queued:
        collect()
    cat = {k: np.concatenate(v) for k, v in outs.items()}
    keep = cat["weight"] > 0
    order = np.argsort(cat["index"][keep], kind="stable")
    arrays = {k: cat[k][keep][order] for k in ("index", "label", "probs", "loss")}
    if len(arrays["index"]) != len(source) or np.any(arrays["index"] != np.arange(len(source))):
        raise RuntimeError(f"evaluation saw {len(arrays['index'])} examples of {len(source)}; "
                           "the eval pipeline must yield every example exactly once")
    mets = metrics_lib.classification_metrics(arrays["label"], arrays["probs"],
                                              loss=float(np.mean(arrays["loss"])) if len(source)
                                              else None, reported_auc=reported_auc)
    return mets, arrays


def ids_groups(source, index: np.ndarray) -> Tuple[List[str], List[str]]:
    """ids / groups of ``source`` rows ``index`` (from its columns, else by reading
    records): the first two columns of the predictions file."""
    ids = getattr(source, "ids", None)
    groups = getattr(source, "groups", None)
    if ids is not None and groups is not None:
        return [str(ids[i]) for i in index], [str(groups[i]) for i in index]
    recs = [source[int(i)] for i in index]
    return [str(r["id"]) for r in recs], [str(r.get("group", r["id"])) for r in recs]
