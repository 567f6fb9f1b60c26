"""Keras ResNet ``.h5`` files -> Flax variables, with h5py only (no TensorFlow).

Why name-based reading: the Flax ResNet uses the Keras layer names, so conversion is
a 1:1 name map; kernels are already HWIO. Keras writes the same weights in several
container layouts, all handled here:

* ``model.save``    legacy full model (Keras 2 and Keras 3 ``model.save('x.h5')``,
                    RadImageNet's ``RadImageNet-ResNet50_notop.h5``):
                    ``model_weights/<layer>/<layer>/kernel:0`` (Keras 3 drops ``:0``).
* ``save_weights``  legacy weights only (Keras 2 ``save_weights('x.h5')``, the
                    keras-applications ``resnet50_weights_tf_dim_ordering_tf_kernels.h5``):
                    the same groups at the top level, with a ``layer_names`` attribute.
* ``keras3_weights`` Keras 3 ``save_weights('x.weights.h5')``:
                    ``layers/<auto name>/vars/{0,1,...}`` with the layer name in the
                    ``name`` attribute (older files without it are mapped by layer order).
* ``keras3_archive`` a Keras 3 ``.keras`` zip; its ``model.weights.h5`` is read.

Models nested in a wrapper (``model_weights/resnet50/conv1_conv/kernel:0``) and the
caffe-era names of the 2016 files (``res2a_branch2a``, ``bn_conv1``, ``fc1000``) are
recognised too. Depth, width and head presence come from the layer names/shapes.
"""
from __future__ import annotations

import io
import re
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from medtransfer_jax.models import resnet
from medtransfer_jax.weights import _common
from medtransfer_jax.weights.checkpoint import CheckpointError

_LAYER_RE = re.compile(
    r"^(?:conv1_(?P<stem>conv|bn)|conv(?P<stage>[2-5])_block(?P<block>\d+)_(?P<part>[0-3])_"
    r"(?P<kind>conv|bn)|(?P<head>predictions))$")
# Caffe-era names (fchollet/deep-learning-models 2016): res2a_branch2b, bn3c_branch1, ...
_CAFFE_RE = re.compile(r"^(?P<t>res|bn)(?P<stage>[2-5])(?P<letter>[a-z])_branch(?P<branch>1|2a|2b|2c)$")
_CAFFE_SIMPLE = {"conv1": "conv1_conv", "bn_conv1": "conv1_bn", "fc1000": "predictions"}
_CAFFE_PART = {"1": 0, "2a": 1, "2b": 2, "2c": 3}

# Keras weight names (last path component, ':0' stripped) -> (collection, leaf).
_CONV_ROLES = {"kernel": "kernel", "W": "kernel", "bias": "bias", "b": "bias"}
_BN_ROLES = {"gamma": ("params", "scale"), "beta": ("params", "bias"),
             "moving_mean": ("batch_stats", "mean"), "running_mean": ("batch_stats", "mean"),
             "moving_variance": ("batch_stats", "var"),
             # Keras 1 called the variance "running_std" (it always held the variance).
             "running_std": ("batch_stats", "var"), "running_variance": ("batch_stats", "var")}
# Variable order inside a Keras 3 ``vars`` group.
_VARS_ORDER = {"conv": [("params", "kernel"), ("params", "bias")],
               "bn": [("params", "scale"), ("params", "bias"),
                      ("batch_stats", "mean"), ("batch_stats", "var")],
               "dense": [("params", "kernel"), ("params", "bias")]}
_AUTO_CLASS = {"conv2d": "conv", "batch_normalization": "bn", "dense": "dense"}

Key = Tuple[str, str, str]


def canonical_layer(name: str) -> Optional[str]:
    """A Keras layer name -> the Flax layer name, or None if it is not a ResNet layer."""
    if _LAYER_RE.match(name):
        return name
    if name in _CAFFE_SIMPLE:
        return _CAFFE_SIMPLE[name]
    m = _CAFFE_RE.match(name)
    if m:
        block = ord(m["letter"]) - ord("a") + 1
        kind = "conv" if m["t"] == "res" else "bn"
        return f"conv{m['stage']}_block{block}_{_CAFFE_PART[m['branch']]}_{kind}"
    return None


def _layer_kind(layer: str) -> str:
    return "dense" if layer == "predictions" else layer.rsplit("_", 1)[-1]


def _role(layer: str, weight_name: str) -> Optional[Tuple[str, str]]:
    """(collection, leaf) for a Keras weight name such as 'kernel:0' or 'conv1_W:0'."""
    base = weight_name.split(":")[0]
    kind = _layer_kind(layer)
    table = _BN_ROLES if kind == "bn" else {k: ("params", v) for k, v in _CONV_ROLES.items()}
    if base in table:
        return table[base]
    for prefix in sorted(table, key=len, reverse=True):  # Keras 1: '<layer>_W', '<layer>_gamma'
        if base.endswith("_" + prefix):
            return table[prefix]
    return None


def load_keras_h5(path: str, depth: Optional[int] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Reads a Keras ResNet (v1) weights file into Flax variables.

    Args:
      path: ``.h5`` from ``model.save``/``save_weights`` (Keras 2 or 3), a Keras 3
        ``.weights.h5``, or a ``.keras`` archive.
      depth: expected depth (50/101/152); ``None`` infers it from the layer names.

    Returns:
      (variables, info). ``variables = {'params': {layer: {leaf: float32}},
      'batch_stats': {bn_layer: {'mean', 'var'}}}`` for ``ResNet(layout='keras_v1')``
      with conv kernels (kh, kw, in, out) and head kernel (C, num_classes).
      ``info`` has ``format, h5_layout, layout, depth, width, num_classes, has_head,
      num_layers, ignored, keras_version, path``.

    Raises:
      CheckpointError naming the file (and the layer and both shapes) when the file
      is not HDF5, is truncated, lacks a layer, or has a wrong shape.
    """
    path = _common.check_input_file(path, "Keras .h5")
    kind = _common.sniff(path)
    if kind == "zip":
        return _load_keras_archive(path, depth)
    if kind != "hdf5":
        hint = (" It looks like a PyTorch file: use --format=torchvision."
                if kind == "pickle" else "")
        raise CheckpointError(
            f"{path} is not an HDF5 file (it does not start with the HDF5 signature), so it "
            f"cannot be a Keras .h5 weights file.{hint} Download the file again or check "
            "that you passed the right one.")
    import h5py
    try:
        f = h5py.File(_common.readable(path), "r")
    except OSError as e:
        raise CheckpointError(
            f"{path} has an HDF5 signature but cannot be opened: {e}. The file is most "
            "likely truncated (an interrupted download/copy); download it again.") from e
    with f:
        return _load_from_h5(f, path, depth, container=None)


def _load_keras_archive(path: str, depth: Optional[int]):
    import h5py
    try:
        with zipfile.ZipFile(_common.readable(path)) as z:
            names = z.namelist()
            if "model.weights.h5" not in names:
                raise CheckpointError(
                    f"{path} is a zip archive without model.weights.h5 (entries: {names[:5]}); "
                    "it is not a Keras .keras file. A PyTorch .pth/.pt? use --format=torchvision.")
            data = z.read("model.weights.h5")
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: damaged zip archive ({e}); download it again.") from e
    try:
        f = h5py.File(io.BytesIO(data), "r")
    except OSError as e:
        raise CheckpointError(f"{path}: model.weights.h5 inside the archive is damaged: {e}") from e
    with f:
        return _load_from_h5(f, path, depth, container="keras3_archive")


def _load_from_h5(f, path: str, depth: Optional[int], container: Optional[str]):
    attrs_root = f
    if "model_weights" in f:
        h5_layout, root = "model.save", f["model_weights"]
        attrs_root = root
    elif "layers" in f or "vars" in f or "_layer_checkpoint_dependencies" in f:
        h5_layout, root = "keras3_weights", f
    elif "layer_names" in f.attrs or "layer_names0" in f.attrs or len(f.keys()):
        h5_layout, root = "save_weights", f
    else:
        raise CheckpointError(f"{path}: the HDF5 file is empty (no groups); not a Keras file.")

    found: Dict[Key, np.ndarray] = {}
    where: Dict[Key, str] = {}
    ignored: List[str] = []
    try:
        if h5_layout == "keras3_weights":
            _collect_keras3(root, path, found, where, ignored)
        else:
            _collect_legacy(root, path, found, where, ignored)
    except OSError as e:  # data blocks past a truncation point, damaged chunks
        raise CheckpointError(
            f"{path}: reading the weights failed ({e}); the file is truncated or damaged. "
            "Download it again.") from e

    v2 = sorted({n for n in ignored if "preact" in n or n == "post_bn"})
    if v2:
        raise CheckpointError(
            f"{path} holds a ResNetV2 (pre-activation) model (layers such as {v2[:2]}), which "
            "is a different architecture; use a ResNet50 (v1) file such as "
            "resnet50_weights_tf_dim_ordering_tf_kernels.h5.")
    layers = sorted({k[1] for k in found})
    if not layers:
        raise CheckpointError(
            f"{path}: no Keras ResNet layers (conv1_conv, conv2_block1_1_conv, ..., "
            f"predictions) found in this {h5_layout} file; groups seen: "
            f"{sorted(set(ignored))[:10]}.")

    depth, width, num_classes = _common.resolve_architecture(found, depth, path,
                                                             "layer 'conv1_conv'")

    variables = _common.assemble(
        found, layout="keras_v1", depth=depth, width=width, num_classes=num_classes,
        path=path, describe=lambda k: where.get(k),
        hint=("Is it a Keras keras.applications ResNet (v1)? Check the depth and that the "
              "file is complete."))
    keras_version = _attr(attrs_root, "keras_version") or _attr(f, "keras_version")
    info = dict(format="keras_h5", h5_layout=container or h5_layout, layout="keras_v1",
                depth=depth, width=width, num_classes=num_classes,
                has_head=num_classes is not None, num_layers=len(layers),
                ignored=sorted(set(ignored)), keras_version=keras_version,
                backend=_attr(attrs_root, "backend"), path=path)
    return variables, info


def _attr(group, name) -> Optional[str]:
    v = group.attrs.get(name)
    if v is None:
        return None
    return v.decode("utf8") if isinstance(v, bytes) else str(v)


def _put(found, where, key, value, src, path):
    if key in found:
        raise CheckpointError(
            f"{path}: layer '{key[1]}' {key[2]} appears twice ({where[key]} and {src}); the "
            "file holds more than one ResNet. Extract the one you want with Keras first.")
    found[key] = np.asarray(value)
    where[key] = src


def _collect_legacy(root, path, found, where, ignored):
    """Walks every dataset; the deepest ResNet-named group on its path is its layer."""
    import h5py

    def visit(name, obj):
        if not isinstance(obj, h5py.Dataset):
            return
        parts = name.split("/")
        layer = None
        for p in reversed(parts[:-1]):
            layer = canonical_layer(p)
            if layer:
                break
        if layer is None:
            ignored.append(parts[0])
            return
        role = _role(layer, parts[-1])
        if role is None:
            raise CheckpointError(
                f"{path}: layer '{layer}' has a weight '{parts[-1]}' (at {root.name}/{name}) "
                "that is not a kernel/bias/gamma/beta/moving_mean/moving_variance.")
        _put(found, where, (role[0], layer, role[1]), obj[()], f"{root.name}/{name}".lstrip("/"), path)

    root.visititems(visit)


def _collect_keras3(root, path, found, where, ignored):
    """Keras 3 ``.weights.h5``: ``.../<auto>/vars/<i>``; the layer name is an attribute."""
    import h5py

    groups = []
    root.visititems(lambda n, o: groups.append((n, o))
                    if isinstance(o, h5py.Group) and n.split("/")[-1] == "vars" else None)
    unnamed = []
    for name, g in groups:
        if not len(g):
            continue
        parent = name.split("/")[-2] if "/" in name else ""
        label = _attr(g, "name")
        layer = canonical_layer(label) if label else canonical_layer(parent)
        if layer is None and not label and re.sub(r"_\d+$", "", parent) in _AUTO_CLASS:
            unnamed.append((parent, name, g))
            continue
        if layer is None:
            ignored.append(label or parent)
            continue
        _read_vars(layer, name, g, found, where, path)
    if unnamed:
        for layer, name, g in _match_by_order(unnamed, path):
            _read_vars(layer, name, g, found, where, path)


def _read_vars(layer, name, g, found, where, path):
    roles = _VARS_ORDER[_layer_kind(layer)]
    keys = sorted(g.keys(), key=lambda k: int(k) if k.isdigit() else 10 ** 6)
    if len(keys) > len(roles):
        raise CheckpointError(
            f"{path}: layer '{layer}' ({name}) has {len(keys)} variables, expected at most "
            f"{len(roles)} ({', '.join(r[1] for r in roles)}).")
    for k, role in zip(keys, roles):
        _put(found, where, (role[0], layer, role[1]), g[k][()], f"{name}/{k}", path)


def _match_by_order(unnamed, path):
    """Old Keras 3 files without ``name`` attributes: auto names follow layer order."""
    by_class: Dict[str, list] = {}
    for parent, name, g in unnamed:
        m = re.match(r"^(.*?)(?:_(\d+))?$", parent)
        by_class.setdefault(_AUTO_CLASS[m[1]], []).append((int(m[2] or 0), name, g))
    n_conv = len(by_class.get("conv", []))
    for depth, (kind, _) in sorted(resnet.DEPTHS.items()):
        order = _common.layer_order(depth)
        convs = [l for l in order if l.endswith("_conv")]
        if kind == "bottleneck" and len(convs) == n_conv:
            break
    else:
        raise CheckpointError(
            f"{path}: Keras 3 weights file without layer names and {n_conv} conv layers, which "
            "matches no ResNet depth (50: 53, 101: 104, 152: 155). Re-save it with a recent "
            "Keras (model.save_weights) or as a legacy .h5 (model.save('x.h5')).")
    bns = [l for l in order if l.endswith("_bn")]
    targets = {"conv": convs, "bn": bns, "dense": ["predictions"]}
    out = []
    for cls, items in by_class.items():
        items.sort(key=lambda t: t[0])
        if len(items) > len(targets[cls]):
            raise CheckpointError(
                f"{path}: {len(items)} unnamed {cls} layers, but a ResNet{depth} has "
                f"{len(targets[cls])}; cannot map them by order.")
        for (_, name, g), layer in zip(items, targets[cls]):
            out.append((layer, name, g))
    return out
