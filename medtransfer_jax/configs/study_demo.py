"""Embedded default study: the whole chain on synthetic data in ~10 minutes on 2 CPU cores.

Two "sources" stand in for ImageNet and RadImageNet: a ResNet18 (width 8) pre-trained
briefly on coloured natural-like textures (``natural``) and one pre-trained on a
4-class grey lesion task (``medical``); plus a seeded random init. Each is fine-tuned
on a different synthetic lesion target (2 folds), with and without a tag confounder
(the letter 'R' on a fraction p of the positives in training, on every negative in the
o.o.d. test), then compared layer by layer, by predictions and by filters.

    python -m medtransfer_jax.study --workdir=/tmp/study_demo
"""
import ml_collections

from medtransfer_jax import configs
from medtransfer_jax.configs import study_options

# The embedded demo run, resolved inside the installed package (works from any directory).
TRAIN = configs.path("demo")

# Every run (pre-training and fine-tuning) is small: 32 px, ResNet18 width 8.
COMMON = [
    "data.image_size=32", "data.synthetic.image_size=32", "train.batch_size=32",
    "eval.batch_size=64", "log.every_steps=50", "train.warmup_steps=10",
]


def get_config(arg=None):
    if arg:  # a misspelled argument must not silently give the default
        raise ValueError(f"study_demo.py takes no argument, got {arg!r}; override fields with "
                         "--config.FIELD=VALUE instead")
    c = ml_collections.ConfigDict()
    c.name = "demo"
    c.folds = (0, 1)   # a tuple: settable by flag, --config.folds="(0,)"
    c.model = ml_collections.ConfigDict(dict(depth=18, width=8, layout="keras_v1"))

    c.sources = ml_collections.ConfigDict()
    c.sources.natural = ml_collections.ConfigDict(dict(
        kind="pretrain", config=TRAIN,
        about="pre-trained here for 4 epochs on coloured natural-like textures (the "
              "stand-in for ImageNet), from a random initialisation",
        overrides=COMMON + ["data.synthetic.task=natural", "data.synthetic.num_classes=4",
                            "data.synthetic.num_examples=768", "data.synthetic.seed=11",
                            "train.num_epochs=4", "model.preprocessing=unit"]))
    c.sources.medical = ml_collections.ConfigDict(dict(
        kind="pretrain", config=TRAIN,
        about="pre-trained here for 4 epochs on a 4-class grey lesion task (the stand-in "
              "for RadImageNet), from the same random initialisation as natural: their "
              "stems differ only by what 4 epochs changed",
        overrides=COMMON + ["data.synthetic.task=lesion", "data.synthetic.num_classes=4",
                            "data.synthetic.num_examples=768", "data.synthetic.seed=12",
                            "train.num_epochs=4", "model.preprocessing=unit"]))
    c.sources.random = ml_collections.ConfigDict(dict(kind="random", seed=0,
                                                      preprocessing="unit"))

    c.targets = ml_collections.ConfigDict()
    c.targets.lesion = ml_collections.ConfigDict(dict(
        config=TRAIN,
        overrides=COMMON + ["data.synthetic.task=lesion", "data.synthetic.num_classes=2",
                            "data.synthetic.num_examples=384", "data.synthetic.seed=21",
                            "data.synthetic.contrast=0.3", "train.num_epochs=4",
                            "train.lr=0.001"]))
    # Source Matters-style robustness: tag on p of the positives.
    c.confounders = [ml_collections.ConfigDict(dict(kind="tag", ps=[0.5, 1.0]))]

    # every analysis option at its default (configs/study_options.py), so any can be set
    # from the command line (--config.analysis.fold_plot=box)
    c.analysis = study_options.analysis_defaults()
    c.analysis.cca = ml_collections.ConfigDict(dict(
        methods=["paper_cca", "linear_cka"], spatial="positions", positions=2000,
        num_channels=16, repeats=2, seed=0, num_images=128))
    # Layer x layer maps (every block output against every other) of each source before
    # vs after fine-tuning, first fold: studies/analyses.layer_maps.
    c.analysis.layer_maps = ml_collections.ConfigDict(dict(
        comparisons=["pre_vs_finetuned"], methods=["linear_cka", "debiased_cka"],
        num_images=64, spatial="pool", folds=[0]))
    study_options.flag_ready(c.analysis)   # list options settable by flag
    return c
