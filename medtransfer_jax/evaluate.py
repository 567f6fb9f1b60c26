r"""Per-image predictions of a weights checkpoint: ``python -m medtransfer_jax.evaluate``.

    python -m medtransfer_jax.evaluate --checkpoint=runs/breast-imagenet-f0 --splits=test
    python -m medtransfer_jax.evaluate --checkpoint=runs/x/export/best --dataset=breast \
        --data_root=/data/busi --fold=2 --splits=val,test --output=preds.csv

``--checkpoint`` is a weights directory (``metadata.json`` + ``variables/``, e.g. a
run's ``export/best``) or a training workdir (its ``export/best`` is used and its
``config.json`` supplies the data settings; a run whose config.json is missing or damaged
is refused unless ``--dataset`` names the data, since the defaults would test other
images). Writes the predictions CSV the analysis
stage reads (id, group, split, label, prob_0..) and a ``.metrics.json`` beside it.
Bad input: one line ``evaluate: error: ...`` and exit status 2.
"""
import os

from absl import flags

from medtransfer_jax import cli, paths
from medtransfer_jax.errors import UserError

_CKPT = flags.DEFINE_string("checkpoint", None, "Weights directory or training workdir.")
_DATASET = flags.DEFINE_string("dataset", None, "data.name (default: the run's dataset).")
_ROOT = flags.DEFINE_string("data_root", None, "data.root (default: the run's).")
_FOLD = flags.DEFINE_integer("fold", None, "0-based fold (default: the run's, else 0).")
_SPLITS = flags.DEFINE_list("splits", ["test"], "Splits to predict: train, val, test, the "
                            "names of extra test sets (e.g. ood), or 'all'.")
_SIZE = flags.DEFINE_integer("image_size", None, "Input size (default: the run's, else the "
                             "checkpoint's metadata).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Global eval batch size.")
_OUTPUT = flags.DEFINE_string("output", None, "Predictions CSV file (default: "
                              "predictions_<dataset>_fold<k>.csv in the run directory when "
                              "--checkpoint is a run or its export/best, else in the weights "
                              "directory).")


def _validate() -> None:
    """Everything that can be checked without JAX: fails before anything is loaded."""
    cli.require(_CKPT.value, "--checkpoint", "a weights dir or a training workdir")
    # A gs:// checkpoint is checked when it is loaded (no bucket access before that).
    if not paths.is_remote(_CKPT.value) and not os.path.isdir(_CKPT.value):
        raise UserError(f"--checkpoint={_CKPT.value} does not exist; give a weights "
                        "directory (metadata.json + variables/) or a training workdir")
    cli.check_positive(_BATCH.value, "--batch_size")
    cli.check_positive(_SIZE.value, "--image_size")
    if _FOLD.value is not None and _FOLD.value < 0:
        raise UserError(f"--fold={_FOLD.value}: folds are 0-based, >= 0")
    if _OUTPUT.value:
        if not paths.is_remote(_OUTPUT.value):
            if os.path.isdir(_OUTPUT.value):
                raise UserError(f"--output={_OUTPUT.value} is a directory; give a CSV file path")
            cli.check_output_dir(os.path.dirname(os.path.abspath(_OUTPUT.value)), "--output")
    else:
        cli.check_output_dir(_CKPT.value, "--checkpoint (the default output goes there)")


def main(argv):
    cli.no_positional(argv)
    _validate()
    cli.init_distributed()
    import jax  # noqa: E402 (after distributed init)
    cli.check_divisible(_BATCH.value, jax.device_count(), "--batch_size")
    from medtransfer_jax.inference.evaluation import evaluate_checkpoint  # noqa: E402
    out, mets = evaluate_checkpoint(
        _CKPT.value, dataset=_DATASET.value, data_root=_ROOT.value, fold=_FOLD.value,
        splits=_SPLITS.value, image_size=_SIZE.value, batch_size=_BATCH.value,
        output=_OUTPUT.value)
    for name, m in mets.items():
        print(f"{name}: auc {m['auc']:.4f} acc {m['accuracy']:.4f} loss {m['loss']:.4f} "
              f"(n={m['num_examples']})")
    print(f"predictions: {out}", flush=True)


if __name__ == "__main__":
    cli.run(main, "evaluate", checkpoints=False)
