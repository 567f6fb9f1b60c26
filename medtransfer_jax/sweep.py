r"""Sweep a grid of runs: ``python -m medtransfer_jax.sweep --study=... --output_dir=DIR``.

    # all Revisiting targets x 3 sources x 5 folds, one run at a time
    python -m medtransfer_jax.sweep --study=revisiting --targets=all \
        --sources=imagenet,radimagenet,random --folds=0,1,2,3,4 --output_dir=runs/revisiting
    # Source Matters tag confounder over p, two runs in parallel
    python -m medtransfer_jax.sweep --study=source_matters --targets=tag \
        --ps=0,0.1,0.2,0.5,0.8,1 --sources=imagenet,radimagenet --parallel=2 --output_dir=runs/sm
    # the embedded demo over 2 folds (works from any directory after pip install)
    python -m medtransfer_jax.sweep --study=demo --folds=0,1 --output_dir=/tmp/demo_sweep
    # only re-collect the table
    python -m medtransfer_jax.sweep ... --collect_only

Each run gets ``<output_dir>/<run name>/`` with ``sweep_config.py`` (its resolved config,
what the run actually used), ``train.log`` and the training workdir files. Re-running
the same command continues the sweep: finished runs are skipped, interrupted ones
resume from their checkpoints; runs whose ``results.json`` status is not ``done``
(``diverged``) are listed as failed and never enter the table's metrics. One line per
finished run: ``run 3/10 demo/fold2/seed0: test AUC 0.912 (n=128), 41 s, ETA 5m00s``.
Exit status: 0 when every run of the grid is done, 1 when any run failed (diverged,
error, ``--timeout``), 2 for bad input; SIGTERM or Ctrl-C: the running runs save, the
sweep exits 143 and prints how to resume. One sweep at a time per ``--output_dir``.
Multi-host (``--multihost``, run on every host): every process runs the same runs; only
process 0 writes ``results.csv``; logs are per process.
"""
import contextlib
import os

from absl import flags, logging

from medtransfer_jax import cli, interrupts, paths, workdir_lock
from medtransfer_jax.errors import UserError
from medtransfer_jax.studies import progress
from medtransfer_jax.training import presets, sweep

_STUDY = flags.DEFINE_enum("study", "revisiting", list(sweep.STUDIES), "Which study's configs.")
_TARGETS = flags.DEFINE_list("targets", ["all"], "Targets (revisiting: its config files, "
                             "chest, breast, ...) or confounders (source_matters: tag, lowpass, "
                             "noise, sampled); 'all' for every one. Not for --study=demo.")
_SOURCES = flags.DEFINE_list("sources", list(presets.SOURCES), "Sources, of "
                             f"{', '.join(presets.SOURCES)}. Not for --study=demo.")
_FOLDS = flags.DEFINE_list("folds", ["0", "1", "2", "3", "4"], "0-based folds.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")
_PS = flags.DEFINE_list("ps", [], "Source Matters artefact fractions p "
                        "(--study=source_matters only; default: 0.5, the configs' default).")
_EXTRA = flags.DEFINE_string("extra_arg", "", "Appended to each config argument, e.g. "
                             "freeze=true or protocol=feb2023.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "Config override key=value for all runs "
                                       "(repeatable), e.g. --override=train.batch_size=64.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs", "Sweep directory (one workdir per run "
                                  "below it, results.csv).")
flags.DEFINE_alias("root", "output_dir")  # the flag's name in launch/sweep.py
_CONFIG_DIR = flags.DEFINE_string("config_dir", None, "The studies' config files (default: "
                                  "$MEDTRANSFER_CONFIGS, else the checkout's configs/).")
_CSV = flags.DEFINE_string("csv", None, "Results table (default <output_dir>/results.csv).")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time (--mode=subprocess); runs "
                                 "that share a GPU split 90 % of its memory (on an H200 "
                                 "three at once took 2.6x the time per run of --mode=inprocess, "
                                 "BENCHMARKS.md section 11).")
_MODE = flags.DEFINE_enum("mode", "subprocess", ["subprocess", "inprocess"],
                          "Runs as `python -m medtransfer_jax.train` subprocesses or in this "
                          "process (both read the same resolved sweep_config.py).")
_TIMEOUT = flags.DEFINE_float("timeout", None, "Seconds per run (--mode=subprocess): a run "
                              "still going then is stopped, saves its checkpoint and is listed "
                              "as failed (timeout; exit 1); the same command resumes it.")
_DRY = flags.DEFINE_bool("dry_run", False, "Print each run's train command only (creates "
                         "nothing).")
_COLLECT = flags.DEFINE_bool("collect_only", False, "Only collect results into the CSV.")
_GPU_SLOTS = flags.DEFINE_list("gpu_slots", [], "One run per slot at a time, each with "
                               "CUDA_VISIBLE_DEVICES=<slot>, e.g. 0,1,2,3 (one GPU per run); "
                               "a repeated slot shares its GPU, e.g. 0,0,0,0 (four runs at "
                               "once on GPU 0, each preallocating 22.5 % of its memory).")


def _numbers(values, kind, flag):
    try:
        return [kind(v) for v in values]
    except ValueError:
        raise UserError(f"--{flag}={','.join(values)}: expected comma-separated "
                        f"{kind.__name__}s") from None


def _process_index() -> int:
    """This host's index without starting JAX here (the training subprocesses do that)."""
    if flags.FLAGS["process_id"].value is not None:
        return int(flags.FLAGS["process_id"].value)
    for var in ("JAX_PROCESS_ID", "TPU_WORKER_ID", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _check_flags_apply() -> None:
    """Flags the chosen study or mode would ignore are an error, not silence."""
    ignored = {"demo": ("targets", "sources", "ps", "extra_arg", "config_dir"),
               "revisiting": ("ps",), "source_matters": ()}[_STUDY.value]
    for name in ignored:
        if flags.FLAGS[name].present:
            uses = ("--folds, --seeds and --override" if _STUDY.value == "demo"
                    else "--targets, --sources, --folds, --seeds, --extra_arg, --override")
            raise UserError(f"--{name} does not apply to --study={_STUDY.value} (it takes "
                            f"{uses}); leave --{name} out")
    if _GPU_SLOTS.value and flags.FLAGS["parallel"].present:
        raise UserError("--parallel and --gpu_slots both set the runs at once; give one (with "
                        "slots: one run per slot)")
    if _MODE.value == "inprocess":
        for name in ("timeout", "gpu_slots", "parallel"):
            if flags.FLAGS[name].present:
                raise UserError(f"--{name} applies to --mode=subprocess only (--mode=inprocess "
                                f"runs one run at a time in this process); leave it out")


def _targets():
    """--targets for revisiting / source_matters: 'all' or names of its config files."""
    sub = "revisiting" if _STUDY.value == "revisiting" else "source_matters"
    config_dir = os.path.join(_CONFIG_DIR.value or sweep.default_config_dir(), sub)
    known = (sorted(f[:-3] for f in os.listdir(config_dir) if f.endswith(".py")
                    and not f.startswith("_")) if os.path.isdir(config_dir) else [])
    default = (presets.REVISITING_TARGETS if _STUDY.value == "revisiting"
               else presets.CONFOUNDERS)
    if _TARGETS.value == ["all"]:
        return list(default)
    if known:  # no config dir at all: expand_grid names the missing directory
        cli.check_choices(_TARGETS.value, known, "targets", also="all")
    return _TARGETS.value


def _runs():
    if _STUDY.value == "demo":
        targets = []
    else:
        targets = _targets()
        cli.check_choices(_SOURCES.value, presets.SOURCES, "sources")
    folds = _numbers(_FOLDS.value, int, "folds")
    if any(f < 0 for f in folds):
        raise UserError(f"--folds={','.join(_FOLDS.value)}: folds are 0-based, >= 0")
    return sweep.expand_grid(
        _STUDY.value, targets=targets, sources=_SOURCES.value, folds=folds,
        seeds=_numbers(_SEEDS.value, int, "seeds"),
        ps=_numbers(_PS.value, float, "ps") or None, extra_arg=_EXTRA.value,
        root=_OUTPUT_DIR.value, config_dir=_CONFIG_DIR.value, overrides=_OVERRIDES.value)


def _check_collectable(root: str, runs) -> None:
    """--collect_only reads what an earlier sweep wrote; with nothing there it would only
    write a table of 'new' rows (and create the directory)."""
    if not (paths.isdir(root) and any(paths.isdir(r.workdir) for r in runs)):
        raise UserError(f"--collect_only: nothing to collect in {root} (no run directory of "
                        "this grid there); run the sweep first, or give the --output_dir and "
                        "grid flags it ran with")


def main(argv):
    cli.no_positional(argv)
    cli.check_positive(_PARALLEL.value, "--parallel")
    cli.check_positive(_TIMEOUT.value, "--timeout")
    _check_flags_apply()
    root = cli.check_output_dir(_OUTPUT_DIR.value, "--output_dir")
    runs = _runs()
    sweep.check_runs(runs)  # every config resolves: nothing is created before this
    if _COLLECT.value:
        _check_collectable(root, runs)
    logging.info("%d runs in the grid", len(runs))
    process = _process_index()
    csv_path = _CSV.value or os.path.join(root, "results.csv")
    if _DRY.value:
        sweep.run_all(runs, dry_run=True, train_flags=cli.multihost_flags())
        return
    cli.enable_compile_cache()  # in-process runs of the same shapes compile once
    if _MODE.value == "inprocess" and cli.multihost_flags():
        process = cli.init_distributed()   # the runs train in this process: join the hosts
    created = not os.path.exists(root)
    try:
        with workdir_lock.hold(root, process):
            _sweep(runs, process, csv_path)
    except UserError:
        # A run rejected its input: leave no empty sweep directory behind (hold() has
        # already removed it when process 0's lock was all it held).
        if created and os.path.isdir(root):
            for name in os.listdir(root):
                if name.startswith(workdir_lock.LOCK_FILE):
                    os.remove(os.path.join(root, name))
            with contextlib.suppress(OSError):
                os.rmdir(root)
        raise


def _progress_line(runs):
    """``on_done`` of ``sweep.run_all``: the study's per-run line with an ETA."""
    todo = sum(r.status() in ("new", "partial") for r in runs)
    at_once = (len(_GPU_SLOTS.value) or _PARALLEL.value) if _MODE.value == "subprocess" else 1
    prog = progress.Progress("run", len(runs), done_before=len(runs) - todo, parallel=at_once)

    def on_done(run, status: str, seconds: float) -> None:
        if status == "stopped":  # not finished: neither counted nor timed
            print(f"[sweep] {run.name}: stopped after {progress.format_duration(seconds)} "
                  "(saved; the same command resumes it)", flush=True)
        else:
            prog.item_done(run.name, seconds, sweep.run_detail(run, status))
    return on_done


def _sweep(runs, process: int, csv_path: str) -> None:
    """Runs (unless --collect_only) and collects; exits 1 when any run failed."""
    status = {}
    if not _COLLECT.value:
        try:
            status = sweep.run_all(runs, parallel=_PARALLEL.value, mode=_MODE.value,
                                   timeout=_TIMEOUT.value, train_flags=cli.multihost_flags(),
                                   gpu_slots=_GPU_SLOTS.value or None, process_index=process,
                                   on_done=_progress_line(runs))
        except interrupts.Interrupted:  # the table also after a stop: what is done so far
            sweep.collect(runs, csv_path, process_index=process)
            raise
    rows = sweep.collect(runs, csv_path, process_index=process)
    # a run that crashed or timed out has no final results.json: its status says why
    failed = {r["name"]: r["status"] for r in rows if r["status"] not in ("done", "new", "partial")}
    failed.update({n: s.split(":", 1)[1] for n, s in status.items() if s.startswith("failed:")})
    done = sum(r["status"] == "done" for r in rows)
    unfinished = len(rows) - done - len(failed)
    print(f"{done}/{len(rows)} runs done"
          + (f"; failed: {', '.join(f'{n} ({why})' for n, why in failed.items())}"
             if failed else "")
          + (f"; {unfinished} not finished (rerun the sweep)" if unfinished > 0 else "")
          + f"; table: {csv_path}", flush=True)
    if failed or done < len(rows):
        raise SystemExit(1)


if __name__ == "__main__":
    cli.run(main, "sweep", quiet=True)
