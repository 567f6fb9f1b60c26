"""torchvision ResNet state dicts (``.pth``/``.pt``) -> Flax variables.

The Flax model with ``layout='torchvision_v15'`` reproduces torchvision's ResNet
(stride on the 3x3, no conv bias, BN eps 1e-5, symmetric padding) and uses the Keras
layer names, so conversion is a key map plus layout transposes:

==============================  =====================================  ==================
torchvision key                 Flax layer / leaf                      transform
==============================  =====================================  ==================
conv1.weight                    conv1_conv/kernel                      OIHW -> HWIO
bn1.{weight,bias}               conv1_bn/{scale,bias}
bn1.{running_mean,running_var}  batch_stats conv1_bn/{mean,var}
layerS.B.convK / bnK            conv{S+1}_block{B+1}_K_conv / _K_bn
layerS.B.downsample.0 / .1      conv{S+1}_block{B+1}_0_conv / _0_bn
fc.{weight,bias}                predictions/{kernel,bias}              weight transposed
==============================  =====================================  ==================

``num_batches_tracked`` is dropped (Flax BatchNorm uses a fixed momentum).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from medtransfer_jax import paths
from medtransfer_jax.weights import _common
from medtransfer_jax.weights.checkpoint import CheckpointError

_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_KEY_RE = re.compile(
    r"^(?:(?P<stem>conv1|bn1)|layer(?P<stage>[1-4])\.(?P<block>\d+)\."
    r"(?:(?P<kind>conv|bn)(?P<k>[1-3])|downsample\.(?P<ds>[01]))|(?P<fc>fc))"
    r"\.(?P<leaf>weight|bias|running_mean|running_var|num_batches_tracked)$")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "_orig_mod.", "model.")
Key = Tuple[str, str, str]


def torch_key_to_flax(key: str) -> Optional[Key]:
    """'layer2.0.downsample.1.running_var' -> ('batch_stats', 'conv3_block1_0_bn', 'var').

    Returns None for keys that are not part of a torchvision ResNet, and for
    ``num_batches_tracked``.
    """
    m = _KEY_RE.match(key)
    if not m or m["leaf"] == "num_batches_tracked":
        return None
    leaf = m["leaf"]
    if m["fc"]:
        if leaf not in ("weight", "bias"):
            return None
        return ("params", "predictions", "kernel" if leaf == "weight" else "bias")
    if m["stem"]:
        layer, is_conv = ("conv1_conv", True) if m["stem"] == "conv1" else ("conv1_bn", False)
    else:
        prefix = f"conv{int(m['stage']) + 1}_block{int(m['block']) + 1}"
        if m["ds"] is not None:
            is_conv = m["ds"] == "0"
            part = 0
        else:
            is_conv = m["kind"] == "conv"
            part = int(m["k"])
        layer = f"{prefix}_{part}_{'conv' if is_conv else 'bn'}"
    if is_conv:
        return ("params", layer, "kernel" if leaf == "weight" else leaf)
    if leaf not in _BN_LEAVES:
        return None
    collection, name = _BN_LEAVES[leaf]
    return (collection, layer, name)


def flax_to_torch_key(key: Key) -> str:
    """Inverse of :func:`torch_key_to_flax` (for messages)."""
    collection, layer, leaf = key
    if layer == "predictions":
        return "fc." + ("weight" if leaf == "kernel" else "bias")
    if layer.startswith("conv1_"):
        module = "conv1" if layer == "conv1_conv" else "bn1"
    else:
        m = re.match(r"^conv(\d)_block(\d+)_(\d)_(conv|bn)$", layer)
        stage, block, part, kind = int(m[1]) - 1, int(m[2]) - 1, m[3], m[4]
        module = (f"layer{stage}.{block}." + (f"downsample.{0 if kind == 'conv' else 1}"
                                              if part == "0" else f"{kind}{part}"))
    inverse = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}
    return f"{module}.{inverse[leaf]}"


def _to_numpy(value) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float32).cpu().numpy()
    return np.asarray(value)


def read_state_dict(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """torch.load (CPU, weights_only) and unwrap ``state_dict``/``model``/``module.``.

    Returns (state_dict, info with ``wrapper`` and ``prefix`` removed).
    """
    path = _common.check_input_file(path, "PyTorch state-dict (.pth/.pt)")
    kind = _common.sniff(path)
    if kind == "hdf5":
        raise CheckpointError(f"{path} is an HDF5 file, not a PyTorch state dict: use "
                              "--format=keras_h5 for Keras .h5 files.")
    import torch

    try:
        obj = torch.load(_common.readable(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours some messages
        msg = text.splitlines()[0].rstrip(". ") if text else type(e).__name__
        if kind not in ("zip", "pickle"):
            with paths.open(path, "rb") as f:
                head = f.read(16)
            raise CheckpointError(
                f"{path} is not a PyTorch file (torch.save writes a zip archive; this file "
                f"starts with {head!r}). Download it again or check the path.") from e
        if "Weights only load failed" in text:
            raise CheckpointError(
                f"{path} holds more than tensors (probably a pickled nn.Module), which is not "
                "loaded for safety. Re-save it with torch.save(model.state_dict(), path). "
                f"torch said: {msg}") from e
        raise CheckpointError(
            f"{path}: torch.load failed; the file is truncated or damaged (interrupted "
            f"download?): {type(e).__name__}: {msg}. Download it again.") from e

    wrapper = None
    for _ in range(3):  # e.g. {'model': {'state_dict': ...}}
        if isinstance(obj, Mapping):
            inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None and not any(torch_key_to_flax(str(k)) for k in obj):
                wrapper = inner if wrapper is None else f"{wrapper}/{inner}"
                obj = obj[inner]
                continue
        break
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of parameter "
            "names to tensors). Save one with torch.save(model.state_dict(), path).")
    state = {str(k): v for k, v in obj.items()}
    prefix = ""
    changed = True
    while changed and state:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in state):
                state = {k[len(p):]: v for k, v in state.items()}
                prefix += p
                changed = True
    return state, dict(wrapper=wrapper, prefix=prefix or None)


def load_torchvision(path: str, depth: Optional[int] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Reads a torchvision ResNet state dict into Flax variables.

    Args:
      path: ``.pth``/``.pt`` written by ``torch.save(model.state_dict())``, optionally
        wrapped (``{'state_dict': ...}``, ``{'model': ...}``) and/or with a
        ``module.`` (DataParallel) prefix.
      depth: 18/34/50/101/152, or ``None`` to infer it from the keys.

    Returns:
      (variables, info) for ``ResNet(layout='torchvision_v15')``: conv kernels HWIO
      (kh, kw, in, out), head kernel (C, num_classes). ``info`` has ``format, layout,
      depth, width, num_classes, has_head, num_layers, ignored, wrapper, prefix, path``.

    Raises:
      CheckpointError naming the file, the key/layer and both shapes.
    """
    state, unwrap = read_state_dict(path)
    path = paths.to_str(paths.workdir(path))
    found: Dict[Key, np.ndarray] = {}
    source: Dict[Key, str] = {}
    ignored = []
    for k, v in state.items():
        key = torch_key_to_flax(k)
        if key is None:
            if not k.endswith("num_batches_tracked"):
                ignored.append(k)
            continue
        a = _to_numpy(v)
        if key[2] == "kernel" and key[1] == "predictions":
            if a.ndim != 2:
                raise CheckpointError(f"{path}: key '{k}' should be a 2-D (out, in) matrix, "
                                      f"got shape {a.shape}.")
            a = a.T
        elif key[2] == "kernel":
            if a.ndim != 4:
                raise CheckpointError(f"{path}: key '{k}' should be a 4-D OIHW conv weight, "
                                      f"got shape {a.shape}.")
            a = a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        found[key] = a
        source[key] = k

    if not found:
        raise CheckpointError(
            f"{path}: no torchvision ResNet keys (conv1.weight, bn1.*, layer1.0.conv1.weight, "
            f"..., fc.weight) found; first keys: {list(state)[:6]}. Is it a torchvision "
            "ResNet state dict?")
    depth, width, num_classes = _common.resolve_architecture(found, depth, path,
                                                             "key 'conv1.weight'")

    def describe(key: Key) -> str:
        if key in source:
            return f"key '{source[key]}'"
        return f"expected key '{flax_to_torch_key(key)}'"

    def file_shape(key: Key, shape):  # Flax shape -> torch layout, so messages show OIHW
        if key[2] == "kernel" and len(shape) == 4:
            return (shape[3], shape[2], shape[0], shape[1])
        if key[2] == "kernel" and len(shape) == 2:
            return (shape[1], shape[0])
        return shape

    variables = _common.assemble(
        found, layout="torchvision_v15", depth=depth, width=width,
        num_classes=num_classes, path=path, describe=describe, shape_for_message=file_shape,
        hint="Is it a torchvision ResNet (not ResNeXt/Wide-ResNet) state dict?")
    info = dict(format="torchvision", layout="torchvision_v15", depth=depth, width=width,
                num_classes=num_classes, has_head=num_classes is not None,
                num_layers=len({k[1] for k in found}), ignored=sorted(ignored), path=path,
                **unwrap)
    return variables, info
