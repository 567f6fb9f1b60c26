r"""Per-image predictions of a weights checkpoint: ``python -m medtransfer_jax.evaluate``.

    python -m medtransfer_jax.evaluate --checkpoint=runs/breast-imagenet-f0 --splits=test
    python -m medtransfer_jax.evaluate --checkpoint=runs/x/export/best --dataset=breast \
        --data_root=/data/busi --fold=2 --splits=val,test --output=preds.csv

``--checkpoint`` is a weights directory (``metadata.json`` + ``variables/``, e.g. a
run's ``export/best``) or a training workdir (its ``export/best`` is used and its
``config.json`` supplies the data settings). Writes the predictions CSV the analysis
stage reads (id, group, split, label, prob_0..) and a ``.metrics.json`` beside it.
"""
import logging as pylogging

from absl import app, flags, logging

from medtransfer_jax import errors
from medtransfer_jax.training.evaluation import evaluate_checkpoint

_CKPT = flags.DEFINE_string("checkpoint", None, "Weights directory or training workdir.")
_DATASET = flags.DEFINE_string("dataset", None, "data.name (default: the run's dataset).")
_ROOT = flags.DEFINE_string("data_root", None, "data.root (default: the run's).")
_FOLD = flags.DEFINE_integer("fold", None, "0-based fold (default: the run's, else 0).")
_SPLITS = flags.DEFINE_list("splits", ["test"], "Splits to predict: train, val, test, the "
                            "names of extra test sets (e.g. ood), or 'all'.")
_SIZE = flags.DEFINE_integer("image_size", None, "Input size (default: the run's, else the "
                             "checkpoint's metadata).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Global eval batch size.")
_OUTPUT = flags.DEFINE_string("output", None, "Predictions CSV (default: "
                              "<checkpoint>/predictions_<dataset>_fold<k>.csv).")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize().")


class _Quiet(pylogging.Filter):
    def filter(self, record):
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _CKPT.value:
        raise app.UsageError("--checkpoint is required (a weights dir or a training workdir)")
    logging.get_absl_handler().addFilter(_Quiet())
    from medtransfer_jax.training import sharding
    sharding.maybe_initialize_distributed(force=_MULTIHOST.value)
    with errors.reported_as_message("evaluate"):
        out, mets = evaluate_checkpoint(
            _CKPT.value, dataset=_DATASET.value, data_root=_ROOT.value, fold=_FOLD.value,
            splits=_SPLITS.value, image_size=_SIZE.value, batch_size=_BATCH.value,
            output=_OUTPUT.value)
    for name, m in mets.items():
        print(f"{name}: auc {m['auc']:.4f} acc {m['accuracy']:.4f} loss {m['loss']:.4f} "
              f"(n={m['num_examples']})")
    print(f"predictions: {out}", flush=True)


if __name__ == "__main__":
    app.run(main)
