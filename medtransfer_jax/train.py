r"""Fine-tune a ResNet: ``python -m medtransfer_jax.train --workdir=DIR [--config=FILE[:ARG]]``.

Examples::

    # the embedded demo (synthetic data, a few minutes on a laptop CPU)
    python -m medtransfer_jax.train --workdir=/tmp/medtransfer_demo
    # a Revisiting experiment, fold 1 (0-based), overriding the batch size
    python -m medtransfer_jax.train --config=configs/revisiting/breast.py:imagenet,fold=1 \
        --workdir=runs/breast-imagenet-f1 --config.train.batch_size=64
    # multi-host (Cloud TPU pod slice: run on every worker; see launch/tpu_vm.sh)
    python -m medtransfer_jax.train --multihost --config=... --workdir=gs://bucket/run

Re-running with the same ``--workdir`` resumes from the last checkpoint; a finished run
(``results.json`` with status ``done``) is not repeated. Exit status 143 means the run
was stopped by SIGTERM / a preemption notice after saving a checkpoint.
"""
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from medtransfer_jax import errors

_DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                     "demo.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEMO, "Training config file (ml_collections), optionally FILE:ARG.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, results); "
                               "reusing it resumes the run.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (Cloud "
                               "TPU pod slices and multi-node GPU clusters auto-detect the rest).")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (manual "
                             "multi-process runs, e.g. several local processes).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (manual multi-process).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (manual multi-process).")
_XLA_CACHE = flags.DEFINE_string(
    "xla_cache_dir", os.environ.get("MEDTRANSFER_XLA_CACHE", "~/.cache/medtransfer_jax/xla"),
    "Persistent XLA compilation cache (restarts after preemption and sweeps skip "
    "recompiling); '' disables. Ignored if JAX_COMPILATION_CACHE_DIR is set.")
_NUM_CPU = flags.DEFINE_integer("num_cpu_devices", None, "Local CPU devices per process when "
                                "running on CPU (testing multi-device code without accelerators).")


class _QuietLibraries(pylogging.Filter):
    """Drops the INFO chatter of orbax/grain (hundreds of lines per checkpoint)."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or not any(
            s in record.pathname for s in ("/orbax/", "/grain/", "/etils/"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required, e.g. --workdir=/tmp/medtransfer_demo")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    import jax
    if _NUM_CPU.value:
        jax.config.update("jax_num_cpu_devices", _NUM_CPU.value)
    if _XLA_CACHE.value and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_XLA_CACHE.value))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from medtransfer_jax.training import loop, sharding

    kwargs = {k: v for k, v in dict(coordinator_address=_COORD.value,
                                    num_processes=_NPROC.value,
                                    process_id=_PID.value).items() if v is not None}
    sharding.maybe_initialize_distributed(force=_MULTIHOST.value, **kwargs)
    config = _CONFIG.value
    logging.info("config:\n%s", config)
    try:
        with errors.reported_as_message("train"):
            results = loop.train_and_evaluate(config, _WORKDIR.value)
    except loop.Preempted as e:
        logging.warning("%s", e)
        sys.exit(143)
    if jax.process_index() == 0:
        val, test = results["val"], results["test"]
        print(f"done: best step {results['best_step']} | val auc {val['auc']:.4f} "
              f"acc {val['accuracy']:.4f} | test auc {test['auc']:.4f} acc {test['accuracy']:.4f}"
              f" | results in {os.path.join(os.path.abspath(_WORKDIR.value), 'results.json')}",
              flush=True)


if __name__ == "__main__":
    app.run(main)
