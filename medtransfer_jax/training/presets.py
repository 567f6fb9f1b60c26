"""Config builders: shared defaults, the demo, and the studies' experiment protocols.

The files in ``configs/`` are thin wrappers around these functions so the protocols
live in one importable, testable place (the study runner and the sweep call them too).

Arguments of the study configs come as a comma-separated string after the file name,
``--config=configs/revisiting/breast.py:imagenet,fold=1,freeze=true``: a bare word is the
source (``imagenet`` | ``radimagenet`` | ``random``); ``key=value`` pairs set protocol
options (``fold`` is 0-based: fold=0 is the paper's ``*_fold1.csv``).

Weights and data locations default to environment variables so one config works on a
laptop, a GPU box and a TPU VM:

* ``MEDTRANSFER_WEIGHTS`` (default ``~/medtransfer_weights``): converted source weights,
  ``<root>/imagenet`` and ``<root>/radimagenet`` (made by ``medtransfer_jax.convert``);
* ``MEDTRANSFER_DATA`` (default ``~/medtransfer_data``): ``<root>/<dataset key>``;
* ``MEDTRANSFER_FOLD_CSVS`` (optional): the paper repo's ``data/`` folder; when set
  (or ``folds=paper``), its per-fold CSVs define the splits.
Any field can still be overridden on the command line (``--config.model.init=/path``).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import ml_collections

SOURCES = ("imagenet", "radimagenet", "random")

#: The seven Revisiting targets: dataset key -> (paper CSV folder, image size, h-flip).
REVISITING_TARGETS: Dict[str, Tuple[str, int, bool]] = {
    "chest": ("chest", 112, False),
    "breast": ("breast", 256, True),
    "thyroid": ("thyroid", 256, True),
    "mammograms": ("mammograms", 224, True),
    "knee": ("knee", 112, True),
    "isic": ("isic", 112, True),
    "pcam": ("pcam-small", 96, True),
}

#: Source Matters confounders -> default dataset.
CONFOUNDERS: Dict[str, str] = {"tag": "nih_cxr14", "lowpass": "nih_cxr14", "noise": "lidc",
                               "sampled": "nih_cxr14"}
CONFOUNDER_PS = (0.0, 0.1, 0.2, 0.5, 0.8, 1.0)


def base_config() -> ml_collections.ConfigDict:
    """Shared defaults of every training run (see loop.py for how each field is used)."""
    from medtransfer_jax import data

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.fold = 0                        # 0-based fold passed to data.get_splits
    c.data = data.default_data_config()

    c.model = ml_collections.ConfigDict()
    c.model.init = "random"           # 'random' or a weights directory (medtransfer_jax.convert)
    c.model.depth = 50
    c.model.layout = "keras_v1"
    c.model.width = 64
    c.model.dropout_rate = 0.5        # Dropout before the head, as in both studies
    c.model.dtype = "float32"         # 'bfloat16' = mixed precision (params stay float32)
    # BatchNorm momentum (flax convention); None = the layout's (Keras 0.99). Short runs
    # need a faster average (0.9) or the running statistics lag the weights.
    c.model.bn_momentum = ml_collections.FieldReference(None, field_type=float)
    c.model.preprocessing = ml_collections.FieldReference(None, field_type=str)
    # None: from the weights' metadata ('unit' for random init)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256          # global batch (all devices/hosts)
    c.train.num_epochs = 30
    c.train.num_steps = 0             # > 0 overrides num_epochs
    c.train.optimizer = "adam"        # adam | adamw | sgd
    c.train.lr = 1e-3
    c.train.schedule = "constant"     # constant | cosine | linear (after warmup)
    c.train.warmup_steps = 0
    c.train.end_lr_factor = 0.0
    c.train.momentum = 0.9
    c.train.nesterov = False
    c.train.adam_eps = 1e-7           # Keras' default
    c.train.weight_decay = 0.0
    c.train.grad_clip_norm = 0.0
    c.train.label_smoothing = 0.0
    # Divergence: stop when the mean train loss of a log interval is non-finite or above
    # this factor x ln(num_classes) (the loss of a uniform guess); 0 = only non-finite.
    c.train.max_loss_factor = 100.0
    c.train.freeze = "none"           # none | linear_probe | stage:k | two_phase
    c.train.batch_norm_train = ml_collections.FieldReference(None, field_type=bool)
    c.train.head_phase = ml_collections.ConfigDict()   # two_phase: the frozen-base phase
    c.train.head_phase.lr = 1e-3
    c.train.head_phase.num_epochs = 30
    c.train.head_phase.num_steps = 0
    c.train.head_phase.monitor = "accuracy"
    c.train.head_phase.patience = 10
    c.train.head_phase.min_delta = 0.0

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0            # 0 = once per epoch
    c.eval.batch_size = 256
    c.eval.monitor = "loss"           # loss | auc | accuracy | auc_micro | auc_ovr_weighted ...
    c.eval.patience = 0               # evaluations without improvement; 0 = no early stopping
    c.eval.min_delta = 0.0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 0      # extra saves between evaluations (0 = only at evals)
    c.checkpoint.max_to_keep = 2      # latest N kept, plus the best
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10
    c.log.profile_steps = 0           # > 0: jax.profiler trace of that many steps -> profile/
    c.log.profile_start = 5           # ... starting after this step (past compilation)

    c.sharding = ml_collections.ConfigDict()
    c.sharding.num_devices = 0        # 0 = all devices
    c.sharding.fsdp = False           # shard params/optimizer state over the data axis too
    c.sharding.min_fsdp_size = 2 ** 14
    return c


def demo_config() -> ml_collections.ConfigDict:
    """Synthetic lesion task, ResNet18 width 16 at 64 px: a few minutes on 2 CPU cores."""
    c = base_config()
    c.data.name = "synthetic"
    c.data.image_size = 64
    c.data.synthetic.image_size = 64
    c.data.synthetic.num_examples = 640
    c.data.heldout_val_fraction = 0.5   # 64 val / 64 test images: a less noisy AUC
    c.model.depth = 18
    c.model.width = 16
    c.model.bn_momentum = 0.9
    c.model.preprocessing = "unit"
    c.train.batch_size = 32
    c.train.num_epochs = 12
    c.train.lr = 2e-3
    c.train.schedule = "cosine"
    c.train.warmup_steps = 20
    c.eval.batch_size = 64
    c.eval.monitor = "auc"
    c.eval.patience = 0
    c.log.every_steps = 16
    return c


def parse_arg(arg: Optional[str]) -> Tuple[Optional[str], Dict[str, str]]:
    """'imagenet,fold=1,freeze=true' -> ('imagenet', {'fold': '1', 'freeze': 'true'})."""
    source, opts = None, {}
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            k, v = part.split("=", 1)
            opts[k.strip().lower()] = v.strip()
        elif source is None:
            source = part.lower()
        else:
            raise ValueError(f"config argument {arg!r}: more than one bare word "
                             f"({source!r}, {part!r}); use key=value for options")
    return source, opts


def _bool(v: str) -> bool:
    if str(v).lower() in ("1", "true", "yes", "y", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "n", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {v!r}")


def _env_path(var: str, default: str) -> str:
    return os.path.expanduser(os.environ.get(var, default))


def _apply_source(c, source: str, preprocessing: str, random_dropout: float):
    if source not in SOURCES:
        raise ValueError(f"source {source!r} is not one of {SOURCES} (the bare word of the "
                         "config argument, e.g. configs/revisiting/breast.py:imagenet)")
    weights_root = _env_path("MEDTRANSFER_WEIGHTS", "~/medtransfer_weights")
    c.model.init = "random" if source == "random" else os.path.join(weights_root, source)
    c.model.preprocessing = preprocessing
    if source == "random":
        c.model.dropout_rate = random_dropout
    c.source = source


def revisiting_config(target: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """One Revisiting experiment: target x source x fold (x freeze, protocol).

    Options: ``fold`` (0-based), ``freeze`` (bool: two-phase schedule), ``protocol``
    (``sep2023`` default: Adam 1e-3, batch 256, 30 epochs, patience 30; ``feb2023``: Adam
    1e-5, batch 128, 200 epochs, patience 3), ``seed``, ``folds=paper`` (use the paper's
    fold CSVs from ``$MEDTRANSFER_FOLD_CSVS/<task>``).

    Protocol facts (DovileDo/revisiting-transfer ``src/fine-tuning.py``): caffe
    preprocessing for every source (no 1/255), augmentation rotation 10 / shift 0.1 /
    shear 0.1 / zoom 0.1 / nearest fill, horizontal flip for all but chest; pre-trained
    base -> Dropout 0.5 -> softmax; the random baseline is a plain Keras ResNet50 with its
    own head (no dropout); best checkpoint by val loss; head phase = Adam 1e-3, early
    stop on val accuracy with patience 10.
    """
    if target not in REVISITING_TARGETS:
        raise ValueError(f"Revisiting target {target!r} is not one of {sorted(REVISITING_TARGETS)}")
    source, opts = parse_arg(arg)
    csv_task, size, hflip = REVISITING_TARGETS[target]
    c = base_config()
    c.study = "revisiting"
    c.target = target
    c.data.name = target
    c.data.root = os.path.join(_env_path("MEDTRANSFER_DATA", "~/medtransfer_data"), target)
    c.data.image_size = size
    c.data.augment.flip = hflip
    c.data.augment.rotation_deg = 10.0
    c.data.augment.shift = 0.1
    c.data.augment.shear = 0.1
    c.data.augment.zoom = 0.1
    c.data.augment.fill = "nearest"
    fold_root = os.environ.get("MEDTRANSFER_FOLD_CSVS")
    if opts.pop("folds", "paper" if fold_root else "kfold") == "paper":
        if not fold_root:
            raise ValueError("folds=paper needs MEDTRANSFER_FOLD_CSVS=<revisiting-transfer>/data")
        c.data.fold_csv_dir = os.path.join(os.path.expanduser(fold_root), csv_task)
    _apply_source(c, source or "imagenet", "caffe", random_dropout=0.0)
    c.fold = int(opts.pop("fold", 0))
    c.seed = int(opts.pop("seed", 0))
    protocol = opts.pop("protocol", "sep2023")
    c.protocol = protocol
    if protocol == "sep2023":
        c.train.lr, c.train.batch_size, c.train.num_epochs = 1e-3, 256, 30
        c.eval.patience = 30
    elif protocol == "feb2023":
        c.train.lr, c.train.batch_size, c.train.num_epochs = 1e-5, 128, 200
        c.eval.patience = 3
    else:
        raise ValueError(f"protocol={protocol!r}; choose sep2023 or feb2023")
    c.eval.monitor = "loss"
    c.eval.batch_size = c.train.batch_size
    if _bool(opts.pop("freeze", "false")):
        if c.model.init == "random":
            raise ValueError("freeze=true needs a pre-trained source (imagenet/radimagenet)")
        c.train.freeze = "two_phase"
        c.train.head_phase.lr = 1e-3
        c.train.head_phase.num_epochs = c.train.num_epochs
        c.train.head_phase.monitor = "accuracy"
        c.train.head_phase.patience = 10
    if opts:
        raise ValueError(f"unknown option(s) {sorted(opts)} for configs/revisiting/{target}.py; "
                         "known: fold, seed, freeze, protocol, folds")
    return c


def source_matters_config(kind: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """One Source Matters run: confounder kind x p x source x fold.

    Options: ``p`` (fraction of positive training images with the artefact, default 0.5),
    ``dataset`` (default per kind: tag/lowpass/sampled -> nih_cxr14, noise -> lidc),
    ``fold`` (0-based), ``seed``.

    Protocol (DovileDo/source-matters ``fine-tuning.py``): Adam 1e-3, batch 256, 30
    epochs, early stop on val loss (patience 30), best by val loss; ResNet50 -> Dropout 0.5
    -> softmax for all three sources; caffe preprocessing, plus 1/255 for RadImageNet;
    same augmentation as Revisiting without flips. The image size is not recorded in
    the repo; 224 is used (override ``--config.data.image_size``).
    """
    if kind not in CONFOUNDERS:
        raise ValueError(f"confounder {kind!r} is not one of {sorted(CONFOUNDERS)}")
    source, opts = parse_arg(arg)
    source = source or "imagenet"
    c = base_config()
    c.study = "source_matters"
    c.target = kind
    dataset = opts.pop("dataset", CONFOUNDERS[kind])
    c.data.name = dataset
    c.data.root = os.path.join(_env_path("MEDTRANSFER_DATA", "~/medtransfer_data"), dataset)
    c.data.image_size = 224
    c.data.augment.flip = False
    c.data.augment.rotation_deg = 10.0
    c.data.augment.shift = 0.1
    c.data.augment.shear = 0.1
    c.data.augment.zoom = 0.1
    c.data.confounder.kind = kind
    c.data.confounder.p = float(opts.pop("p", 0.5))
    _apply_source(c, source, "radimagenet" if source == "radimagenet" else "caffe",
                  random_dropout=0.5)
    c.fold = int(opts.pop("fold", 0))
    c.seed = int(opts.pop("seed", 0))
    c.train.lr, c.train.batch_size, c.train.num_epochs = 1e-3, 256, 30
    c.eval.batch_size = 256
    c.eval.monitor = "loss"
    c.eval.patience = 30
    if opts:
        raise ValueError(f"unknown option(s) {sorted(opts)} for configs/source_matters/{kind}.py;"
                         " known: p, dataset, fold, seed")
    return c


def tiny_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Test-sized run: ResNet18 width 8, 32 px synthetic images, batch 16."""
    c = demo_config()
    c.data.image_size = 32
    c.data.synthetic.image_size = 32
    c.data.synthetic.num_examples = 160
    c.model.width = 8
    c.train.batch_size = 16
    c.train.num_epochs = 1
    c.train.warmup_steps = 0
    c.train.schedule = "constant"
    c.eval.batch_size = 32
    c.log.every_steps = 2
    c.checkpoint.async_save = False
    for k, v in overrides.items():
        node = c
        parts = k.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return c
