"""`python -m medtransfer_jax.study --config=configs/study_demo.py --workdir=DIR`.

Runs a whole study: sources -> fine-tuning sweep -> representation similarity ->
prediction similarity -> filter distributions -> robustness -> report (report.md,
report.html, figures/, tables/). Rerunning with the same --workdir skips finished
stages and resumes interrupted runs.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from medtransfer_jax import errors
from medtransfer_jax.studies import runner

_CONFIG = config_flags.DEFINE_config_file("config", "configs/study_demo.py",
                                          "Study config file (configs/study_*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Study directory (reused = resume).")
_STAGES = flags.DEFINE_list("stages", list(runner.STAGES), "Stages to run, in order.")
_FORCE = flags.DEFINE_bool("force", False, "Rerun the given stages even if done.")
_MODE = flags.DEFINE_enum("mode", "inprocess", ["inprocess", "subprocess"],
                          "Run fine-tuning runs in this process or as subprocesses.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Concurrent runs in subprocess mode.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (e.g. --workdir=/tmp/study_demo).")
    logging.set_verbosity(logging.WARNING)
    try:
        with errors.reported_as_message("study"):
            runner.run_study(_CONFIG.value, _WORKDIR.value, stages=_STAGES.value,
                             force=_FORCE.value, mode=_MODE.value,
                             parallel=_PARALLEL.value)
    except runner.StudyError as e:
        raise app.UsageError(str(e)) from e


if __name__ == "__main__":
    app.run(main)
