"""Flags and dispatch for `python -m medtransfer_jax.bench`."""
from __future__ import annotations

import contextlib
import sys
from typing import List

from absl import flags

from medtransfer_jax import cli
from medtransfer_jax.bench import common
from medtransfer_jax.errors import UserError

WHATS = ("train", "pipeline", "similarity", "network", "scaling", "device_input", "grid",
         "network_scale", "step_profile", "decode", "filters")

_DEPTH = flags.DEFINE_integer("depth", 50, "ResNet depth for train/network benchmarks.")
_IMAGE_SIZES = flags.DEFINE_list("image_sizes", ["224"], "Image sizes (px).")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["16"], "Global batch sizes.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32"], "Compute dtypes: float32, bfloat16.")
_DEVICE_COUNTS = flags.DEFINE_list("device_counts", ["all"],
                                   "Mesh sizes to try ('all' = every visible device).")
_COMPARE_TORCH = flags.DEFINE_bool("compare_torch", True,
                                   "Time torchvision's train step in the same run.")
_COMPARE_NUMPY = flags.DEFINE_bool(
    "compare_numpy", True, "similarity: time the NumPy float64 reference too (--nocompare_numpy "
    "times the device routes alone, e.g. --routes=qr,covariance at GPU sizes, where the "
    "NumPy side takes seconds per call).")
_ITERS = flags.DEFINE_integer("iters", 3, "Timed calls per window.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed windows (median is reported).")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts (pipeline); "
                             "0 = in the main process.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 256, "pipeline: images written and timed "
                                   "per row (whole batches of 32, after 2 warm-up batches).")
_FORMAT = flags.DEFINE_enum("format", "jpeg", ["jpeg", "png"],
                            "Image file format (pipeline, decode).")
_SOURCE_SIZE = flags.DEFINE_integer("source_size", 1024, "decode: side of the image files "
                                    "written (px; chest X-ray JPEGs are ~1,000-2,000).")
_NEURONS = flags.DEFINE_list("neurons", ["512", "1024", "2048"], "Neurons per side (similarity).")
_DATAPOINTS = flags.DEFINE_list("datapoints", ["10000", "50000"], "Datapoints (similarity).")
_METHODS = flags.DEFINE_list("methods", ["mean_cca", "svcca", "pwcca", "linear_cka"],
                             "Similarity methods to time; 'streaming:mean_cca' etc. times the "
                             "covariance-accumulator route of analysis/streaming.py.")
_ROUTES = flags.DEFINE_list("routes", ["auto"], "Similarity routes to time: auto, qr, "
                           "covariance (analysis/similarity.py resolve_route).")
_SVD_ALGORITHMS = flags.DEFINE_list(
    "svd_algorithms", ["default"], "similarity: SVD algorithms of the QR route to time "
    "(default, jacobi; jacobi is cuSOLVER's gesvdj, GPU only); each row after "
    "'default' reports its distance to default's value (diff_vs_default).")
_TRACE_DIR = flags.DEFINE_string(
    "trace_dir", None, "step_profile / --profile_ops: keep the jax.profiler trace here "
    "(TensorBoard / Perfetto); default: a temporary folder, deleted.")
_PROFILE_OPS = flags.DEFINE_bool(
    "profile_ops", False, "Any benchmark: trace it with jax.profiler and print a second "
    "table of its device time by op category and its costliest ops (whole benchmark, "
    "compilation included in the wall time).")
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
_SCALE = flags.DEFINE_float("scale", 1.0, "grid: fraction of each target's images, in (0, 1] "
                            "(CPU runs).")
_MAX_IMAGE_SIZE = flags.DEFINE_integer("max_image_size", 4096, "grid: cap on image sizes.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 4096, "grid: cap on batch sizes.")
_TIME_BUDGET = flags.DEFINE_float("time_budget_s", None, "grid: seconds to spend; targets run "
                                  "largest first, the ones that would not fit are projected "
                                  "from the measured ones (marked in the table).")
_CACHE = flags.DEFINE_enum("cache", "device", ["none", "host", "device"], "grid: data.cache.")
_RUNS_AT_ONCE = flags.DEFINE_integer("runs_at_once", 1, "grid: also time K train subprocesses "
                                     "of each target at once on the shared accelerator, as "
                                     "`study --mode=subprocess --parallel=K` runs them.")
_MODELS = flags.DEFINE_integer("models", 4, "filters: weights dirs the study basis is "
                               "fitted over (the first two are the timed pair).")
_CONFIGS_DIR = flags.DEFINE_string("configs_dir", None, "grid: the repo's configs/ folder "
                                   "(default ./configs or the source checkout's).")


#: Flags a benchmark reads one value of: more than one given is refused, not silently cut
#: (left out, the first value of the flag's default list is used).
_SINGLE = {"network": ("image_sizes",), "grid": ("dtypes",),
           "network_scale": ("neurons", "datapoints", "image_sizes", "batch_sizes"),
           "step_profile": ("image_sizes", "batch_sizes", "dtypes")}
#: Size flags a benchmark does not read (its sizes are its own): given, they are refused.
_NOT_READ = {"scaling": ("image_sizes", "batch_sizes", "neurons", "datapoints", "dtypes"),
             "filters": ("image_sizes", "batch_sizes", "neurons", "datapoints", "dtypes")}


def _ints(values, flag: str, minimum: int = 1) -> List[int]:
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise UserError(f"--{flag}={','.join(values)}: expected comma-separated integers") from None
    for v in out:
        if v < minimum:
            must = "a positive number" if minimum == 1 else f">= {minimum}"
            raise UserError(f"--{flag}={','.join(values)}: every value must be {must}")
    return out


def _validate(what: str) -> None:
    """Flags checked before any benchmark builds a model or compiles anything."""
    for flag in ("image_sizes", "batch_sizes", "neurons", "datapoints"):
        _ints(flags.FLAGS[flag].value, flag)
    _ints(_WORKERS.value, "workers", minimum=0)
    for flag in ("iters", "repeats", "num_images", "network_images", "width", "depth",
                 "map_images", "cache_examples", "max_image_size", "max_batch",
                 "runs_at_once", "source_size", "models"):
        cli.check_positive(flags.FLAGS[flag].value, f"--{flag}")
    if _TIME_BUDGET.value is not None:
        cli.check_positive(_TIME_BUDGET.value, "--time_budget_s")
    if not 0 < _SCALE.value <= 1:
        raise UserError(f"--scale={_SCALE.value}: must be in (0, 1] (the fraction of each "
                        "target's images)")
    for flag in _SINGLE.get(what, ()):  # not given: the first default, as documented
        if flags.FLAGS[flag].present and len(flags.FLAGS[flag].value) > 1:
            raise UserError(f"--{flag}={','.join(flags.FLAGS[flag].value)}: bench {what} "
                            "takes one value; run it once per value")
    for flag in _NOT_READ.get(what, ()):
        if flags.FLAGS[flag].present:
            raise UserError(f"--{flag}: bench {what} does not read it (--width and --depth "
                            "set its model); leave it out")
    counts = [c for c in _DEVICE_COUNTS.value if c != "all"]
    _ints(counts, "device_counts")
    _validate_tables(what)
    if what == "train":
        import jax  # noqa: E402 (only to count the devices)
        n_all = jax.device_count()
        for n in [n_all if c == "all" else int(c) for c in _DEVICE_COUNTS.value]:
            if n > n_all:
                raise UserError(f"--device_counts: {n} devices asked, {n_all} visible")
            for b in _ints(_BATCH_SIZES.value, "batch_sizes"):
                cli.check_divisible(b, n, "--batch_sizes")


def _validate_tables(what: str) -> None:
    """Names checked against the project's tables (imported only by the benchmarks that
    read them: they pull in JAX)."""
    if what in ("train", "device_input", "grid", "step_profile"):
        from medtransfer_jax.bench import train_throughput
        cli.check_choices(_DTYPES.value, train_throughput.DTYPES, "dtypes")
    if what == "similarity":
        from medtransfer_jax.analysis import similarity as kernels
        from medtransfer_jax.bench import similarity
        similarity.check_methods(_METHODS.value, flag="--methods")
        cli.check_choices(_ROUTES.value, kernels.ROUTES, "routes")
        for alg in _SVD_ALGORITHMS.value:  # unknown names, polar's reason, GPU-only ones
            try:
                kernels.check_svd_algorithm(alg)
            except ValueError as e:
                raise UserError(f"--svd_algorithms: {e}") from None
    if what == "network_scale":
        from medtransfer_jax.bench import network_scale, similarity
        similarity.check_methods(_METHODS.value, flag="--methods", streaming_ok=False)
        cli.check_choices(_PARTS.value, network_scale.PARTS, "parts")
    if what == "grid":
        from medtransfer_jax.bench import grid
        cli.check_choices(_TARGETS.value, grid.PAPER_TARGETS, "targets")


def _int_list(flag: str, minimum: int = 1) -> List[int]:
    return _ints(flags.FLAGS[flag].value, flag, minimum)


def _train():
    from medtransfer_jax.bench import train_throughput as tt
    counts = [None if c == "all" else int(c) for c in _DEVICE_COUNTS.value]
    rows = tt.run(depth=_DEPTH.value, image_sizes=_int_list("image_sizes"),
                  batch_sizes=_int_list("batch_sizes"), dtypes=_DTYPES.value,
                  device_counts=counts, compare_torch=_COMPARE_TORCH.value,
                  iters=_ITERS.value, repeats=_REPEATS.value, width=_WIDTH.value,
                  torch_compile=_TORCH_COMPILE.value)
    return ("ResNet train step throughput", rows, tt.COLUMNS,
            common.mfu_note(_DTYPES.value))


def _device_input():
    from medtransfer_jax.bench import device_input
    rows = []
    for size in _int_list("image_sizes"):
        for bs in _int_list("batch_sizes"):
            for dt in _DTYPES.value:
                rows += device_input.run(depth=_DEPTH.value, image_size=size, batch_size=bs,
                                         dtype=dt, num_examples=_CACHE_EXAMPLES.value,
                                         width=_WIDTH.value, iters=_ITERS.value,
                                         repeats=_REPEATS.value)
    return "Device-resident input vs in-memory batch", rows, device_input.COLUMNS, None


def _pipeline():
    from medtransfer_jax.bench import pipeline
    rows = pipeline.run(image_sizes=_int_list("image_sizes"),
                        worker_counts=_int_list("workers", minimum=0),
                        num_images=_NUM_IMAGES.value, fmt=_FORMAT.value)
    return "Input pipeline throughput", rows, None, None


def _similarity():
    from medtransfer_jax.bench import similarity
    rows = similarity.run(neurons=_int_list("neurons"), datapoints=_int_list("datapoints"),
                          methods=_METHODS.value, repeats=_REPEATS.value,
                          routes=_ROUTES.value, compare_numpy=_COMPARE_NUMPY.value,
                          svd_algorithms=_SVD_ALGORITHMS.value)
    return ("Similarity kernels vs the google/svcca NumPy float64 algorithm", rows,
            similarity.COLUMNS, None)


def _network():
    from medtransfer_jax.bench import similarity
    rows = similarity.run_network(num_images=_NUM_IMAGES_NETWORK.value,
                                  image_size=_int_list("image_sizes")[0],
                                  depth=_DEPTH.value, width=_WIDTH.value)
    return "Two-model stage-wise CCA, end to end", rows, None, None


def _grid():
    from medtransfer_jax.bench import grid
    if _RUNS_AT_ONCE.value > 1:  # before JAX starts the GPU backend
        grid.share_gpu_with_runs(_RUNS_AT_ONCE.value)
    cache = cli.enable_compile_cache()   # --xla_cache_dir= ('') keeps it off in the grid too
    rows = grid.run(targets=_TARGETS.value, protocol=_PROTOCOL.value, scale=_SCALE.value,
                    width=_WIDTH.value, depth=_DEPTH.value,
                    max_image_size=_MAX_IMAGE_SIZE.value, max_batch=_MAX_BATCH.value,
                    dtype=_DTYPES.value[0], cache=_CACHE.value,
                    cfg_dir=_CONFIGS_DIR.value, time_budget_s=_TIME_BUDGET.value,
                    runs_at_once=_RUNS_AT_ONCE.value, xla_cache_dir=cache)
    notes = (grid.mfu_note(_WIDTH.value, _DEPTH.value, _DTYPES.value[0]), grid.TIMING_NOTE,
             grid.AT_ONCE_NOTE if _RUNS_AT_ONCE.value > 1 else None)
    columns = grid.COLUMNS + (grid.AT_ONCE_COLUMNS if _RUNS_AT_ONCE.value > 1 else [])
    return (grid.title(_TARGETS.value), rows, columns, "\n".join(filter(None, notes)))


def _network_scale():
    from medtransfer_jax.bench import network_scale
    rows = network_scale.run(network_scale.Sizes(
        neurons=_int_list("neurons")[0], datapoints=_int_list("datapoints")[0],
        methods=_METHODS.value, depth=_DEPTH.value, width=_WIDTH.value,
        image_size=_int_list("image_sizes")[0], protocol_images=_NUM_IMAGES_NETWORK.value,
        map_images=_MAP_IMAGES.value, batch_size=_int_list("batch_sizes")[0],
        repeats=_REPEATS.value, parts=_PARTS.value))
    return "Similarity at network scale", rows, None, None


def _scaling():
    from medtransfer_jax.bench import scaling
    # ResNet18 unless --depth is given: the sweep's train cells should stay quick on a CPU.
    rows = scaling.run(width=_WIDTH.value,
                       depth=_DEPTH.value if flags.FLAGS["depth"].present else 18)
    return "Scaling", rows, None, None


def _step_profile():
    from medtransfer_jax.bench import step_profile
    rows = step_profile.run(depth=_DEPTH.value, image_size=_int_list("image_sizes")[0],
                            batch_size=_int_list("batch_sizes")[0], dtype=_DTYPES.value[0],
                            width=_WIDTH.value, steps=max(1, _ITERS.value),
                            trace_dir=_TRACE_DIR.value)
    return ("Where the train step's device time goes (jax.profiler trace, per step)", rows,
            step_profile.COLUMNS, "ms and calls per step; share_of_wall: of the step's wall "
            "time; idle: the device waiting (host dispatch, gaps between kernels)")


def _filters():
    from medtransfer_jax.bench import filters as filters_bench
    rows = filters_bench.run(models=_MODELS.value, depth=_DEPTH.value, width=_WIDTH.value,
                             repeats=_REPEATS.value)
    return (f"The filters stage per model: study basis vs pair analysis (ResNet{_DEPTH.value}, "
            f"width {_WIDTH.value})", rows, filters_bench.COLUMNS, filters_bench.NOTE)


def _decode():
    from medtransfer_jax.bench import decode
    rows = decode.run(num_images=_NUM_IMAGES.value, source_size=_SOURCE_SIZE.value,
                      image_sizes=_int_list("image_sizes"), fmt=_FORMAT.value,
                      repeats=_REPEATS.value)
    return ("A new process's data start: integrity check + decode, decode store off / empty "
            "/ filled", rows, decode.COLUMNS, decode.NOTE)


#: what -> a function that runs it: (title, rows, columns or None, footnote or None).
_RUNS = {"train": _train, "pipeline": _pipeline, "similarity": _similarity,
         "network": _network, "scaling": _scaling, "device_input": _device_input,
         "grid": _grid, "network_scale": _network_scale, "step_profile": _step_profile,
         "decode": _decode, "filters": _filters}
assert tuple(_RUNS) == WHATS


def main(argv):
    if len(argv) != 2 or argv[1] not in WHATS:
        raise UserError(f"usage: python -m medtransfer_jax.bench {{{','.join(WHATS)}}} "
                        f"[flags]; got {argv[1:]!r} (see --helpfull)")
    what = argv[1]
    _validate(what)
    cmd = "python -m medtransfer_jax.bench " + " ".join(sys.argv[1:])
    traced = contextlib.nullcontext()
    if _PROFILE_OPS.value:  # imported only then: it pulls in JAX and the model
        from medtransfer_jax.bench import step_profile
        traced = step_profile.traced_ops(_TRACE_DIR.value)
    with traced as prof:
        title, rows, columns, note = _RUNS[what]()
    common.print_report(title, rows, columns, cmd, notes=[note] if note else [])
    if not _PROFILE_OPS.value:
        return
    common.print_report(f"Device time by op category over the whole {what} benchmark",
                        step_profile.summarize(prof["events"], 1, prof["wall_s"]),
                        step_profile.COLUMNS, cmd, notes=[
                            "wall includes compilation and host work; idle = wall - busy"])
