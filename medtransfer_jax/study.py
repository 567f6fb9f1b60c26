"""Run a whole study: ``python -m medtransfer_jax.study --workdir=DIR [--config=FILE]``.

Stages: sources -> fine-tuning sweep -> representation similarity -> prediction
similarity -> filter distributions -> robustness -> report (report.md, report.html,
figures/, tables/). The default config is the embedded demo study
(``medtransfer_jax/configs/study_demo.py``, ~1.5 minutes on 2 CPU cores), so the
command works from any directory after ``pip install``.

Rerunning with the same --workdir skips finished stages and resumes interrupted runs.
SIGTERM / a preemption notice / Ctrl-C: the running fine-tuning run saves a checkpoint,
the study stops with exit status 143 and prints the command that resumes it; the
resumed study produces the same tables. One study process per workdir at a time.
Logs at WARNING unless --verbosity is given; bad input: one line, exit status 2.
"""
from absl import flags

from medtransfer_jax import cli, configs, workdir_lock
from medtransfer_jax.errors import UserError
from medtransfer_jax.studies import runner
from medtransfer_jax.training import sweep

_CONFIG = cli.define_config_file("study", configs.path("study_demo"),
                                 "Study config file (configs/study_*.py); default: the "
                                 "embedded demo study.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Study directory (reused = resume).")
_STAGES = flags.DEFINE_list("stages", list(runner.STAGES), "Stages to run, in order.")
_FORCE = flags.DEFINE_bool("force", False, "Rerun the given stages even if done.")
_MODE = flags.DEFINE_enum("mode", "inprocess", ["inprocess", "subprocess"],
                          "Run fine-tuning runs in this process or as subprocesses.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Concurrent runs in subprocess mode (on "
                                 "one GPU they split 90 % of its memory; on an H200 three "
                                 "at once took 2.6x the time per run of --mode=inprocess, "
                                 "BENCHMARKS.md section 11).")
_GPU_SLOTS = flags.DEFINE_list("gpu_slots", [], "--mode=subprocess: one run per slot at a "
                               "time with CUDA_VISIBLE_DEVICES=<slot>, e.g. 0,1,2,3,4,5,6,7 "
                               "(a run per GPU); a repeated slot shares its GPU (0,0,1,1).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Only the pre-flight: print the grid (runs, "
                             "images to process) and everything missing (data roots, fold "
                             "CSVs, checkpoint files, disk space); create nothing.")


def _check(study: runner.Study) -> None:
    """Stages and every run's config resolve, before any directory is created."""
    bad = [s for s in _STAGES.value if s not in runner.STAGES]
    if bad:
        raise UserError(f"--stages: unknown stage(s) {bad}; choose from {runner.STAGES}")
    runs = study.finetune_runs() + [
        sweep.Run(f"sources/{name}", spec.config, "", list(spec.get("overrides", [])))
        for name, spec in study.config.sources.items() if spec.get("kind") == "pretrain"]
    sweep.check_runs(runs, check_folds=False)  # the pre-flight lists bad folds


def main(argv):
    cli.no_positional(argv)
    cli.require(_WORKDIR.value, "--workdir", "the study directory, e.g. --workdir=/tmp/study_demo")
    workdir = cli.check_output_dir(_WORKDIR.value, "--workdir")
    cli.check_positive(_PARALLEL.value, "--parallel")
    if cli.multihost_flags():
        raise UserError(f"{' '.join(cli.multihost_flags())}: a study runs on one host (its "
                        "stages, tables and report are one process's); on several hosts run "
                        "the fine-tunes with `python -m medtransfer_jax.sweep --multihost` and "
                        "leave these flags out here")
    if _MODE.value == "inprocess" and flags.FLAGS["parallel"].present:  # --gpu_slots: Study
        raise UserError("--parallel applies to --mode=subprocess only (--mode=inprocess runs "
                        "one run at a time in this process); add --mode=subprocess or leave "
                        "it out")
    if _GPU_SLOTS.value and flags.FLAGS["parallel"].present:
        raise UserError("--parallel and --gpu_slots both set the runs at once; give one (with "
                        "slots: one run per slot)")
    study = runner.Study(_CONFIG.value, workdir, mode=_MODE.value, parallel=_PARALLEL.value,
                         gpu_slots=_GPU_SLOTS.value)
    _check(study)
    study.check_stages(_STAGES.value, _FORCE.value)
    if _DRY_RUN.value:
        report = runner.preflight(_CONFIG.value, workdir, mode=_MODE.value,
                                  parallel=_PARALLEL.value, gpu_slots=_GPU_SLOTS.value)
        print(report.text(), flush=True)
        if report.missing:
            raise UserError(report.error_message())
        return
    cli.enable_compile_cache()  # the study's in-process runs share compiled programs
    with workdir_lock.hold(workdir):
        runner.run_study(_CONFIG.value, workdir, stages=_STAGES.value, force=_FORCE.value,
                         mode=_MODE.value, parallel=_PARALLEL.value,
                         gpu_slots=_GPU_SLOTS.value)


if __name__ == "__main__":
    cli.run(main, "study", quiet=True)
