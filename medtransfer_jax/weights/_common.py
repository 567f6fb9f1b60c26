"""Shared checks for the converters: expected shapes, depth inference, clear errors.

Both converters produce a flat map ``{(collection, layer, leaf): array}`` in the
Flax model's naming; :func:`assemble` checks it against the shapes the Flax ResNet
expects (computed with ``jax.eval_shape``, no compute) and turns it into variables.
Every problem is reported with the file, the layer, and both shapes, so a user can
tell "wrong file" from "wrong model settings" without reading the code.
"""
from __future__ import annotations

import functools
import io
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from medtransfer_jax import paths
from medtransfer_jax.models import resnet
from medtransfer_jax.weights.checkpoint import CheckpointError

Key = Tuple[str, str, str]  # (collection, layer, leaf), e.g. ('params', 'conv1_bn', 'scale')

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@functools.lru_cache(maxsize=32)
def expected_shapes(layout: str, depth: int, width: int,
                    num_classes: Optional[int]) -> Dict[Key, Tuple[int, ...]]:
    """Shapes of every leaf of ``ResNet(depth, layout, num_classes, width)``'s variables."""
    import jax
    import jax.numpy as jnp

    model = resnet.ResNet(depth=depth, layout=layout, num_classes=num_classes or None,
                          width=width)
    tree = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0),
        jnp.zeros((1, 32, 32, 3), jnp.float32))
    out = {}
    for collection in ("params", "batch_stats"):
        for layer, leaves in tree.get(collection, {}).items():
            for leaf, v in leaves.items():
                out[(collection, layer, leaf)] = tuple(v.shape)
    return out


def layer_order(depth: int) -> Tuple[str, ...]:
    """Layers with weights in Keras' topological order (as ``model.layers`` lists them).

    Used to sort messages and to map unnamed Keras 3 variables by order.
    """
    kind, blocks = resnet.DEPTHS[depth]
    names = ["conv1_conv", "conv1_bn"]
    for s, n in enumerate(blocks):
        for b in range(n):
            if kind == "bottleneck":  # Keras' topological order: shortcut after the 3x3
                parts = (1, 2, 0, 3) if b == 0 else (1, 2, 3)
            else:
                parts = (1, 2, 0) if (b == 0 and s > 0) else (1, 2)
            for p in parts:
                names += [f"conv{s + 2}_block{b + 1}_{p}_conv", f"conv{s + 2}_block{b + 1}_{p}_bn"]
    return tuple(names + ["predictions"])


def infer_depth(kind: str, blocks: Sequence[int]) -> Tuple[int, bool]:
    """Maps (block kind, blocks per stage) to a depth.

    Returns (depth, exact): exact is False when no depth matches and the closest one
    of the same kind was chosen (then the missing layers are reported by name).
    """
    blocks = tuple(blocks)
    candidates = [(d, b) for d, (k, b) in resnet.DEPTHS.items() if k == kind]
    for d, b in candidates:
        if b == blocks:
            return d, True
    # Closest: fewest blocks to add/remove; ties -> the smaller model.
    d, _ = min(candidates, key=lambda db: (sum(abs(x - y) for x, y in zip(db[1], blocks)), db[0]))
    return d, False


def resolve_architecture(found: Mapping[Key, np.ndarray], depth: Optional[int], path: str,
                         stem_name: str) -> Tuple[int, int, Optional[int]]:
    """(depth, width, num_classes) of the Keras-named layers in ``found``.

    The depth is inferred from the block counts per stage (or checked against the
    requested ``depth``), the width from the stem conv, the classes from the head if any.
    ``stem_name`` is the stem's name in the source file, for the error message.
    """
    layers = {k[1] for k in found}
    kind = "bottleneck" if any(l.endswith(("_3_conv", "_3_bn")) for l in layers) else "basic"
    blocks = [0, 0, 0, 0]
    for l in layers:
        m = re.match(r"^conv([2-5])_block(\d+)_", l)
        if m:
            blocks[int(m[1]) - 2] = max(blocks[int(m[1]) - 2], int(m[2]))
    inferred, exact = infer_depth(kind, blocks)
    if depth is None:
        depth = inferred
    elif depth not in resnet.DEPTHS:
        raise CheckpointError(f"depth={depth} is not supported; choose one of "
                              f"{sorted(resnet.DEPTHS)}.")
    elif exact and depth != inferred:
        raise CheckpointError(
            f"{path} holds a ResNet{inferred} ({kind} blocks, {tuple(blocks)} per stage), but "
            f"depth {depth} was requested. Pass --depth={inferred} or leave it out to infer it.")
    stem = ("params", "conv1_conv", "kernel")
    if stem not in found:
        raise CheckpointError(f"{path}: {stem_name} (the stem conv) is missing, so the model "
                              "width cannot be determined; the file is incomplete.")
    width = int(np.shape(found[stem])[-1])
    head = ("params", "predictions", "kernel")
    num_classes = int(np.shape(found[head])[-1]) if head in found else None
    return depth, width, num_classes


def assemble(found: Mapping[Key, np.ndarray], *, layout: str, depth: int, width: int,
             num_classes: Optional[int], path: str,
             describe: Callable[[Key], str],
             shape_for_message: Callable[[Key, Tuple[int, ...]], Tuple[int, ...]] = None,
             hint: str = "") -> Dict[str, Any]:
    """Checks ``found`` against the Flax model's expected shapes; returns variables.

    Args:
      found: ``{(collection, layer, leaf): array}`` already in Flax layout (HWIO).
      describe: how to name a key in the source file (e.g. the h5 dataset path or
        the torch state-dict key), used in messages; may return None for keys that
        are not in the file.
      shape_for_message: converts a Flax-layout shape into the source file's layout
        for messages (e.g. HWIO -> OIHW for torch); applied to both shapes so they
        compare.

    Returns:
      ``{'params': {layer: {leaf: float32 array}}, 'batch_stats': {...}}``.

    Raises:
      CheckpointError listing missing layers, unexpected entries and shape
      mismatches (layer, file shape, expected shape).
    """
    expected = expected_shapes(layout, depth, width, num_classes)
    to_file = shape_for_message or (lambda key, shape: shape)
    order = {name: i for i, name in enumerate(layer_order(depth))}
    sort = lambda key: (order.get(key[1], 10 ** 6), key)  # noqa: E731

    missing = sorted((k for k in expected if k not in found), key=sort)
    unexpected = sorted((k for k in found if k not in expected), key=sort)
    bad_shape = sorted((k for k in expected if k in found
                        and tuple(np.shape(found[k])) != expected[k]), key=sort)
    model_name = f"ResNet{depth} ({layout}, width {width}, " + (
        f"{num_classes}-class head)" if num_classes else "no head)")
    problems = []
    if missing:
        layers = list(dict.fromkeys(k[1] for k in missing))
        def what(l):
            keys = [k for k in missing if k[1] == l]
            src = describe(keys[0])
            return f"'{l}' (no {', '.join(k[2] for k in keys)}" + (f"; {src})" if src else ")")
        problems.append(
            f"{len(layers)} layer(s) missing or incomplete: " + ", ".join(
                what(l) for l in layers[:8]) + (" ..." if len(layers) > 8 else ""))
    if bad_shape:
        problems.append("shape mismatch: " + "; ".join(
            f"layer '{k[1]}' {k[2]} ({describe(k)}) has shape "
            f"{to_file(k, tuple(int(d) for d in np.shape(found[k])))} in the file but {model_name} "
            f"expects {to_file(k, expected[k])}" for k in bad_shape[:6])
            + (" ..." if len(bad_shape) > 6 else ""))
    if unexpected:
        problems.append("unexpected entries with no place in the model: " + ", ".join(
            f"'{k[1]}/{k[2]}' ({describe(k)})" for k in unexpected[:8])
            + (" ..." if len(unexpected) > 8 else ""))
    if problems:
        raise CheckpointError(
            f"{path}: cannot convert to {model_name}: " + " | ".join(problems) +
            (f". {hint}" if hint else "."))

    variables: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {}
    for (collection, layer, leaf), value in found.items():
        variables.setdefault(collection, {}).setdefault(layer, {})[leaf] = np.asarray(
            value, np.float32)
    return variables


def sniff(path: str) -> str:
    """Guesses a file's kind from its first bytes: hdf5, zip, pickle, empty or unknown."""
    with paths.open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "empty"
    if head == HDF5_SIGNATURE:
        return "hdf5"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def check_input_file(path: str, what: str) -> str:
    """Returns the path to show and open (absolute if local, a ``gs://`` URL kept as
    given), or raises a CheckpointError that says what is wrong."""
    if not path:
        raise CheckpointError(f"No {what} file given.")
    if not paths.exists(path):
        raise CheckpointError(f"{path}: no such file (expected a {what} file).")
    if paths.isdir(path):
        raise CheckpointError(f"{path} is a directory; expected a {what} file.")
    if paths.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); the download probably failed.")
    return paths.to_str(paths.workdir(path))


def readable(path: str):
    """What h5py / zipfile / torch.load should open: the local path itself, or the
    whole remote object in memory (source checkpoints are ~100 MB; HDF5 over a
    network file object would make thousands of small ranged reads)."""
    if paths.is_remote(path):
        return io.BytesIO(paths.read_bytes(path))
    return path


def parameter_count(variables: Mapping[str, Any], collection: str = "params") -> int:
    return int(sum(np.size(v) for leaves in variables.get(collection, {}).values()
                   for v in leaves.values()))
