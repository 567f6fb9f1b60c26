"""Similarity at network scale (issue #15.4): the numbers to put on record from one GPU.

Three parts, one table (``python -m medtransfer_jax.bench network_scale``):

1. **kernels**: every CCA-family method and linear CKA at ``neurons x datapoints``
   (default 2048 x 20k) on the device vs the google/svcca NumPy float64 algorithm on the
   host, same data, interleaved (bench/similarity.py); ``abs_diff`` is the agreement.
   Target on one H100: >= 50x.
2. **protocol**: the Revisiting paper's CCA (5 stage outputs, ~10k positions per layer,
   64 channels, 5 repeats) between two random ResNet50s at 224 px, end to end, cold
   (compiles included) and warm, split into forward passes and similarity
   (:func:`bench.similarity.run_network`). Target < 60 s.
3. **map**: a 17 x 17 block map (conv1_relu + 16 block outputs) of two ResNet50s on
   ``map_images`` images (default 10,000) in one streamed pass (analysis/layer_map.py),
   then the same map with bf16 forward passes: its time and the largest / mean change of
   every method's values is the measured effect of bf16 on CCA.

The GPU run (about 10 minutes on one H100; memory: two ResNet50 forward batches plus the
map statistics, < 10 GiB)::

    python -m medtransfer_jax.bench network_scale --neurons=2048 --datapoints=20000 \
        --network_images=1000 --map_images=10000 --batch_sizes=128

Every size is a flag, so the same code runs scaled down on a CPU (tests/test_bench_network_scale.py).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Sequence

import jax
import numpy as np

from medtransfer_jax.analysis import compare
from medtransfer_jax.analysis import layer_map
from medtransfer_jax.analysis import similarity as kernels_lib
from medtransfer_jax.bench import common, similarity
from medtransfer_jax.errors import UserError

#: The parts of the run, in the order they run by default.
PARTS = ("kernels", "protocol", "map")
COLUMNS = ["part", "what", "seconds", "speedup", "value", "abs_diff", "note"]


@dataclasses.dataclass
class Sizes:
    """Every size of the run; defaults are the GPU measurement of issue #15.4."""
    neurons: int = 2048
    datapoints: int = 20000
    methods: Sequence[str] = ("mean_cca", "svcca", "pwcca", "linear_cka")
    depth: int = 50
    width: int = 64
    image_size: int = 224
    protocol_images: int = 1000
    positions: int = 10000
    map_images: int = 10000
    map_methods: Sequence[str] = layer_map.DEFAULT_MAP_METHODS
    batch_size: int = 64
    repeats: int = 2
    bf16: bool = True
    parts: Sequence[str] = PARTS


def _row(part, what, seconds=float("nan"), **kw) -> Dict[str, Any]:
    row = dict(part=part, what=what, seconds=seconds, speedup="", value="", abs_diff="",
               note="")
    row.update(kw)
    common.progress_row(row, COLUMNS)
    return row


def kernels(s: Sizes) -> List[Dict[str, Any]]:
    """Part 1: device kernels vs the NumPy svcca algorithm at s.neurons x s.datapoints."""
    rows = []
    X, Y = similarity.make_data(s.datapoints, s.neurons)
    Xd, Yd = jax.device_put(X), jax.device_put(Y)
    for m in s.methods:
        t = similarity.time_pair(X, Y, Xd, Yd, m, "auto", repeats=s.repeats)
        route = kernels_lib.resolve_route("auto", m, s.datapoints, s.neurons, s.neurons)
        rows.append(_row("kernels", f"{m} {s.neurons}x{s.datapoints}", t["jax_s"],
                         speedup=t["numpy_s"] / t["jax_s"], value=t["value"],
                         abs_diff=abs(t["ref"] - t["value"]),
                         note=f"route {route}; NumPy {t['numpy_s']:.3g} s; "
                              f"compile {t['compile_s']:.3g} s"))
    return rows


def protocol(s: Sizes) -> List[Dict[str, Any]]:
    """Part 2: the paper's CCA protocol between two random ResNets, end to end."""
    proto = compare.PaperCCAProtocol(positions=s.positions, batch_size=s.batch_size)
    out = similarity.run_network(num_images=s.protocol_images, image_size=s.image_size,
                                 depth=s.depth, width=s.width, protocol=proto)
    return [_row("protocol", f"{r['what']} {r['layer']}", r["seconds"],
                 value=r["value"], note=r["note"]) for r in out]


def _map(a, b, images, s: Sizes, dtype: str):
    t0 = time.perf_counter()
    m = layer_map.layer_map(a, b, images, methods=s.map_methods, spatial="pool",
                            batch_size=s.batch_size, compute_dtype=dtype)
    return m, time.perf_counter() - t0


def _split_rows(m, total_s: float, dtype: str) -> List[Dict[str, Any]]:
    """Where a map's seconds went (LayerMap.timing): the first batch with its compilation,
    the other batches, the host's per-pair finish, and what is left (loading, planning)."""
    t = m.timing
    rest = t["stream"] - t["first_batch"]
    return [_row("map", f"  {dtype}: first batch (compile)", t["first_batch"]),
            _row("map", f"  {dtype}: the other batches", rest,
                 note="forward passes + statistics; statistics to the host"),
            _row("map", f"  {dtype}: per-pair finish on the host", t["finish"],
                 note="float64"),
            _row("map", f"  {dtype}: other", total_s - t["stream"] - t["finish"],
                 note="model loading, planning")]


def block_map(s: Sizes) -> List[Dict[str, Any]]:
    """Part 3: all-blocks x all-blocks map of two random ResNets, float32 then bf16."""
    a = similarity.random_model(s.depth, s.width, 0, image_size=s.image_size, name="random_a")
    b = similarity.random_model(s.depth, s.width, 1, image_size=s.image_size, name="random_b")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (s.map_images, s.image_size, s.image_size, 3), np.uint8)
    m32, t32 = _map(a, b, images, s, "float32")
    L = len(m32.layers_a)
    rows = [_row("map", f"{L}x{L} blocks, float32 forward", t32,
                 note=f"{s.map_images} images ({s.map_images / t32:.1f} img/s incl. compile); "
                      f"{m32.spatial}; channels/layer <= {max(m32.channels_a)}"),
            *_split_rows(m32, t32, "float32")]
    for meth, v in m32.values.items():
        rows.append(_row("map", f"{meth} mean over the map", value=float(v.mean()),
                         note=f"diagonal mean {float(np.diag(v).mean()):.4f}"))
    if s.bf16:
        m16, t16 = _map(a, b, images, s, "bfloat16")
        rows.append(_row("map", f"{L}x{L} blocks, bfloat16 forward", t16,
                         speedup=t32 / t16, note="statistics float32, finish float64"))
        rows.extend(_split_rows(m16, t16, "bfloat16"))
        for meth in m32.values:
            d = np.abs(m16.values[meth] - m32.values[meth])
            rows.append(_row("map", f"bf16 effect on {meth}", abs_diff=float(d.max()),
                             value=float(d.mean()),
                             note="value = mean |bf16 - f32|, abs_diff = max"))
    return rows


def run(s: Sizes = Sizes()) -> List[Dict[str, Any]]:
    """The parts named in ``s.parts``, in order; rows for :func:`common.print_report`."""
    bad = [p for p in s.parts if p not in PARTS]
    if bad:
        raise UserError(f"network_scale: unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    parts = dict(kernels=kernels, protocol=protocol, map=block_map)
    rows: List[Dict[str, Any]] = []
    for p in s.parts:
        rows += parts[p](s)
    return rows
