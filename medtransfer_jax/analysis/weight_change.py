"""How far fine-tuning moved each layer's weights (weight space, no data needed).

Per layer (Keras name), over all of that layer's parameters concatenated (kernel and bias
of a conv/dense, scale and bias of a BatchNorm; optionally the BatchNorm running
statistics): relative L2 change ``||b - a|| / ||a||`` and cosine similarity
``<a, b> / (||a|| ||b||)``, in float64. Layers present in only one tree, or with different
shapes (e.g. a new classification head), are reported with ``status`` instead of numbers.
"""
from __future__ import annotations

import re
from typing import Any, List, Mapping

import numpy as np

from medtransfer_jax.weights import checkpoint


_SUFFIX_RANK = {"conv": 0, "bn": 1}


def _layer_key(name: str):
    """Forward order of Keras ResNet layer names (stem, stages/blocks/sub-layers, head);
    a conv comes before its BatchNorm."""
    if name.startswith("conv1_"):
        return (0, 0, 0, _SUFFIX_RANK.get(name[6:], 2), name)
    m = re.match(r"conv(\d+)_block(\d+)_(\d+)_(\w+)", name)
    if m:
        s, b, j, kind = m.groups()
        # shortcut (_0_) runs beside the block; list it after the block's main path
        return (int(s), int(b), 9 if j == "0" else int(j), _SUFFIX_RANK.get(kind, 2), name)
    return (99, 0, 0, 0, name)


def layer_order(names) -> List[str]:
    return sorted(names, key=_layer_key)


def _kind(name: str, leaves: Mapping[str, Any]) -> str:
    if "kernel" in leaves:
        k = np.asarray(leaves["kernel"])
        return "conv" if k.ndim == 4 else "dense"
    if "scale" in leaves or "mean" in leaves:
        return "batchnorm"
    return "other"


def weight_change(variables_a: Mapping[str, Any], variables_b: Mapping[str, Any], *,
                  include_batch_stats: bool = False) -> List[dict]:
    """Per-layer distance between two variable trees ({'params', 'batch_stats'}).

    Returns rows (network order): ``layer, kind, depth`` (layer index / (L-1)),
    ``num_params, rel_l2, cosine, norm_a, norm_b, status`` ('ok', 'only_in_a',
    'only_in_b', 'shape_mismatch').
    """
    pa = dict(variables_a.get("params", variables_a))
    pb = dict(variables_b.get("params", variables_b))
    if include_batch_stats:
        for tree, src in ((pa, variables_a), (pb, variables_b)):
            for layer, leaves in dict(src.get("batch_stats", {})).items():
                tree[layer] = {**dict(tree.get(layer, {})), **dict(leaves)}
    names = layer_order(set(pa) | set(pb))
    rows = []
    for i, layer in enumerate(names):
        row = dict(layer=layer, depth=i / max(len(names) - 1, 1), kind="", num_params=0,
                   rel_l2=float("nan"), cosine=float("nan"), norm_a=float("nan"),
                   norm_b=float("nan"), status="ok")
        if layer not in pa or layer not in pb:
            row["status"] = "only_in_a" if layer in pa else "only_in_b"
            row["kind"] = _kind(layer, pa.get(layer) or pb.get(layer))
            rows.append(row)
            continue
        la, lb = dict(pa[layer]), dict(pb[layer])
        row["kind"] = _kind(layer, la)
        keys = sorted(set(la) | set(lb))
        if set(la) != set(lb) or any(np.shape(la[k]) != np.shape(lb[k]) for k in keys):
            row["status"] = "shape_mismatch"
            rows.append(row)
            continue
        a = np.concatenate([np.asarray(la[k], np.float64).ravel() for k in keys])
        b = np.concatenate([np.asarray(lb[k], np.float64).ravel() for k in keys])
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        row.update(num_params=int(a.size), norm_a=float(na), norm_b=float(nb),
                   rel_l2=float(np.linalg.norm(b - a) / na) if na > 0 else float("nan"),
                   cosine=float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan"))
        rows.append(row)
    return rows


def weight_change_dirs(dir_a: str, dir_b: str, **kw) -> List[dict]:
    """:func:`weight_change` between two weights directories (e.g. pre-trained, fine-tuned)."""
    va, ma = checkpoint.load_weights(dir_a)
    vb, mb = checkpoint.load_weights(dir_b)
    if (ma.depth, ma.layout, ma.width) != (mb.depth, mb.layout, mb.width):
        raise ValueError(f"{dir_a} is ResNet{ma.depth}/{ma.layout}/width {ma.width} but {dir_b} "
                         f"is ResNet{mb.depth}/{mb.layout}/width {mb.width}; weight change "
                         "needs the same architecture.")
    return weight_change(va, vb, **kw)
