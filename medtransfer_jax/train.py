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
(``results.json`` with status ``done``) is not repeated. One process (job) at a time
may use a workdir (``WORKDIR/.lock``). Exit status: 0 done, 1 diverged (see
``results.json``), 2 bad input (one line saying what to fix), 143 stopped by SIGTERM /
a preemption notice / Ctrl-C after saving a checkpoint (rerun to resume).
"""
import sys

from absl import flags

from medtransfer_jax import cli, configs, paths, workdir_lock
from medtransfer_jax.errors import UserError

_CONFIG = cli.define_config_file(
    "train", configs.path("demo"), "Training config file (ml_collections), optionally "
    "FILE:ARG; default: the embedded demo.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, results); "
                               "reusing it resumes the run.")
_NUM_CPU = flags.DEFINE_integer("num_cpu_devices", None, "Local CPU devices per process when "
                                "running on CPU (testing multi-device code without accelerators).")


def _setup_jax():
    import jax  # noqa: E402 (after flags: jax.config must be set before first use)
    if _NUM_CPU.value:
        jax.config.update("jax_num_cpu_devices", _NUM_CPU.value)
    return jax


def main(argv):
    cli.no_positional(argv)
    cli.require(_WORKDIR.value, "--workdir", "the run directory, e.g. --workdir=/tmp/demo")
    cli.check_output_dir(_WORKDIR.value, "--workdir")
    config = _CONFIG.value
    configs.check_batch_sizes(config)
    jax = _setup_jax()
    from medtransfer_jax.configs import validation  # noqa: E402 (imports the model: after jax)
    validation.validate(config)  # every field, before the workdir (lock) is created
    process = cli.init_distributed()
    configs.check_batch_sizes(config, jax.device_count())
    from medtransfer_jax.training import loop  # noqa: E402 (heavy; after validation)

    diverged = getattr(loop, "Diverged", ())  # added with the divergence check
    try:
        with workdir_lock.hold(_WORKDIR.value, process):
            results = loop.train_and_evaluate(config, _WORKDIR.value)
    except UserError as e:   # a missing input: say every other one too, not one per try
        from medtransfer_jax.studies import preflight  # noqa: E402 (only on this path)
        problems = preflight.run_problems(config)
        if len(problems) > 1:
            raise UserError(f"{len(problems)} inputs missing before the run can start: "
                            + "; ".join(problems)) from e
        raise
    except loop.Preempted as e:
        cli.stopped("train", str(e))
    except diverged as e:  # not a user error: the run is recorded as diverged
        print(f"train: diverged: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    if process == 0:
        print(done_line(results, paths.join(paths.workdir(_WORKDIR.value), "results.json")),
              flush=True)


def done_line(results, where) -> str:
    """The last line of a finished run: val/test accuracy and the AUC the protocol's paper
    reported (``results['reported_auc']``, from eval.reported_auc), named by its metric."""
    auc = results.get("reported_auc") or "auc"
    val, test = results["val"], results["test"]
    return (f"done: best step {results['best_step']} | val {auc} {val[auc]:.4f} acc "
            f"{val['accuracy']:.4f} | test {auc} {test[auc]:.4f} acc {test['accuracy']:.4f} | "
            f"results in {where}")


if __name__ == "__main__":
    cli.run(main, "train")
