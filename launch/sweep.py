r"""Sweep runner: grid -> runs (resumable, skipping finished ones) -> one results CSV.

    # all Revisiting targets x 3 sources x 5 folds, one run at a time
    python launch/sweep.py --study=revisiting --targets=all --sources=imagenet,radimagenet,random \
        --folds=0,1,2,3,4 --root=runs/revisiting
    # Source Matters tag confounder over p, two runs in parallel
    python launch/sweep.py --study=source_matters --targets=tag --ps=0,0.1,0.2,0.5,0.8,1 \
        --sources=imagenet,radimagenet --parallel=2 --root=runs/sm
    # only re-collect the table
    python launch/sweep.py ... --collect_only

Re-running the same command continues the sweep: finished runs (``results.json`` done)
are skipped, interrupted ones resume from their checkpoints. The table is written to
``<root>/results.csv`` (or ``--csv``).
"""
import os

from absl import app, flags, logging

from medtransfer_jax.training import presets, sweep

_STUDY = flags.DEFINE_enum("study", "revisiting", list(sweep.STUDIES), "Which study's configs.")
_TARGETS = flags.DEFINE_list("targets", ["all"], "Targets (revisiting) or confounders "
                             "(source_matters); 'all' for every one.")
_SOURCES = flags.DEFINE_list("sources", ["imagenet", "radimagenet", "random"], "Sources.")
_FOLDS = flags.DEFINE_list("folds", ["0", "1", "2", "3", "4"], "0-based folds.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")
_PS = flags.DEFINE_list("ps", [], "Source Matters artefact fractions p.")
_EXTRA = flags.DEFINE_string("extra_arg", "", "Appended to each config argument, e.g. "
                             "freeze=true or protocol=feb2023.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "Config override key=value for all runs "
                                       "(repeatable), e.g. --override=train.batch_size=64.")
_ROOT = flags.DEFINE_string("root", "runs", "Sweep directory (one workdir per run below it).")
_CSV = flags.DEFINE_string("csv", None, "Results table (default <root>/results.csv).")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time.")
_TIMEOUT = flags.DEFINE_float("timeout", None, "Seconds per run (then it is left to resume).")
_DRY = flags.DEFINE_bool("dry_run", False, "Print the commands only.")
_COLLECT = flags.DEFINE_bool("collect_only", False, "Only collect results into the CSV.")
_GPU_SLOTS = flags.DEFINE_list("gpu_slots", [], "One run per slot at a time, each with "
                                "CUDA_VISIBLE_DEVICES=<slot>, e.g. 0,1,2,3 (one GPU per run).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Pass --multihost to every training process "
                               "(run this sweep on every host of a slice, --parallel=1).")


def main(argv):
    del argv
    targets = _TARGETS.value
    if targets == ["all"]:
        targets = (list(presets.REVISITING_TARGETS) if _STUDY.value == "revisiting"
                   else list(presets.CONFOUNDERS))
    runs = sweep.expand_grid(
        _STUDY.value, targets=targets, sources=_SOURCES.value,
        folds=[int(f) for f in _FOLDS.value], seeds=[int(s) for s in _SEEDS.value],
        ps=[float(p) for p in _PS.value] or None, extra_arg=_EXTRA.value, root=_ROOT.value,
        overrides=_OVERRIDES.value)
    logging.info("%d runs in the grid", len(runs))
    if not _COLLECT.value:
        status = sweep.run_all(runs, parallel=_PARALLEL.value, timeout=_TIMEOUT.value,
                               dry_run=_DRY.value,
                               train_flags=["--multihost"] if _MULTIHOST.value else (),
                               gpu_slots=_GPU_SLOTS.value or None)
        counts = {}
        for s in status.values():
            counts[s.split(":")[0]] = counts.get(s.split(":")[0], 0) + 1
        print(f"sweep: {counts}")
    csv_path = _CSV.value or os.path.join(_ROOT.value, "results.csv")
    rows = sweep.collect(runs, csv_path)
    print(f"{sum(r['status'] == 'done' for r in rows)}/{len(rows)} runs done; table: {csv_path}")


if __name__ == "__main__":
    app.run(main)
