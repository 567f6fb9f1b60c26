"""The Revisiting study grid, timed end to end per target and projected to 175 runs.

A study is not one run: it is 7 targets x {ImageNet, ImageNet-freeze, RadImageNet,
RadImageNet-freeze, random} x 5 folds of small datasets, where compilation, evaluation,
predictions and start-up can dominate. This benchmark runs each target's real protocol
file (``configs/revisiting/<target>.py``: its image size, batch size, epochs, reported
metric) on synthetic images with the target's real number of images and classes, through
the real training loop (``train_and_evaluate``: setup, train, per-epoch validation,
checkpoints, final predictions on val and test, exports), three times in one process:

* ``cold``: 1 epoch, first compile of the target's shapes;
* ``warm1``: 1 epoch again (compiled programs from the persistent cache);
* ``warm_more``: 1 + k epochs, k >= 1 chosen so that the k extra epochs train on at least
  ``MIN_EXTRA_IMAGES`` (x ``--scale``) images: a small target's epoch on a GPU is a
  fraction of a second, less than the run-to-run noise of the fixed cost.

So one epoch (train + its validation + checkpoint) costs the difference of the two runs'
training loops (their ``results.json`` timing: train + eval + checkpoint seconds) over
``k``: the setup, decode and final predictions of each run stay out of it, so their
run-to-run noise cannot swamp a tiny epoch. A run's fixed cost (setup, cache decode,
compile-cache reads, final predictions, export) is ``warm1 - epoch``, and the projected
run is ``fixed + epochs x epoch``. An epoch measured as <= 0 (noise larger than the extra
epochs) is reported as NaN, never as a tiny number. The freeze variants' head phase
(``train.head_phase``: a linear probe, the base frozen with BatchNorm in inference mode,
so no backward pass through it) is timed the same way: a linear-probe run of 1 epoch
after one that compiles its step, and one of 1 + k epochs give ``head_epoch_s``; a freeze
run is ``run_s + head epochs x head_epoch_s`` (a full epoch's cost if that timing fails).
Early stopping is off, as in the Sep-2023 protocol (patience = epochs).

With ``--runs_at_once=K`` (K > 1) each measured target is also run the way
``study --mode=subprocess --parallel=K`` runs it: K ``train`` subprocesses at once sharing
the accelerator (on a GPU the bench and each run preallocate 0.9 / (K + 1) of it,
:func:`share_gpu_with_runs`), once for 1 + k epochs and then once for 1 epoch. As above,
K epochs side by side cost the difference of the runs' mean training loops over k, and K
runs' fixed costs together the 1-epoch wall time less that (process start-up included);
one run's share of K at once is ``at_once_run_s`` and the target's 25 runs cost
``at_once_grid_s``. A run of a small target leaves a large GPU idle during its set-up,
evaluations and saves; the other runs fill it.

On a 2-core CPU the same command runs scaled down (``--scale``, ``--width``,
``--max_image_size``, ``--max_batch``); the GPU record script runs it at full size.

With a time budget (``--time_budget_s``, for a device lent by the minute) the targets run
largest first (images x pixels x epochs) and no target starts that would not finish in
the budget; each one left out is projected from the measured ones (their seconds per
image-pixel for an epoch, their mean fixed cost) in a row marked ``projected``, and the
TOTAL row says how many targets were measured.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import jax

from medtransfer_jax import compile_cache, configs
from medtransfer_jax.bench import common
from medtransfer_jax.configs import write_resolved
from medtransfer_jax.data import decode_memo
from medtransfer_jax.errors import UserError
from medtransfer_jax.training import loop, sweep

#: The Revisiting targets as the paper used them: (images, classes) (REFERENCE.md table).
PAPER_TARGETS: Dict[str, tuple] = {
    "chest": (5856, 2), "breast": (780, 2), "thyroid": (480, 2), "mammograms": (3568, 2),
    "knee": (5222, 3), "isic": (10015, 7), "pcam": (10000, 2)}
#: Training images the extra epochs of ``warm_more`` cover at least (at --scale=1).
MIN_EXTRA_IMAGES = 8192
#: Source variants per target and how many of them train a head phase first.
VARIANTS, FROZEN_VARIANTS, FOLDS = 5, 2, 5
#: GFLOP per image of the ResNet50 train step at 224 px as the train bench counts them
#: (train_throughput.model_flops, checked in tests/test_bench.py); scales with the pixel
#: count. Used for MFU at width 64 only.
TRAIN_GFLOP_224 = 22.15

COLUMNS = ["target", "how", "images", "size", "batch", "epochs", "steps/epoch", "cold_s",
           "warm1_s", "extra_epochs", "warm_more_s", "compile_cold_s", "compile_warm_s",
           "data_s", "setup_s", "finalize_s", "epoch_s", "train_epoch_s", "eval_epoch_s",
           "ckpt_epoch_s", "head_epoch_s", "img_per_s", "mfu", "run_s", "frz_run_s",
           "target_grid_s"]
#: Added with --runs_at_once > 1: runs sharing the accelerator, per run and per target.
AT_ONCE_COLUMNS = ["at_once", "at_once_1epoch_s", "at_once_more_s", "at_once_run_s",
                   "at_once_grid_s"]
AT_ONCE_NOTE = ("at_once_1epoch_s / at_once_more_s: wall time of K train subprocesses at once "
                "(1 epoch; 1 + extra_epochs); at_once_run_s: one run's share of K at once, "
                "start-up included; at_once_grid_s: the target's 25 runs that way")
#: What the columns from the runs' ``results.json`` timing mean (printed under the table).
TIMING_NOTE = ("data_s / setup_s / finalize_s: a warm run's split decode onto the device, its "
               "whole setup (integrity check, model init, decode, restore) and its final "
               "predictions + exports; train/eval/ckpt_epoch_s: one extra epoch's training "
               "steps, validation and checkpoint save (results.json 'timing'); head_epoch_s: "
               "one epoch of the freeze variants' head phase (frozen base), timed the same "
               "way; frz_run_s: a freeze variant's run, its head phase included")


def configs_dir(flag_value: Optional[str] = None) -> str:
    """The folder holding ``revisiting/<target>.py``: the flag, else the sweep's
    (``$MEDTRANSFER_CONFIGS``, the source checkout's configs/, ./configs)."""
    cand = flag_value or sweep.default_config_dir()
    if os.path.isfile(os.path.join(cand, "revisiting", "breast.py")):
        return cand
    raise UserError(f"bench grid: no configs/revisiting/<target>.py under "
                    f"{flag_value or 'the working directory or the source checkout'}; pass "
                    "--configs_dir=<repo>/configs (the protocol files are not installed with "
                    "the package)")


def target_config(cfg_dir: str, target: str, *, protocol: str, scale: float, width: int,
                  depth: int, max_image_size: int, max_batch: int, dtype: str, cache: str):
    """The target's protocol config with synthetic data of the paper's size and classes."""
    path = os.path.join(cfg_dir, "revisiting", f"{target}.py")
    # Each target's own fold default (pcam accepts only its paper CSVs); the data is
    # synthetic, so the project's k-fold split replaces the CSVs afterwards.
    c = configs.load(f"{path}:random,protocol={protocol}")
    c.data.folds = "kfold"
    n, k = PAPER_TARGETS[target]
    c.data.name = "synthetic"
    c.data.synthetic.num_examples = max(8 * k, int(round(n * scale)))
    c.data.synthetic.num_classes = k
    c.data.image_size = min(c.data.image_size, max_image_size)
    c.data.cache = cache
    c.model.width, c.model.depth, c.model.dtype = width, depth, dtype
    c.train.batch_size = min(c.train.batch_size, max_batch)
    c.eval.batch_size = min(c.eval.batch_size, max_batch)
    c.eval.patience = 0
    c.log.every_steps = 10 ** 6
    return c


def _timed_run(config, epochs: int, root: str):
    config.train.num_epochs = epochs
    wd = tempfile.mkdtemp(dir=root)
    t0 = time.perf_counter()
    res = loop.train_and_evaluate(config, wd)
    secs = time.perf_counter() - t0
    shutil.rmtree(wd, ignore_errors=True)
    return secs, res


def _epoch_work(config) -> float:
    """Images x pixels of one training epoch: what an epoch's time scales with."""
    return float(config.data.synthetic.num_examples) * float(config.data.image_size) ** 2


def grid_runs(num_targets: int) -> int:
    """Fine-tunes of the study grid for ``num_targets`` targets (175 for all seven)."""
    return num_targets * VARIANTS * FOLDS


def title(targets: Sequence[str]) -> str:
    """The report title: says how many runs the TOTAL row projects to."""
    return (f"Revisiting grid: measured per target, projected to {grid_runs(len(targets))} "
            f"runs ({len(targets)} of {len(PAPER_TARGETS)} targets)")


def mfu_note(width: int, depth: int, dtype: str) -> Optional[str]:
    """The footnote of an ``n/a`` mfu column (None when MFU is computed)."""
    if (width, depth) != (64, 50):
        return "mfu: n/a, the FLOP count is known for ResNet50 at width 64 only"
    return common.mfu_note([dtype])


def _grid_s(run_s: float, frz_run_s: float) -> float:
    return FOLDS * ((VARIANTS - FROZEN_VARIANTS) * run_s + FROZEN_VARIANTS * frz_run_s)


def _loop_s(results) -> float:
    """A run's training-loop seconds: its steps, evaluations and checkpoint saves."""
    t = results["timing"]
    return t["train_s"] + t["eval_s"] + t["checkpoint_s"]


def share_gpu_with_runs(k: int) -> None:
    """This process keeps its GPU memory while its K runs at once go: it and each run
    take 0.9 / (K + 1) of the GPU (``sweep.shared_gpu_env``; the runs inherit it), or all
    the fraction the user set. Call before JAX starts its GPU backend."""
    os.environ.update(sweep.shared_gpu_env(dict(os.environ), k + 1))


def _runs_at_once(config, k: int, epochs: int, root: str) -> tuple:
    """(wall seconds, mean training-loop seconds) of ``k`` ``train`` subprocesses of
    ``config`` (``epochs`` each) started at once, the way ``study --mode=subprocess
    --parallel=k`` runs them (sharing the GPU: :func:`share_gpu_with_runs`); they read the
    compile cache this process filled."""
    config = config.copy_and_resolve_references()
    config.train.num_epochs = epochs
    where = tempfile.mkdtemp(dir=root, prefix=f"at_once_{epochs}_")
    path = write_resolved(config, os.path.join(where, "config.py"), origin="bench grid")
    runs = [sweep.Run(f"r{i}", path, os.path.join(where, f"r{i}")) for i in range(k)]
    cache = compile_cache.enable(None)
    t0 = time.perf_counter()
    status = sweep.run_all(runs, parallel=k, mode="subprocess", on_done=None,
                           train_flags=[f"--xla_cache_dir={cache}"])
    secs = time.perf_counter() - t0
    bad = {n: s for n, s in status.items() if s != "done"}
    if bad:
        raise RuntimeError(f"bench grid: {len(bad)} of the {k} runs at once ended {bad}; "
                           f"their logs: {where}/r*/train.log")
    loop_s = sum(_loop_s(sweep.read_results(r.workdir)) for r in runs) / k
    shutil.rmtree(where, ignore_errors=True)
    return secs, loop_s


def _at_once(config, k: int, extra: int, root: str, head_ratio: float = 1.0) -> Dict[str, Any]:
    """The ``at_once_*`` columns: K runs of 1 and of 1 + ``extra`` epochs at once. The K
    epochs at once cost the difference of the runs' mean training loops (which ran side
    by side) over ``extra``, so the processes' start-up noise stays out of it; a head
    epoch costs ``head_ratio`` of an epoch, as measured one at a time."""
    nan = float("nan")
    failed = {"at_once": k, "at_once_1epoch_s": nan, "at_once_more_s": nan,
              "at_once_run_s": nan, "at_once_grid_s": nan, "at_once_epoch_s": nan,
              "at_once_fixed_s": nan}
    try:  # the longer batch first: what it adds to the compile cache (a program the
        # bench's own runs compiled under its 0.5 s threshold, then above it in a busy
        # process) then counts toward the epochs (an overestimate), not against them
        w2, loop_more = _runs_at_once(config, k, 1 + extra, root)
        w1, loop_1 = _runs_at_once(config, k, 1, root)
    except RuntimeError as e:  # e.g. out of GPU memory: the one-at-a-time row still counts
        common.progress(f"[grid] {e}; its at_once columns are NaN")
        return failed
    epochs_k = (loop_more - loop_1) / extra  # one epoch of each of the k runs, at once
    if epochs_k <= 0:
        common.progress(f"[grid] {k} runs at once: {extra} extra epoch(s) took no measurable "
                        f"time (mean training loops {loop_1:.2f} s vs {loop_more:.2f} s); "
                        "at_once_run_s reported as NaN")
        return dict(failed, at_once_1epoch_s=w1, at_once_more_s=w2)
    fixed, epoch = max(w1 - epochs_k, 0.0) / k, epochs_k / k   # per run
    run_s = fixed + int(config.train.num_epochs) * epoch
    frz_run_s = run_s + int(config.train.head_phase.num_epochs) * epoch * head_ratio
    return {"at_once": k, "at_once_1epoch_s": w1, "at_once_more_s": w2,
            "at_once_run_s": run_s, "at_once_grid_s": _grid_s(run_s, frz_run_s),
            "at_once_epoch_s": epoch, "at_once_fixed_s": fixed}


def _head_epoch(config, extra: int, root: str) -> float:
    """Seconds of one head-phase epoch (a linear probe's: frozen base, BatchNorm in
    inference mode), by the same difference of training loops as a full epoch, after a
    run that compiles its step; NaN if the extra epochs took no measurable time."""
    probe = config.copy_and_resolve_references()
    probe.train.freeze = "linear_probe"
    _timed_run(probe, 1, root)              # compiles the probe's train step
    _, p1 = _timed_run(probe, 1, root)
    _, pm = _timed_run(probe, 1 + extra, root)
    head_s = (_loop_s(pm) - _loop_s(p1)) / extra
    return head_s if head_s > 0 else float("nan")


def _head_ratio(rows: Sequence[Dict[str, Any]]) -> float:
    """A head epoch's cost over a full epoch's, the mean over ``rows`` that timed both;
    1 (the full cost: an upper bound) when none did."""
    ratios = [r["head_epoch_s"] / r["epoch_s"] for r in rows
              if math.isfinite(r.get("head_epoch_s", float("nan")))
              and math.isfinite(r["epoch_s"]) and r["epoch_s"] > 0]
    return sum(ratios) / len(ratios) if ratios else 1.0


def bench_target(target: str, config, root: str,
                 min_extra_images: float = MIN_EXTRA_IMAGES,
                 runs_at_once: int = 1) -> Dict[str, Any]:
    """Three runs of one target (cold 1 epoch, warm 1 epoch, warm 1 + k epochs) and, if
    the protocol has a head phase, three linear-probe runs (:func:`_head_epoch`) -> a
    row; with ``runs_at_once`` > 1 also the ``at_once_*`` columns (:func:`_at_once`)."""
    epochs = int(config.train.num_epochs)  # the protocol's; the timed runs change it
    head_epochs = int(config.train.head_phase.num_epochs)
    t0 = time.perf_counter()
    cold, rc = _timed_run(config, 1, root)
    warm1, r1 = _timed_run(config, 1, root)
    t1 = r1["timing"]
    steps = int(r1["steps_per_epoch"])
    bs = int(config.train.batch_size)
    extra = int(min(max(1, math.ceil(min_extra_images / (steps * bs))), max(epochs, 1)))
    misses = decode_memo.MEMO.misses
    warm_more, rm = _timed_run(config, 1 + extra, root)
    misses = decode_memo.MEMO.misses - misses
    config.train.num_epochs = epochs
    loop_1, loop_more = _loop_s(r1), _loop_s(rm)
    epoch_s = (loop_more - loop_1) / extra
    if epoch_s <= 0:
        common.progress(f"[grid] {target}: {extra} extra epoch(s) took no measurable time "
                        f"(training loops {loop_1:.2f} s vs {loop_more:.2f} s); epoch time "
                        "reported as NaN")
        epoch_s = float("nan")
    fixed_s = max(warm1 - epoch_s, 0.0) if math.isfinite(epoch_s) else float("nan")
    run_s = fixed_s + epochs * epoch_s
    head_s = _head_epoch(config, extra, root) if head_epochs > 0 else float("nan")
    ratio = _head_ratio([{"head_epoch_s": head_s, "epoch_s": epoch_s}])
    frz_run_s = run_s + head_epochs * epoch_s * ratio
    size = int(config.data.image_size)
    ips = steps * bs / epoch_s
    mfu: Any = "n/a"  # see mfu_note
    if config.model.width == 64 and config.model.depth == 50:
        peak = common.peak_flops(jax.devices()[0].device_kind, config.model.dtype)
        if peak:
            mfu = ips * TRAIN_GFLOP_224 * 1e9 * (size / 224) ** 2 / (peak * jax.device_count())
    at_once = _at_once(config, runs_at_once, extra, root, ratio) if runs_at_once > 1 else {}
    return {"target": target, "how": "measured", **at_once,
            "images": int(config.data.synthetic.num_examples), "size": size,
            "batch": bs, "epochs": epochs, "steps/epoch": steps, "cold_s": cold,
            "warm1_s": warm1, "extra_epochs": extra, "warm_more_s": warm_more,
            "compile_cold_s": rc.get("compile_s", float("nan")),
            "compile_warm_s": r1.get("compile_s", float("nan")),
            "warm_cache_hits": r1.get("compile_cache_hits", 0),
            "warm_decode_misses": misses, "data_s": t1["data_s"],
            "setup_s": sum(t1[k] for k in ("integrity_s", "model_init_s", "data_s", "restore_s")),
            "finalize_s": t1["finalize_s"], "epoch_s": epoch_s,
            **{f"{k}_epoch_s": (rm["timing"][f"{k}_s"] - t1[f"{k}_s"]) / extra
               for k in ("train", "eval")},
            "ckpt_epoch_s": (rm["timing"]["checkpoint_s"] - t1["checkpoint_s"]) / extra,
            "head_epoch_s": head_s, "img_per_s": ips, "mfu": mfu, "run_s": run_s,
            "frz_run_s": frz_run_s, "target_grid_s": _grid_s(run_s, frz_run_s),
            "fixed_s": fixed_s, "bench_s": time.perf_counter() - t0, "work": _epoch_work(config)}


def project_target(target: str, config, measured: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """A target the budget left out, from the measured rows of the image size nearest its
    own: epoch time at their mean seconds per image-pixel, their mean fixed cost and head
    epoch to epoch ratio; nothing is timed. Nearest, because small images use a GPU less
    well: on an H200, isic at 112 px took 1.44x the epoch time projected from mammograms
    at 224 px."""
    ok = [r for r in measured if math.isfinite(r["epoch_s"])] or measured  # NaN if none
    size = int(config.data.image_size)
    gap = min(abs(r["size"] - size) for r in ok)
    ok = [r for r in ok if abs(r["size"] - size) == gap]
    per_work = sum(r["epoch_s"] for r in ok) / sum(r["work"] for r in ok)
    fixed_s = sum(r["fixed_s"] for r in ok) / len(ok)
    epochs = int(config.train.num_epochs)
    epoch_s = per_work * _epoch_work(config)
    run_s = fixed_s + epochs * epoch_s
    ratio = _head_ratio(ok)
    frz_run_s = run_s + int(config.train.head_phase.num_epochs) * epoch_s * ratio
    row = {"target": target, "how": "projected",
           "images": int(config.data.synthetic.num_examples),
           "size": int(config.data.image_size), "batch": int(config.train.batch_size),
           "epochs": epochs, "epoch_s": epoch_s, "run_s": run_s, "frz_run_s": frz_run_s,
           "target_grid_s": _grid_s(run_s, frz_run_s)}
    at_once = [r for r in ok if math.isfinite(r.get("at_once_run_s", float("nan")))]
    if at_once:  # the same projection for runs at once
        a_epoch = (sum(r["at_once_epoch_s"] for r in at_once)
                   / sum(r["work"] for r in at_once) * _epoch_work(config))
        a_run = sum(r["at_once_fixed_s"] for r in at_once) / len(at_once) + epochs * a_epoch
        row.update(at_once=at_once[0]["at_once"], at_once_run_s=a_run, at_once_grid_s=_grid_s(
            a_run, a_run + int(config.train.head_phase.num_epochs) * a_epoch * ratio))
    return row


def run(*, targets: Sequence[str] = tuple(PAPER_TARGETS), protocol: str = "sep2023",
        scale: float = 1.0, width: int = 64, depth: int = 50, max_image_size: int = 4096,
        max_batch: int = 4096, dtype: str = "bfloat16", cache: str = "device",
        cfg_dir: Optional[str] = None, workdir: Optional[str] = None,
        xla_cache_dir: Optional[str] = compile_cache.DEFAULT_DIR,
        time_budget_s: Optional[float] = None, runs_at_once: int = 1) -> List[Dict[str, Any]]:
    """One row per target plus a TOTAL row (the grid of these targets projected: 175 runs
    for all seven).

    ``time_budget_s``: run the targets largest first and start none that would not finish
    within it (judged by the slowest target measured so far); the rest are projected
    from the measured ones of the nearest image size (:func:`project_target`). At least
    one target is always measured.
    """
    bad = [t for t in targets if t not in PAPER_TARGETS]
    if bad:
        raise UserError(f"bench grid: unknown target(s) {bad}; choose from {list(PAPER_TARGETS)}")
    compile_cache.enable(xla_cache_dir)
    cfg_dir = configs_dir(cfg_dir)
    root = workdir or tempfile.mkdtemp(prefix="medtransfer_grid_")
    os.makedirs(root, exist_ok=True)
    cfgs = {t: target_config(cfg_dir, t, protocol=protocol, scale=scale, width=width,
                             depth=depth, max_image_size=max_image_size, max_batch=max_batch,
                             dtype=dtype, cache=cache) for t in targets}
    order = list(targets)
    if time_budget_s:
        order.sort(key=lambda t: -_epoch_work(cfgs[t]) * int(cfgs[t].train.num_epochs))
    t0 = time.perf_counter()
    measured, left = [], []
    for t in order:
        slowest = max((r["bench_s"] for r in measured), default=0.0)
        if measured and time_budget_s and time.perf_counter() - t0 + slowest > time_budget_s:
            left.append(t)
            continue
        measured.append(bench_target(t, cfgs[t], root, MIN_EXTRA_IMAGES * scale,
                                     runs_at_once))
        r = measured[-1]
        at_once = (f"; {runs_at_once} at once: run {r['at_once_run_s']:.1f} s, "
                   f"{grid_runs(1)} runs {r['at_once_grid_s'] / 60:.1f} min"
                   if runs_at_once > 1 else "")
        common.progress(f"[grid] {len(measured)}/{len(targets)} {t}: epoch "
                        f"{r['epoch_s']:.1f} s (head phase {r['head_epoch_s']:.1f} s), run "
                        f"{r['run_s']:.0f} s, compile cold "
                        f"{r['compile_cold_s']:.1f} s / warm {r['compile_warm_s']:.1f} s, "
                        f"{grid_runs(1)} runs {r['target_grid_s'] / 60:.1f} min{at_once} "
                        f"(bench {r['bench_s']:.0f} s)")
    projected = [project_target(t, cfgs[t], measured) for t in left]
    if left:
        common.progress(f"[grid] time budget {time_budget_s:.0f} s: {len(left)} target(s) "
                        f"projected from the {len(measured)} measured: {', '.join(left)}")
    rows = sorted(measured + projected, key=lambda r: list(targets).index(r["target"]))
    how = (f", {len(measured)} of {len(rows)} targets measured, the rest projected"
           if projected else "")
    rows.append({"target": f"TOTAL ({grid_runs(len(rows))} runs{how})",
                 "target_grid_s": sum(r["target_grid_s"] for r in rows),
                 "compile_cold_s": sum(r["compile_cold_s"] for r in measured),
                 "compile_warm_s": sum(r["compile_warm_s"] for r in measured)})
    if runs_at_once > 1:
        rows[-1].update(at_once=runs_at_once,
                        at_once_grid_s=sum(r.get("at_once_grid_s", float("nan"))
                                           for r in rows[:-1]))
    return rows
