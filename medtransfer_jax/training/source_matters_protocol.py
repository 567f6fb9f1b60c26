"""The Source Matters fine-tuning protocol (Juodelyte et al., 2024), written once.

The four confounders share one protocol (data, model, training, reported metric); what
differs per confounder (its fold CSVs and the confounder's own settings) lives in its
file ``configs/source_matters/<kind>.py``, which calls :func:`config` and then sets them.
Changing the protocol is one edit here, for all four.

The config argument is ``SOURCE[,key=value...]``: SOURCE is imagenet | radimagenet |
random; the options are :data:`OPTIONS`: ``p`` (the confounded fraction, default 0.5),
``fold`` (0-based) and ``seed`` (``config.seed``), ``dataset`` (``nih_cxr14``, default, or
``lidc``: no paper code or CSVs exist for LIDC), ``folds`` (``paper``, default for
nih_cxr14: the paper's CSVs; ``kfold``: the project's own split).

Values read from DovileDo/source-matters: ``fine-tuning.py`` and ``data/chest14/``.
"""
from __future__ import annotations

from typing import Optional

import ml_collections

from medtransfer_jax.training import presets

OPTIONS = ("p", "fold", "seed", "dataset", "folds")
#: The confounded fraction when the argument gives none.
DEFAULT_P = 0.5


def config(kind: str, arg: Optional[str], where: str) -> ml_collections.ConfigDict:
    """The run config of confounder ``kind`` (``tag`` | ``lowpass`` | ``noise`` |
    ``sampled``) for ``arg``, with ``data.confounder.kind`` and ``.p`` set and the
    confounder's own settings left to its file (``where``, named in errors). Raises
    ValueError for an unknown option, source or value."""
    source, opts = presets.parse_arg(arg, OPTIONS, where=where)
    c = presets.base_config()
    c.study, c.target = "source_matters", kind
    c.seed = presets.number_option(opts, "seed", 0)
    p = presets.number_option(opts, "p", DEFAULT_P, float)

    # ---- data: NIH ChestX-ray14 PA (or LIDC-IDRI slices, a choice: no paper code).
    dataset = opts.get("dataset", "nih_cxr14")
    c.data.name = dataset
    c.data.root = presets.data_root(dataset)
    # fine-tuning.py takes the size as a flag the repo does not record: 224 (ResNet50's
    # native size) is this project's choice.
    c.data.image_size = 224
    c.data.resize_method = "nearest"          # Keras flow_from_dataframe / load_img default
    presets.keras_augment(c, hflip=False)     # same generator as Revisiting, no flips
    c.data.cache = "device"   # decoded once; augmented in the jitted step
    c.data.fold = presets.number_option(opts, "fold", 0)
    c.data.folds = opts.get("folds", "paper" if dataset == "nih_cxr14" else "kfold")
    # Label rule without CSVs: 'No Finding' vs 'Atelectasis' PA images (the classes of the
    # sex experiment; the artefact CSVs' YES/NO rule lived in an unpublished io_functions).
    c.data.nih_labels = ("No Finding", "Atelectasis")
    c.data.nih_views = ("PA",)
    c.data.lidc_label_rule = "median_malignancy"
    # The artefact experiments' CSVs (tag, lowpass, noise): 331 images, train/val per fold
    # and one fixed 83-image test.csv; their class column (YES/NO) is the label.
    c.data.fold_csv_dir, c.data.fold_csv_origin = presets.paper_csvs("source_matters", "chest14")
    c.data.fold_csv_labels = "csv"

    # ---- confounder: on a fraction p of the positive training images
    c.data.confounder.kind = kind
    c.data.confounder.p = p
    c.data.confounder.positive_class = 1

    # ---- model: ResNet50 -> Dropout 0.5 -> softmax for all three sources (random too);
    # caffe preprocess_input, plus rescale 1/255 for RadImageNet.
    presets.apply_source(c, source, "radimagenet" if source == "radimagenet" else "caffe",
                         random_dropout=0.5)

    # ---- training: Adam 1e-3, batch 256, 30 epochs, early stop on val loss (patience
    # 30), best checkpoint by val loss.
    c.train.lr, c.train.batch_size, c.train.num_epochs = 1e-3, 256, 30
    c.eval.batch_size = 256
    # fine-tuning.py: steps_per_epoch = len(train) / batch_size, a float: Keras runs
    # ceil(N/B) steps, the last a partial batch (thyroid, 384 images at 256: 2 updates an
    # epoch, not 1).
    c.train.epoch_steps = "ceil"
    c.eval.monitor = "loss"
    c.eval.patience = 30
    # ---- reported metric: keras.metrics.AUC() on one-hot x softmax (micro, 200 thresholds).
    c.eval.reported_auc = "auc_keras"
    return c
