"""Flags and dispatch for `python -m medtransfer_jax.bench`."""
from __future__ import annotations

import sys
from typing import List

from absl import flags

from medtransfer_jax import cli
from medtransfer_jax.bench import common
from medtransfer_jax.errors import UserError

WHATS = ("train", "pipeline", "similarity", "network", "scaling", "device_input", "grid",
         "network_scale")

_DEPTH = flags.DEFINE_integer("depth", 50, "ResNet depth for train/network benchmarks.")
_IMAGE_SIZES = flags.DEFINE_list("image_sizes", ["224"], "Image sizes (px).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["16"], "Global batch sizes.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes: float32, bfloat16.")
_DEVICE_COUNTS = flags.DEFINE_list("device_counts", ["all"],
                                   "Mesh sizes to try ('all' = every visible device).")
_COMPARE_TORCH = flags.DEFINE_bool("compare_torch", True,
                                   "Time torchvision's train step in the same run.")
_ITERS = flags.DEFINE_integer("iters", 3, "Timed calls per window.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed windows (median is reported).")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts (pipeline).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 256, "Images per pipeline measurement.")
_FORMAT = flags.DEFINE_enum("format", "jpeg", ["jpeg", "png"], "Image file format (pipeline).")
_NEURONS = flags.DEFINE_list("neurons", ["512", "1024", "2048"], "Neurons per side (similarity).")
_DATAPOINTS = flags.DEFINE_list("datapoints", ["10000", "50000"], "Datapoints (similarity).")
_METHODS = flags.DEFINE_list("methods", ["mean_cca", "svcca", "pwcca", "linear_cka"],
                             "Similarity methods to time; 'streaming:mean_cca' etc. times the "
                             "covariance-accumulator route of analysis/streaming.py.")
_ROUTES = flags.DEFINE_list("routes", ["auto"], "Similarity routes to time: auto, qr, "
                           "covariance (analysis/similarity.py resolve_route).")
_NUM_IMAGES_NETWORK = flags.DEFINE_integer("network_images", 1000,
                                           "Images for the two-model comparison.")
_MAP_IMAGES = flags.DEFINE_integer("map_images", 10000,
                                   "network_scale: images of the all-blocks layer map.")
_PARTS = flags.DEFINE_list("parts", ["kernels", "protocol", "map"],
                           "network_scale: which parts to run.")
_WIDTH = flags.DEFINE_integer("width", 64, "ResNet stem width (64 = the real model).")
_CACHE_EXAMPLES = flags.DEFINE_integer("cache_examples", 512,
                                       "Images in the device-resident split (device_input).")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", False,
                                   "Also time the torchvision step under torch.compile (train).")
_TARGETS = flags.DEFINE_list("targets", ["chest", "breast", "thyroid", "mammograms", "knee",
                                         "isic", "pcam"], "Revisiting targets (grid).")
_PROTOCOL = flags.DEFINE_enum("protocol", "sep2023", ["sep2023", "feb2023"],
                              "Revisiting protocol of the grid.")
_SCALE = flags.DEFINE_float("scale", 1.0, "grid: fraction of each target's images (CPU runs).")
_MAX_IMAGE_SIZE = flags.DEFINE_integer("max_image_size", 4096, "grid: cap on image sizes.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 4096, "grid: cap on batch sizes.")
_TIME_BUDGET = flags.DEFINE_float("time_budget_s", None, "grid: seconds to spend; targets run "
                                  "largest first, the ones that would not fit are projected "
                                  "from the measured ones (marked in the table).")
_CACHE = flags.DEFINE_enum("cache", "device", ["none", "host", "device"], "grid: data.cache.")
_CONFIGS_DIR = flags.DEFINE_string("configs_dir", None, "grid: the repo's configs/ folder "
                                   "(default ./configs or the source checkout's).")


def _ints(values, flag: str = "") -> List[int]:
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise UserError(f"--{flag}={','.join(values)}: expected comma-separated integers") from None
    for v in out:
        cli.check_positive(v, f"--{flag}")
    return out


def _validate(what: str) -> None:
    """Flags checked before any benchmark imports JAX models or compiles anything."""
    for flag in ("image_sizes", "batch_sizes", "neurons", "datapoints"):
        _ints(flags.FLAGS[flag].value, flag)
    for flag in ("iters", "repeats", "num_images", "network_images", "width", "depth"):
        cli.check_positive(flags.FLAGS[flag].value, f"--{flag}")
    if _TIME_BUDGET.value is not None:
        cli.check_positive(_TIME_BUDGET.value, "--time_budget_s")
    counts = [c for c in _DEVICE_COUNTS.value if c != "all"]
    _ints(counts, "device_counts")
    if what == "train":
        import jax  # noqa: E402 (only to count the devices)
        n_all = jax.device_count()
        for n in [n_all if c == "all" else int(c) for c in _DEVICE_COUNTS.value]:
            if n > n_all:
                raise UserError(f"--device_counts: {n} devices asked, {n_all} visible")
            for b in _ints(_BATCH_SIZES.value, "batch_sizes"):
                cli.check_divisible(b, n, "--batch_sizes")


def main(argv):
    if len(argv) != 2 or argv[1] not in WHATS:
        raise UserError(f"usage: python -m medtransfer_jax.bench {{{','.join(WHATS)}}} "
                        f"[flags]; got {argv[1:]!r} (see --helpfull)")
    _validate(argv[1])
    what = argv[1]
    if what == "grid":
        cli.enable_compile_cache()
    cmd = "python -m medtransfer_jax.bench " + " ".join(sys.argv[1:])
    if what == "train":
        from medtransfer_jax.bench import train_throughput as tt
        counts = [None if c == "all" else int(c) for c in _DEVICE_COUNTS.value]
        rows = tt.run(depth=_DEPTH.value, image_sizes=_ints(_IMAGE_SIZES.value),
                      batch_sizes=_ints(_BATCH_SIZES.value), dtypes=_DTYPES.value,
                      device_counts=counts, compare_torch=_COMPARE_TORCH.value,
                      iters=_ITERS.value, repeats=_REPEATS.value, width=_WIDTH.value,
                      torch_compile=_TORCH_COMPILE.value)
        common.print_report("ResNet train step throughput", rows, tt.COLUMNS, cmd)
    elif what == "device_input":
        from medtransfer_jax.bench import device_input
        rows = []
        for bs in _ints(_BATCH_SIZES.value):
            for dt in _DTYPES.value:
                rows += device_input.run(depth=_DEPTH.value, image_size=_ints(
                    _IMAGE_SIZES.value)[0], batch_size=bs, dtype=dt,
                    num_examples=_CACHE_EXAMPLES.value, width=_WIDTH.value,
                    iters=_ITERS.value, repeats=_REPEATS.value)
        common.print_report("Device-resident input vs in-memory batch", rows,
                            device_input.COLUMNS, cmd)
    elif what == "pipeline":
        from medtransfer_jax.bench import pipeline
        rows = pipeline.run(image_size=_ints(_IMAGE_SIZES.value)[0],
                            worker_counts=_ints(_WORKERS.value), num_images=_NUM_IMAGES.value,
                            fmt=_FORMAT.value)
        common.print_report("Input pipeline throughput", rows, None, cmd)
    elif what == "similarity":
        from medtransfer_jax.bench import similarity
        rows = similarity.run(neurons=_ints(_NEURONS.value),
                              datapoints=_ints(_DATAPOINTS.value), methods=_METHODS.value,
                              repeats=_REPEATS.value, routes=_ROUTES.value)
        common.print_report("Similarity kernels vs the google/svcca NumPy float64 algorithm",
                            rows, None, cmd)
    elif what == "network":
        from medtransfer_jax.bench import similarity
        rows = similarity.run_network(num_images=_NUM_IMAGES_NETWORK.value,
                                      image_size=_ints(_IMAGE_SIZES.value)[0],
                                      depth=_DEPTH.value, width=_WIDTH.value)
        common.print_report("Two-model stage-wise CCA, end to end", rows, None, cmd)
    elif what == "grid":
        from medtransfer_jax.bench import grid
        rows = grid.run(targets=_TARGETS.value, protocol=_PROTOCOL.value, scale=_SCALE.value,
                        width=_WIDTH.value, depth=_DEPTH.value,
                        max_image_size=_MAX_IMAGE_SIZE.value, max_batch=_MAX_BATCH.value,
                        dtype=_DTYPES.value[0], cache=_CACHE.value,
                        cfg_dir=_CONFIGS_DIR.value, time_budget_s=_TIME_BUDGET.value)
        common.print_report("Revisiting grid: measured per target, projected to 175 runs",
                            rows, grid.COLUMNS, cmd)
    elif what == "network_scale":
        from medtransfer_jax.bench import network_scale
        rows = network_scale.run(network_scale.Sizes(
            neurons=_ints(_NEURONS.value)[0], datapoints=_ints(_DATAPOINTS.value)[0],
            methods=_METHODS.value, depth=_DEPTH.value, width=_WIDTH.value,
            image_size=_ints(_IMAGE_SIZES.value)[0], protocol_images=_NUM_IMAGES_NETWORK.value,
            map_images=_MAP_IMAGES.value, batch_size=_ints(_BATCH_SIZES.value)[0],
            repeats=_REPEATS.value, parts=_PARTS.value))
        common.print_report("Similarity at network scale", rows, None, cmd)
    elif what == "scaling":
        from medtransfer_jax.bench import scaling
        # ResNet18 unless --depth is given: the sweep's train cells should stay quick on a CPU.
        rows = scaling.run(width=_WIDTH.value,
                           depth=_DEPTH.value if flags.FLAGS["depth"].present else 18)
        common.print_report("Scaling", rows, None, cmd)
