"""The Source Matters study (Juodelyte et al. 2024): shortcut robustness of ImageNet vs
RadImageNet vs random init under four confounders.

    python -m medtransfer_jax.study --config=configs/study_source_matters.py --workdir=DIR
    ... --config=configs/study_source_matters.py:confounders=tag,ps=0,1.0,folds=0,1

Arguments: ``confounders`` (tag, lowpass, noise and sampled, all on NIH ChestX-ray14 by
default; ``noise_dataset=lidc`` moves noise to LIDC-IDRI; default all four), ``ps``
(fraction of positive training images with the artefact; default 0, 0.1, 0.2, 0.5, 0.8,
1.0), ``folds`` (default 0-4), ``nih`` and ``lidc`` (dataset roots; default
$MEDTRANSFER_DATA/<dataset>), ``imagenet`` and ``radimagenet`` (Keras ``.h5`` files,
converted once).

Per confounder, source, p and fold one run (4 x 3 x 6 x 5 = 360 runs); every run is
tested i.i.d. (artefact as in training), clean and o.o.d. (artefact on every negative).
The report tests ImageNet vs RadImageNet per p and test set with the paper's
permutation t-test and compares ImageNet's o.o.d. AUC with the published values.
"""
import os

import ml_collections

from medtransfer_jax.configs import study_options
from medtransfer_jax.studies import study_args
from medtransfer_jax.training import presets

HERE = os.path.dirname(os.path.abspath(__file__))
KNOWN = dict(confounders=None, ps=None, folds=None, nih=None, lidc=None, imagenet=None,
             radimagenet=None, noise_dataset=None)
CONFIG, EXAMPLE = "configs/study_source_matters.py", "confounders=tag,ps=0,1.0,folds=0,1"


def get_config(arg=None):
    args = study_args.parse(arg, KNOWN, CONFIG, EXAMPLE)
    kinds = args.get("confounders") or list(presets.CONFOUNDERS)
    bad = [k for k in kinds if k not in presets.CONFOUNDERS]
    if bad:
        raise ValueError(f"configs/study_source_matters.py: confounders {bad} unknown; choose "
                         f"from {sorted(presets.CONFOUNDERS)}")
    data = presets.env_path("MEDTRANSFER_DATA", "~/medtransfer_data")
    roots = {"nih_cxr14": study_args.one(args, "nih", os.path.join(data, "nih_cxr14")),
             "lidc": study_args.one(args, "lidc", os.path.join(data, "lidc"))}
    weights = presets.env_path("MEDTRANSFER_WEIGHTS", "~/medtransfer_weights")
    ps = [float(p) for p in args.get("ps") or presets.CONFOUNDER_PS]

    c = ml_collections.ConfigDict()
    c.name = "source-matters"
    c.args = study_args.describe(CONFIG, KNOWN, EXAMPLE)
    c.published = "source_matters"
    c.folds = tuple(int(f) for f in args.get("folds") or range(5))
    c.model = ml_collections.ConfigDict(dict(depth=50, width=64, layout="keras_v1"))
    c.sources = ml_collections.ConfigDict()
    for name, default in (("imagenet", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                          ("radimagenet", "RadImageNet-ResNet50_notop.h5")):
        c.sources[name] = dict(kind="convert", format="keras_h5", arg=name, study_arg=name,
                               input=study_args.one(args, name, os.path.join(weights, default)))
    c.sources.random = dict(kind="random", seed=0, arg="random", preprocessing="caffe")

    c.targets = ml_collections.ConfigDict()
    for kind in kinds:
        # Every confounder runs on the chest X-rays (the papers' code); the noise experiment
        # can move to LIDC-IDRI with noise_dataset=lidc (no paper code exists for it).
        dataset = (study_args.one(args, "noise_dataset", "nih_cxr14") if kind == "noise"
                   else "nih_cxr14")
        c.targets[kind] = dict(
            config=os.path.join(HERE, "source_matters", f"{kind}.py") + f":dataset={dataset}",
            overrides=[f"data.root={roots[dataset]}"], clean=False,
            from_args=dict(root={"nih_cxr14": "nih"}.get(dataset, dataset)),
            confounders=[ml_collections.ConfigDict(dict(kind=kind, ps=ps))])
    c.confounders = []
    c.analysis = study_options.analysis_defaults()
    c.analysis.auc_metric = "auc_keras"          # the notebooks' Keras AUC()
    c.analysis.compare_sources = ["imagenet", "radimagenet"]
    # statistical_tests.ipynb tests ImageNet vs RadImageNet on the o.o.d. AUCs only; the
    # i.i.d. and clean tests can be added (more comparisons, none corrected for multiplicity)
    c.analysis.robustness_test_sets = ["ood"]
    # results_plots.ipynb draws seaborn's default band: the 95 % bootstrap CI of the mean
    c.analysis.robustness_errorbar = "ci95"
    c.analysis.cca = ml_collections.ConfigDict(dict(methods=["paper_cca"], spatial="positions",
                                                    positions=10000, num_channels=64,
                                                    repeats=5, seed=0, num_images=2000))
    study_options.flag_ready(c.analysis)   # list options settable by flag
    return c
