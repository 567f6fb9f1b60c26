"""The Revisiting Transfer fine-tuning protocol (Juodelyte et al., TMLR 2023), written once.

The seven targets share one protocol; what differs per target (its dataset, image sizes,
flips, extra data rules) lives in its file ``configs/revisiting/<target>.py`` as a
:class:`Target`, and :func:`config` builds the run from the two. Changing the protocol
(an lr, the head phase, the reported AUC) is one edit here, for all seven.

The config argument is ``SOURCE[,key=value...]``: SOURCE is imagenet | radimagenet |
random; the options are :data:`OPTIONS`:

* ``fold`` (0-based; the paper's ``*_fold{K+1}.csv``) and ``seed`` (``config.seed``);
* ``freeze`` (train the head on a frozen base first) and ``freeze_parse=argparse`` (parse
  ``freeze`` as the paper's ``argparse type=bool`` did: any value, 'False' included,
  freezes);
* ``protocol``: ``sep2023`` (the repo's head, default) or ``feb2023`` (the scripts that
  wrote the repo's results/ files);
* ``folds``: ``paper`` (default: the paper's fold CSVs) or ``kfold`` (the project's own
  split).

Every value below was read from DovileDo/revisiting-transfer: ``src/fine-tuning.py``
(both protocols), ``src/AUC.py`` (Sep), ``src/base_AUC.py`` and
``src/prediction_similarity.py`` (Feb), ``src/CCA.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import ml_collections

from medtransfer_jax.training import presets

OPTIONS = ("fold", "seed", "freeze", "freeze_parse", "protocol", "folds")
PROTOCOLS = ("sep2023", "feb2023")


@dataclasses.dataclass(frozen=True)
class Target:
    """What one Revisiting target adds to the shared protocol.

    Attributes:
      name: the target and its dataset key (``$MEDTRANSFER_DATA/<name>``).
      image_size_sep2023, image_size_feb2023: the fine-tuning size under each protocol.
        Sep-2023: the size ``AUC.py`` evaluates at. Feb-2023: ``base_AUC.py`` and
        ``prediction_similarity.py``'s size (``fine-tuning.py`` took it as a flag that was
        not recorded, and a Keras model built for one size is evaluated at that size).
      hflip: the ImageDataGenerator's horizontal flip (all targets but chest).
      cca_image_size: ``CCA.py``'s stimulus size, whatever the fine-tuning size.
      fold_csvs: the task folder of the paper's fold CSVs (default: ``name``).
      split_by_image: the paper split this target by image, not patient (or lesion).
        Only ``folds=kfold`` reads it: no grouping (``data.group_split``), and the held-out
        fifth divided as make_dataframe.py did, StratifiedKFold(5) for those (val 20 % of
        it), GroupKFold(4) otherwise (25 %).
    """
    name: str
    image_size_sep2023: int
    image_size_feb2023: int
    hflip: bool
    cca_image_size: int
    fold_csvs: Optional[str] = None
    split_by_image: bool = False


def config(target: Target, arg: Optional[str], where: str) -> ml_collections.ConfigDict:
    """The run config of ``target`` for the argument ``arg`` (``where``: the target's file,
    named in errors). Raises ValueError for an unknown option, source or value."""
    source, opts = presets.parse_arg(arg, OPTIONS, where=where)
    protocol = opts.get("protocol", "sep2023")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; choose sep2023 or feb2023")
    sep = protocol == "sep2023"
    c = presets.base_config()
    c.study, c.target, c.protocol = "revisiting", target.name, protocol
    c.seed = presets.number_option(opts, "seed", 0)

    # ---- data
    c.data.name = target.name
    c.data.root = presets.data_root(target.name)
    c.data.image_size = target.image_size_sep2023 if sep else target.image_size_feb2023
    c.data.resize_method = "nearest"          # Keras flow_from_dataframe / load_img default
    presets.keras_augment(c, hflip=target.hflip)
    c.data.cache = "device"   # decoded once; augmented in the jitted step
    c.data.fold = presets.number_option(opts, "fold", 0)
    c.data.folds = opts.get("folds", "paper")
    c.data.fold_csv_dir, c.data.fold_csv_origin = presets.paper_csvs(
        protocol, target.fold_csvs or target.name)
    # Feb-2023: 5 folds of train/val only; the 20 % val fold both picks the checkpoint
    # and gives the reported AUC (no separate test). Sep-2023: val / test of the held-out
    # fifth, 1/5 by image (breast, isic, pcam), 1/4 by patient (the paper's CSVs say the
    # same: breast val 31 / test 125; this field is read by folds=kfold only).
    c.data.heldout_val_fraction = (0.2 if target.split_by_image else 0.25) if sep else 1.0
    c.data.group_split = not target.split_by_image

    # ---- model: Keras ResNet50 (include_top=False, avg pool) -> Dropout 0.5 -> softmax;
    # caffe preprocess_input for every source (no 1/255 in this study); the random
    # baseline is a plain Keras ResNet50 with its own head (no dropout).
    presets.apply_source(c, source, preprocessing="caffe", random_dropout=0.0)
    # Feb-2023 fine-tuning.py: `if class_mode == "binary": Dense(1, activation="sigmoid")`
    # with BinaryCrossentropy (chest, breast, thyroid, mammograms, pcam); the Sep-2023 head
    # is Dense(K, softmax) for every target.
    c.model.head = "softmax" if sep else "sigmoid_binary"

    # ---- training: Adam; best checkpoint by val loss; early stopping on val loss.
    if sep:
        c.train.lr, c.train.batch_size, c.train.num_epochs = 1e-3, 256, 30
        c.eval.patience = 30
    else:
        c.train.lr, c.train.batch_size, c.train.num_epochs = 1e-5, 128, 200
        c.eval.patience = 3
    c.eval.monitor = "loss"
    c.eval.batch_size = c.train.batch_size
    # fine-tuning.py: steps_per_epoch = len(train) / batch_size, a float: Keras runs
    # ceil(N/B) steps, the last a partial batch (thyroid, 384 images at 256: 2 updates an
    # epoch, not 1).
    c.train.epoch_steps = "ceil"
    _freeze(c, opts, sep)

    # ---- reported metric: Sep AUC.py = keras.metrics.AUC() on one-hot x softmax (micro,
    # 200 thresholds); Feb base_AUC.py = sklearn roc_auc_score (binary; OVR weighted).
    c.eval.reported_auc = "auc_keras" if sep else "auc_ovr_weighted"

    # ---- analyses (read by the CCA / prediction-similarity stages): CCA.py fed caffe
    # inputs to every model at the target's CCA size, on a validation-fold CSV (which fold
    # the published run read is not recorded: the run's own val fold is used).
    c.analysis = presets.analysis_defaults(cca_image_size=target.cca_image_size,
                                           similarity_mode="corrected" if sep else "paper")
    return c


def _freeze(c: ml_collections.ConfigDict, opts: dict, sep: bool) -> None:
    """The ``freeze`` option: a head phase on a frozen base (Adam() default lr 1e-3, early
    stop on val accuracy, patience 10 in Sep-2023 and 2 in Feb-2023), then the whole
    network at the fine-tune lr."""
    freeze_parse = opts.get("freeze_parse", "strict")
    if freeze_parse not in ("strict", "argparse"):
        raise ValueError(f"freeze_parse={freeze_parse!r}; choose strict or argparse")
    c.train.freeze_parse = freeze_parse
    if "freeze" not in opts or not presets.parse_bool(opts["freeze"],
                                                       freeze_parse == "argparse"):
        return
    if c.model.init == "random":
        raise ValueError("freeze=true needs a pre-trained source (imagenet/radimagenet)")
    c.train.freeze = "two_phase"
    c.train.head_phase.lr = 1e-3
    # The paper gave both phases the same epochs: a derived reference, so
    # --config.train.num_epochs sets both (a copy kept the head phase at 30 when a user
    # shortened the run) and --config.train.head_phase.num_epochs sets only the head's.
    c.train.head_phase.num_epochs = c.train.get_ref("num_epochs").identity()
    c.train.head_phase.monitor = "accuracy"
    c.train.head_phase.patience = 10 if sep else 2
