"""The Revisiting study (Juodelyte et al.), whole: 7 targets x 5 sources x 5 folds = 175 runs.

    python -m medtransfer_jax.study --config=configs/study_revisiting.py --workdir=DIR
    python -m medtransfer_jax.study --workdir=DIR \
        --config=configs/study_revisiting.py:targets=breast,thyroid,folds=0,1,data=/data

Arguments (``key=value``, lists comma-separated): ``targets`` (chest, breast, thyroid,
mammograms, knee, isic, pcam), ``folds`` (0-based, default 0-4), ``data`` (a folder with
one sub-folder per target; default $MEDTRANSFER_DATA or ~/medtransfer_data), ``imagenet``
and ``radimagenet`` (the Keras ``.h5`` files, converted once into the study workdir;
defaults under $MEDTRANSFER_WEIGHTS or ~/medtransfer_weights), ``fold_csvs`` (the paper
repo's ``data/`` folder: its per-fold CSVs define the splits), ``protocol`` (sep2023
default | feb2023), ``freeze`` (both default | no: drop the frozen-first variants).

Sources as the paper: ImageNet and RadImageNet fine-tuned end to end and "frozen first"
(head trained on the frozen base, then everything), and a random init. CCA as the paper:
mean CCA on the five stage outputs, ~10,000 positions per layer, 64 shared channels, 5
repeats; pairs pre vs fine-tuned per source, ImageNet vs RadImageNet before and after
fine-tuning (with and without freezing), random vs random; plus prediction similarity and
AUC gain vs CCA. The report compares with the paper's published tables under
``protocol=feb2023``, the scripts that made them (results/ predates src/AUC.py: its AUC is
sklearn's on the val fold = ``auc_ovr_weighted``); a sep2023 study says so instead.
"""
import os

import ml_collections

from medtransfer_jax.configs import study_options
from medtransfer_jax.studies import study_args
from medtransfer_jax.training import presets

HERE = os.path.dirname(os.path.abspath(__file__))
KNOWN = dict(targets=None, folds=None, data=None, imagenet=None, radimagenet=None,
             fold_csvs=None, protocol=None, freeze=None)
CONFIG, EXAMPLE = "configs/study_revisiting.py", "targets=breast,thyroid,folds=0,1"


def get_config(arg=None):
    args = study_args.parse(arg, KNOWN, CONFIG, EXAMPLE)
    targets = args.get("targets") or list(presets.REVISITING_TARGETS)
    bad = [t for t in targets if t not in presets.REVISITING_TARGETS]
    if bad:
        raise ValueError(f"configs/study_revisiting.py: targets {bad} unknown; choose from "
                         f"{sorted(presets.REVISITING_TARGETS)}")
    data = study_args.one(args, "data", presets.env_path("MEDTRANSFER_DATA", "~/medtransfer_data"))
    weights = presets.env_path("MEDTRANSFER_WEIGHTS", "~/medtransfer_weights")
    protocol = study_args.one(args, "protocol", "sep2023")
    fold_csvs = study_args.one(args, "fold_csvs", "")
    freeze = study_args.one(args, "freeze", "both")
    if freeze not in ("both", "no"):
        raise ValueError(f"configs/study_revisiting.py: freeze={freeze!r}; choose both (the "
                         "five sources of the paper: the pre-trained ones also frozen-first) "
                         "or no (imagenet, radimagenet, random)")

    c = ml_collections.ConfigDict()
    c.name = f"revisiting-{protocol}"
    c.args = study_args.describe(CONFIG, KNOWN, EXAMPLE)
    # The paper's published tables (results/) come from the Feb-2023 scripts: the report
    # compares a feb2023 study with them and says why a sep2023 one has nothing to compare.
    c.published, c.protocol = "revisiting", protocol
    c.folds = tuple(int(f) for f in args.get("folds") or range(5))
    c.model = ml_collections.ConfigDict(dict(depth=50, width=64, layout="keras_v1"))

    c.sources = ml_collections.ConfigDict()
    for name, default in (("imagenet", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                          ("radimagenet", "RadImageNet-ResNet50_notop.h5")):
        c.sources[name] = dict(kind="convert", format="keras_h5", arg=name, study_arg=name,
                               input=study_args.one(args, name, os.path.join(weights, default)))
        if freeze == "both":
            c.sources[f"{name}_frz"] = dict(weights_of=name, arg=f"{name},freeze=true")
    # One seeded init for every target and fold, as the paper: fine-tuning.py and CCA.py
    # import io_fun/data_import.py, which calls tf.random.set_seed(2), so under TF 2.8
    # every process drew the same ResNet50(weights=None) (and CCA.py's second random
    # model, in the same process, another: this study's random twin).
    c.sources.random = dict(kind="random", seed=0, arg="random", preprocessing="caffe")

    c.targets = ml_collections.ConfigDict()
    for t in targets:
        csv_task = {"pcam": "pcam-small"}.get(t, t)   # the paper repo's data/<task> folder
        overrides = [f"data.root={os.path.join(data, t)}"]
        if fold_csvs:
            overrides.append(f"data.fold_csv_dir={os.path.join(fold_csvs, csv_task)}")
        c.targets[t] = dict(config=os.path.join(HERE, "revisiting", f"{t}.py")
                            + f":protocol={protocol}", overrides=overrides,
                            from_args=dict(root=f"data/{t}", fold_csv_dir=f"fold_csvs/{csv_task}"))
    c.confounders = []

    c.analysis = study_options.analysis_defaults()
    # The protocol's reported AUC (its eval.reported_auc): Sep-2023 Keras AUC(), Feb-2023
    # sklearn roc_auc_score (one-vs-rest weighted for isic and knee).
    c.analysis.auc_metric = "auc_keras" if protocol == "sep2023" else "auc_ovr_weighted"
    c.analysis.bootstrap = 1000
    c.analysis.cca = ml_collections.ConfigDict(dict(
        methods=["paper_cca"], spatial="positions", positions=10000, num_channels=64,
        repeats=5, seed=0, num_images=2000, random_vs_random=True,
        between=[["imagenet", "radimagenet"]] + (
            [["imagenet_frz", "radimagenet_frz"]] if "imagenet_frz" in c.sources else []),
        # the rest of results/CCA_<task>.csv: each source vs random init, each fine-tuned
        # source vs random init, and freezeFalse vs freezeTrue after fine-tuning
        pairs=[[s, "pre", "random", "pre"] for s in ("imagenet", "radimagenet")]
        + [[s, "fine-tuned", "random", "pre"] for s in ("imagenet", "radimagenet")]
        + ([[s, "fine-tuned", f"{s}_frz", "fine-tuned"] for s in ("imagenet", "radimagenet")]
           if "imagenet_frz" in c.sources else [])))
    # AUC_plot.py and similarity_plot.py draw seaborn boxplots of the 5 folds
    c.analysis.fold_plot = "box"
    study_options.flag_ready(c.analysis)   # list options settable by flag
    return c
