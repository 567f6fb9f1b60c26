"""The Gavrikov & Keuper 3x3 filter analyses over any list of weight files (no training).

    python -m medtransfer_jax.study --workdir=DIR \
        --config=configs/study_filters.py:weights=~/w/imagenet.h5,~/w/RadImageNet-ResNet50_notop.h5

Arguments: ``weights`` (Keras ``.h5`` files, torchvision ``.pth`` files or converted
weights dirs; each becomes a model named after its file), ``groups`` (optional
``NAME:model1+model2`` items pooled before comparing). Per depth bin (CNN-Filter-DB's
(a, b] bins), one PCA basis over all filters, 70-bin histograms over one range, the
explained-variance-weighted symmetric KL between every two models, with a noise floor;
per layer sparsity and variance entropy.
"""
import os

import ml_collections

from medtransfer_jax.configs import study_options
from medtransfer_jax.studies import study_args

KNOWN = dict(weights=None, groups=None)
CONFIG, EXAMPLE = "configs/study_filters.py", "weights=~/w/imagenet.h5,~/w/b.pth"


def _source(path: str) -> dict:
    if os.path.isdir(path):
        return dict(kind="weights", path=path)
    fmt = "torchvision" if path.endswith((".pth", ".pt")) else "keras_h5"
    return dict(kind="convert", format=fmt, input=path)


def get_config(arg=None):
    args = study_args.parse(arg, KNOWN, CONFIG, EXAMPLE)
    paths = [os.path.expanduser(p) for p in args.get("weights", [])]
    if not paths:
        raise ValueError("configs/study_filters.py: give weights=FILE[,FILE...] (Keras .h5, "
                         "torchvision .pth or converted weights dirs).")
    c = ml_collections.ConfigDict()
    c.name = "filters"
    c.args = study_args.describe(CONFIG, KNOWN, EXAMPLE)
    c.folds = (0,)
    c.model = ml_collections.ConfigDict(dict(depth=50, width=64, layout="keras_v1"))
    c.sources = ml_collections.ConfigDict()
    for p in paths:
        name = os.path.basename(p.rstrip("/")).split(".")[0].replace("-", "_")
        c.sources[name] = dict(_source(p), study_arg="weights")
    c.targets = ml_collections.ConfigDict()
    c.analysis = study_options.analysis_defaults()
    groups = {}
    for g in args.get("groups", []):
        name, _, members = g.partition(":")
        groups[name] = members.split("+")
    c.analysis.filters.groups = groups
    study_options.flag_ready(c.analysis)   # list options settable by flag
    return c
