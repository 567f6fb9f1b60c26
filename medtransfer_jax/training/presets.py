"""The shared base of every training config, and the helpers the protocol files use.

Each paper's protocol is written once (:mod:`.revisiting_protocol`,
:mod:`.source_matters_protocol`); the user-facing ``configs/revisiting/<target>.py`` and
``configs/source_matters/<kind>.py`` add what is each target's own. Their argument is a
comma-separated string after the file name,
``--config=configs/revisiting/breast.py:imagenet,fold=1,freeze=true``: a bare word is the
source (``imagenet`` | ``radimagenet`` | ``random``); ``key=value`` pairs set protocol
options (``fold`` is 0-based: fold=0 is the paper's ``*_fold1.csv``).

Weights, data and the papers' fold CSVs default to environment variables so one config
works on a laptop, a GPU box and a TPU VM:

* ``MEDTRANSFER_WEIGHTS`` (default ``~/medtransfer_weights``): converted source weights,
  ``<root>/imagenet`` and ``<root>/radimagenet`` (made by ``medtransfer_jax.convert``);
* ``MEDTRANSFER_DATA`` (default ``~/medtransfer_data``): ``<root>/<dataset key>``;
* ``MEDTRANSFER_FOLD_CSVS`` (default ``~/medtransfer_data/revisiting-transfer/data``): the
  Revisiting repo's ``data/`` folder at its Sep-2023 head (train/val/test per fold);
  ``MEDTRANSFER_FOLD_CSVS_FEB2023`` the same folder at commit 7bf4356 (train/val only);
  ``MEDTRANSFER_SM_FOLD_CSVS`` (default ``~/medtransfer_data/source-matters/data``): the
  Source Matters repo's ``data/`` folder.
Any field can still be overridden on the command line (``--config.model.init=/path``).
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Optional, Tuple

import ml_collections

from medtransfer_jax import configs
from medtransfer_jax.configs import base as config_base

# The run schema lives in medtransfer_jax.configs.base; the config files build on these.
base_config, demo_config = config_base.base_config, config_base.demo_config

SOURCES = ("imagenet", "radimagenet", "random")

#: The seven Revisiting targets (one file each in configs/revisiting/).
REVISITING_TARGETS = ("chest", "breast", "thyroid", "mammograms", "knee", "isic", "pcam")

#: The Source Matters confounders (one file each in configs/source_matters/).
CONFOUNDERS = ("tag", "lowpass", "noise", "sampled")
CONFOUNDER_PS = (0.0, 0.1, 0.2, 0.5, 0.8, 1.0)

#: Where each paper's fold CSVs come from: env var, default folder, origin (for errors).
PAPER_CSVS = {
    "sep2023": ("MEDTRANSFER_FOLD_CSVS", "~/medtransfer_data/revisiting-transfer/data",
                "https://github.com/DovileDo/revisiting-transfer (HEAD, Sep 2023: "
                "train/val/test_fold1..5.csv), data/{task}/: clone it and set "
                "MEDTRANSFER_FOLD_CSVS=<clone>/data"),
    "feb2023": ("MEDTRANSFER_FOLD_CSVS_FEB2023",
                "~/medtransfer_data/revisiting-transfer-feb2023/data",
                "https://github.com/DovileDo/revisiting-transfer at commit 7bf4356 (Feb 2023: "
                "train/val_fold1..5.csv), data/{task}/: clone it, check out 7bf4356 and set "
                "MEDTRANSFER_FOLD_CSVS_FEB2023=<clone>/data"),
    "source_matters": ("MEDTRANSFER_SM_FOLD_CSVS", "~/medtransfer_data/source-matters/data",
                       "https://github.com/DovileDo/source-matters, data/{task}/: clone it and "
                       "set MEDTRANSFER_SM_FOLD_CSVS=<clone>/data"),
}


def parse_arg(arg: Optional[str], known: Iterable[str] = (),
              where: str = "the config") -> Tuple[Optional[str], Dict[str, str]]:
    """'imagenet,fold=1,freeze=true' -> ('imagenet', {'fold': '1', 'freeze': 'true'}).

    ``known``: the option names the config file accepts; any other raises a ValueError
    naming ``where`` and the known ones (a typo must not silently run the default).
    """
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
    unknown = sorted(set(opts) - set(known))
    if known and unknown:
        raise ValueError(f"unknown option(s) {unknown} for {where}; known: {sorted(known)}")
    return source, opts



def number_option(opts: Dict[str, str], name: str, default, kind=int):
    """``opts[name]`` as ``kind`` (int or float), else ``default``; a ValueError naming the
    option for a value that is not one (``fold=x``)."""
    if name not in opts:
        return default
    try:
        return kind(opts[name])
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name}={opts[name]!r} is not {what}") from None

def parse_bool(v: str, argparse_bool: bool = False) -> bool:
    """A config-argument boolean. ``argparse_bool=True`` reproduces ``argparse``'s
    ``type=bool`` of the Revisiting scripts: every non-empty string, 'False' included, is
    True (only an empty value is False)."""
    if argparse_bool:
        return bool(str(v))
    if str(v).lower() in ("1", "true", "yes", "y", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "n", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {v!r}")


def env_path(var: str, default: str) -> str:
    """``$var`` (or ``default``) with ``~`` expanded."""
    return os.path.expanduser(os.environ.get(var, default))


def data_root(dataset: str) -> str:
    """``$MEDTRANSFER_DATA/<dataset>``: where the dataset's manual download lives."""
    return os.path.join(env_path("MEDTRANSFER_DATA", "~/medtransfer_data"), dataset)


def paper_csvs(which: str, task: str) -> Tuple[str, str]:
    """(folder, origin) of a paper's fold CSVs for ``task`` (``which``: a PAPER_CSVS key)."""
    var, default, origin = PAPER_CSVS[which]
    return os.path.join(env_path(var, default), task), origin.format(task=task)



def percent_folder(prefix: str, node: ml_collections.ConfigDict, field: str):
    """``prefix + str(round(100 * node.field))`` as a lazy reference: the folder follows the
    field when an override changes it later (``--config.data.confounder.p=0.2`` gives
    ``..._20``), where an f-string would keep the value the config file saw."""
    percent = (node.get_ref(field) * 100 + 0.5).to_int()
    return prefix + percent.to_str()

def apply_source(c: ml_collections.ConfigDict, source: Optional[str], preprocessing: str,
                 random_dropout: float) -> None:
    """Sets ``c.source``, ``model.init`` (``$MEDTRANSFER_WEIGHTS/<source>`` or 'random'),
    ``model.preprocessing`` and, for random init, ``model.dropout_rate``."""
    source = source or "imagenet"
    if source not in SOURCES:
        raise ValueError(f"source {source!r} is not one of {SOURCES} (the bare word of the "
                         "config argument, e.g. configs/revisiting/breast.py:imagenet)")
    weights_root = env_path("MEDTRANSFER_WEIGHTS", "~/medtransfer_weights")
    c.model.init = "random" if source == "random" else os.path.join(weights_root, source)
    c.model.preprocessing = preprocessing
    if source == "random":
        c.model.dropout_rate = random_dropout
    c.source = source


def keras_augment(c: ml_collections.ConfigDict, hflip: bool) -> None:
    """Both studies' ``ImageDataGenerator``: rotation 10, shifts/shear/zoom 0.1, fill
    'nearest', horizontal flip as given (Revisiting: all but chest; Source Matters: none)."""
    a = c.data.augment
    a.enabled, a.flip, a.vflip = True, hflip, False
    a.rotation_deg, a.shift, a.shear, a.zoom, a.crop = 10.0, 0.1, 0.1, 0.1, 0.0
    a.fill = "nearest"


def analysis_defaults(cca_image_size: int, similarity_mode: str = "corrected",
                      cca_stimulus: str = "val") -> ml_collections.ConfigDict:
    """How the analyses of a run read it (the CCA and prediction-similarity stages).

    ``cca_image_size``: stimulus size (Revisiting CCA.py: 224 for breast/mammograms/thyroid,
    96 pcam, else 112, whatever the fine-tuning size); ``cca_preprocessing``: 'caffe' for
    every model, RadImageNet included, as CCA.py did; ``cca_stimulus``: the split whose
    images are the stimuli ('val': CCA.py read a validation-fold CSV; which fold the
    published run read is not recorded, so the run's own); ``similarity_mode``:
    analysis.predictions' 'corrected' (test split, both accuracies, macro AUC) or 'paper'
    (the published similarity.csv: val fold, acc_A twice, weighted-OVR AUC).
    """
    a = ml_collections.ConfigDict()
    a.cca_image_size = int(cca_image_size)
    a.cca_preprocessing = "caffe"
    a.cca_stimulus = cca_stimulus
    a.similarity_mode = similarity_mode
    return a


def tiny_config(overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Test-sized run: ResNet18 width 8, 32 px synthetic images, batch 16; ``overrides``
    are ``'train.lr=0.01'`` items (configs.override)."""
    c = demo_config()
    c.data.image_size = 32
    c.data.synthetic.num_examples = 160
    c.model.width = 8
    c.train.batch_size = 16
    c.train.num_epochs = 1
    c.train.warmup_steps = 0
    c.train.schedule = "constant"
    c.eval.batch_size = 32
    c.log.every_steps = 2
    c.checkpoint.async_save = False
    c.data.cache = "none"             # the tests exercise the file pipeline
    return configs.override(c, overrides)
