r"""Post-training analyses: ``python -m medtransfer_jax.analyze WHAT --output_dir=DIR ...``.

WHAT (positional, or ``--what``):

* ``cca`` / ``similarity``: layer-by-layer similarity of two networks (weights dirs) on the
  same images -> similarity.csv/.json/.png. ``--protocol=paper`` (default) is the
  Revisiting CCA (mean CCA, stage outputs, ~10k positions, 64 shared channels, 5 repeats);
  ``--protocol=custom`` uses ``--methods``, ``--layers``, ``--spatial``, ``--streaming``.
  Several pairs: repeat ``--pair=DIR_A,DIR_B[,LABEL]``. Images: ``--images=data`` (the
  data config: ``--dataset``, ``--data_root``, ``--fold``, ``--split``,
  ``--data_override=key=value``; or ``--stimuli_config=RUN_CONFIG.py[:ARG]``: the stimuli
  a run config declares, exactly as the study reads them) or ``--images=random``
  (uniform noise, for smoke tests). The pool: ``analysis/stimuli.py``.
* ``map``: every block output of --weights_a against every block output of --weights_b
  (or of A itself when --weights_b is not given) in one streamed pass -> layer_map.csv/
  .json and one heatmap PNG per method (``--methods``, default mean_cca,svcca,pwcca,
  debiased_cka; ``--spatial=pool`` global average per image, ``positions`` = every
  position of a common grid; ``--channels`` caps channels per layer; ``--layers``).
* ``predictions``: two predictions CSVs -> prediction_similarity.csv/.json/.png
  (``--random_predictions`` adds the relative AUC gain over random init).
* ``weights``: per-layer relative L2 / cosine between two weights dirs -> weight_change.*.
* ``filters``: 3x3 filter distributions of one or more weights dirs
  (``--weights=NAME=DIR`` repeated; ``--groups=GROUP=NAME1,NAME2``) -> filter_layers.csv,
  filter_drift.csv, filters.json, filter_histograms.npz and PNGs.
* ``auc_vs_similarity``: relative AUC gain over random init vs per-layer similarity across
  fine-tuned runs (``--run=SIMILARITY_CSV,RESULTS_JSON,RANDOM_RESULTS_JSON`` repeated) ->
  auc_vs_similarity.csv/.json/.png.

This main only turns flags into the typed tasks of ``studies/tasks.py`` (the functions the
study's stages call too) and runs one; tables are written atomically (``studies/tables``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Sequence, Tuple

from absl import flags, logging

from medtransfer_jax import cli, paths
from medtransfer_jax.errors import UserError

WHATS = ("cca", "similarity", "map", "predictions", "weights", "filters", "auc_vs_similarity")

FLAGS = flags.FLAGS


def _define(kind: str, name: str, default, help_: str, *args):
    """flags.DEFINE_<kind> with allow_override: generic names (output_dir, seed, batch_size)
    may also be defined by another main imported into the same process (a test session);
    overriding avoids a DuplicateFlagError there."""
    fn = getattr(flags, f"DEFINE_{kind}")
    fn(name, default, *args, help_, allow_override=True)


_define("enum", "what", None, "Analysis to run (or give it as the first argument).", WHATS)
_define("string", "output_dir", None, "Directory for CSV/JSON/PNG outputs (created).")
# networks
_define("string", "weights_a", None, "Weights dir of network A (cca/similarity/weights).")
_define("string", "weights_b", None, "Weights dir of network B.")
_define("string", "label_a", None, "Name of A in tables (default: the path).")
_define("string", "label_b", None, "Name of B in tables.")
_define("multi_string", "pair", [], "DIR_A,DIR_B[,LABEL]: a comparison (repeatable).")
_define("enum", "protocol", "paper", "paper: the Revisiting CCA preset; custom: --methods, "
        "--layers, --spatial.", ["paper", "custom"])
_define("list", "methods", None, "Similarity methods, e.g. mean_cca,svcca,pwcca,linear_cka,"
        "rbf_cka,debiased_cka,procrustes,paper_cca (paper protocol: one).")
_define("list", "layers", None, "Keras layer names (default: the five stage outputs).")
_define("enum", "spatial", "positions", "positions: every spatial position a datapoint; "
        "pool: global average.", ["positions", "pool"])
_define("integer", "positions", None, "Target datapoints per layer (paper: 10000).")
_define("integer", "channels", None, "Shared random channel subset (paper: 64; 0 = all).")
_define("integer", "repeats", None, "Independent draws averaged (paper: 5).")
_define("bool", "streaming", False, "custom protocol: all positions of all images via the "
        "streaming covariance / minibatch CKA accumulators.")
_define("integer", "seed", 0, "Seed for image / channel draws.")
_define("integer", "batch_size", 32, "Forward-pass batch size.")
_define("string", "preprocessing", None, "Override both networks' input normalisation.")
# images
_define("enum", "images", "data", "Image source for cca/similarity.", ["data", "random"])
_define("integer", "num_images", 1000, "Size of the image pool drawn from the split.")
_define("integer", "image_size", None, "Resize images to this (default: data config / "
        "weights metadata image_size).")
_define("string", "dataset", None, "Data config name, data.name (default: the config's default).")
flags.DEFINE_alias("data_name", "dataset")  # the flag's name before the vocabulary was unified
_define("string", "data_root", None, "Data config root (manual-download dir).")
_define("integer", "fold", None, "Fold of the data splits (default: the --stimuli_config "
        "run's data.fold, else 0).")
_define("string", "split", None, "Split used as stimulus (train/val/test or an extra test; "
        "default: val for --protocol=paper, the config's protocol with --stimuli_config, "
        "else test).")
_define("enum", "selection", None, "Which images of the split: first (the first N, as the "
        "paper's CCA.py and the study) or random (seeded by --seed). Default: first for "
        "--protocol=paper or --stimuli_config, else random.", ["first", "random"])
_define("string", "resize_method", None, "Resize filter for the stimuli (default: the data "
        "config's data.resize_method).")
_define("string", "stimuli_config", None, "CONFIG.py[:ARG] of a training run (e.g. a study "
        "run's sweep_config.py or configs/revisiting/breast.py:imagenet): its data config and "
        "analysis.cca_* fields (split, size, preprocessing) give the stimuli, exactly as the "
        "study's representations stage reads them.")
_define("multi_string", "data_override", [], "key=value overrides of the data config.")
# predictions
_define("string", "predictions_a", None, "predictions.csv of model A.")
_define("string", "predictions_b", None, "predictions.csv of model B.")
_define("string", "random_predictions", None, "predictions.csv of the random-init model.")
_define("string", "prediction_split", None, "Only rows of this split (default: 'test' when "
        "the files hold several splits, else all rows; --similarity_mode=paper: 'val').")
_define("enum", "similarity_mode", "corrected", "predictions: 'corrected' (both accuracies "
        "in the independent-errors baseline, macro AUC) or 'paper' (the published "
        "similarity.csv: the val split, acc_A twice, weighted one-vs-rest AUC).",
        ["corrected", "paper"])
# weights / filters
_define("bool", "include_batch_stats", False, "weights: include BatchNorm running stats.")
_define("multi_string", "weights", [], "filters: NAME=DIR or DIR (repeatable).")
_define("multi_string", "groups", [], "filters: GROUP=NAME1,NAME2 pooled groups.")
_define("bool", "orthogonality", False, "filters: also compute filter orthogonality.")
# auc_vs_similarity
_define("multi_string", "run", [], "auc_vs_similarity: SIMILARITY_CSV,RESULTS_JSON,"
        "RANDOM_RESULTS_JSON[,SOURCE] for one fine-tuned run (repeatable): its pre-trained-"
        "vs-fine-tuned similarity table, its results.json and the random-init run's; runs "
        "with a SOURCE (imagenet, radimagenet, ...) are fitted per source, as the paper.")
_define("string", "auc_metric", "auc", "auc_vs_similarity: metric key in results.json "
        "(the Revisiting paper: auc_ovr_weighted, with --auc_split=val).")
_define("string", "auc_split", "test", "auc_vs_similarity: results.json section (val/test; "
        "the Revisiting paper: val).")
_define("string", "similarity_method", None, "auc_vs_similarity: method rows to use "
        "(default: the first method in each table).")


class FlagError(UserError):
    """Bad flags: the harness prints 'analyze: error: ...' and exits 2."""


def _fail(msg: str):
    raise FlagError(msg)


# ------------------------------------------------------------------ flags -> stimuli
def _load_stimuli_config():
    """The run config of --stimuli_config with --data_root and --data_override applied to
    its data (the dataset is the run's: a different --dataset is refused)."""
    from medtransfer_jax import configs
    try:
        cfg = configs.load(FLAGS.stimuli_config)
    except UserError as e:
        _fail(f"--stimuli_config={FLAGS.stimuli_config}: {e}")
    if FLAGS.dataset and FLAGS.dataset != cfg.data.name:
        _fail(f"--dataset={FLAGS.dataset} contradicts --stimuli_config, whose run reads "
              f"{cfg.data.name!r}; leave --dataset out")
    if FLAGS.data_root:
        cfg.data.root = FLAGS.data_root
    try:
        configs.override(cfg.data, FLAGS.data_override, flag="data_override")
    except UserError as e:
        _fail(f"--stimuli_config={FLAGS.stimuli_config}: {e}")
    return cfg


def _data_config():
    """The data config of --dataset, --data_root and --data_override."""
    from medtransfer_jax import configs, data
    cfg = data.default_data_config()
    if FLAGS.dataset:
        cfg.name = FLAGS.dataset
    if FLAGS.data_root:
        cfg.root = FLAGS.data_root
    try:
        configs.override(cfg, FLAGS.data_override, flag="data_override")
    except UserError as e:
        _fail(f"{e} (of the data config)")
    return cfg


def stimulus_spec(paper: bool, first_weights: str):
    """(StimulusSpec, the protocol's preprocessing or None) from the image flags.

    --stimuli_config: the run config's protocol (:func:`stimuli.protocol_spec`);
    --protocol=paper: the paper's split (val) and CCA.py size of the dataset; else the
    data config's split 'test' and size. --split/--image_size/--resize_method/--selection
    override any of these.
    """
    from medtransfer_jax.analysis import compare, stimuli
    from medtransfer_jax.weights import checkpoint

    selection = FLAGS.selection or ("first" if paper or FLAGS.stimuli_config else "random")
    if FLAGS.images == "random":
        size = FLAGS.image_size or checkpoint.load_metadata(first_weights).image_size
        return stimuli.StimulusSpec(source="noise", num_images=FLAGS.num_images,
                                    image_size=int(size), seed=FLAGS.seed), None
    preprocessing = None
    if FLAGS.stimuli_config:
        cfg = _load_stimuli_config()
        fold = cfg.data.fold if FLAGS.fold is None else FLAGS.fold   # the run's own fold
        spec = stimuli.protocol_spec(cfg, fold=fold, num_images=FLAGS.num_images)
        preprocessing = stimuli.protocol_of(cfg)["preprocessing"]
    else:
        cfg = _data_config()
        proto = compare.PaperCCAProtocol()
        spec = stimuli.StimulusSpec(
            data=cfg, split=proto.stimulus_split if paper else "test", fold=FLAGS.fold or 0,
            num_images=FLAGS.num_images,
            image_size=compare.paper_image_size(cfg.name) if paper else 0)
        preprocessing = proto.preprocessing if paper else None
    spec = dataclasses.replace(
        spec, split=FLAGS.split or spec.split, image_size=FLAGS.image_size or spec.image_size,
        resize_method=FLAGS.resize_method or spec.resize_method, selection=selection,
        seed=FLAGS.seed)
    return spec, preprocessing


# ------------------------------------------------------------------- flags -> tasks
def _pairs():
    from medtransfer_jax.studies import tasks
    pairs = []
    if FLAGS.weights_a or FLAGS.weights_b:
        if not (FLAGS.weights_a and FLAGS.weights_b):
            _fail("Give both --weights_a and --weights_b (or use --pair=DIR_A,DIR_B).")
        pairs.append(tasks.Pair(FLAGS.weights_a, FLAGS.weights_b, name_a=FLAGS.label_a,
                                name_b=FLAGS.label_b))
    if (FLAGS.label_a or FLAGS.label_b) and not (FLAGS.weights_a or FLAGS.weights_b):
        _fail("--label_a/--label_b name --weights_a/--weights_b; a --pair takes its label as "
              "DIR_A,DIR_B,LABEL.")
    for p in FLAGS.pair:
        parts = p.split(",")
        if len(parts) not in (2, 3):
            _fail(f"--pair={p!r}: expected DIR_A,DIR_B[,LABEL].")
        pairs.append(tasks.Pair(parts[0], parts[1], parts[2] if len(parts) == 3 else None))
    if not pairs:
        _fail("cca/similarity needs --weights_a and --weights_b, or --pair=DIR_A,DIR_B.")
    for p in pairs:
        for d in (p.a, p.b):
            if not os.path.isdir(d):
                _fail(f"Weights directory {d!r} does not exist.")
    return tuple(pairs)


def _methods(default: Sequence[str], need: Optional[str] = None) -> Tuple[str, ...]:
    from medtransfer_jax.analysis import similarity as sim
    try:
        return sim.check_methods(FLAGS.methods or default, need=need, what="--methods")
    except ValueError as e:
        _fail(str(e))


def similarity_task():
    """--protocol=paper: the Revisiting CCA preset (one method); custom: the flags."""
    from medtransfer_jax.analysis import compare
    from medtransfer_jax.studies import tasks

    pairs = _pairs()
    tasks.check_layers([d for p in pairs for d in (p.a, p.b)], FLAGS.layers)
    paper = FLAGS.protocol == "paper"
    stimuli, preprocessing = stimulus_spec(paper, pairs[0].a)
    common = dict(layers=tuple(FLAGS.layers) if FLAGS.layers else None, seed=FLAGS.seed,
                  batch_size=FLAGS.batch_size,
                  preprocessing=FLAGS.preprocessing or preprocessing)
    if paper:
        for name in ("spatial", "streaming"):   # the preset fixes them
            if FLAGS[name].present:
                _fail(f"--{name} applies to --protocol=custom (the paper preset samples "
                      "spatial positions of the images in memory); add --protocol=custom or "
                      f"leave --{name} out.")
        d = compare.PaperCCAProtocol()
        methods = _methods([d.method])
        if len(methods) > 1:
            _fail("--protocol=paper computes one method; use --protocol=custom for several.")
        return tasks.SimilarityTask(
            pairs, stimuli, methods=methods, spatial="positions",
            positions=FLAGS.positions or d.positions,
            num_channels=d.num_channels if FLAGS.channels is None else (FLAGS.channels or None),
            repeats=FLAGS.repeats or d.repeats, **common)
    return tasks.SimilarityTask(
        pairs, stimuli, methods=_methods(["mean_cca"], "streaming" if FLAGS.streaming
                                         else None),
        spatial=FLAGS.spatial, positions=FLAGS.positions or 10000,
        num_channels=FLAGS.channels or None, repeats=FLAGS.repeats or 1,
        streaming=FLAGS.streaming, **common)


def layer_map_task():
    from medtransfer_jax.analysis import layer_map
    from medtransfer_jax.studies import tasks

    if not FLAGS.weights_a:
        _fail("map needs --weights_a (and --weights_b, or none to map A against itself).")
    for d in (FLAGS.weights_a, FLAGS.weights_b):
        if d and not os.path.isdir(d):
            _fail(f"Weights directory {d!r} does not exist.")
    methods = _methods(layer_map.DEFAULT_MAP_METHODS, "maps")
    stimuli, preprocessing = stimulus_spec(False, FLAGS.weights_a)
    return tasks.LayerMapTask(
        FLAGS.weights_a, FLAGS.weights_b, stimuli, name_a=FLAGS.label_a, name_b=FLAGS.label_b,
        layers=tuple(FLAGS.layers) if FLAGS.layers else "all_blocks", methods=methods,
        spatial="pool" if FLAGS.spatial == "pool" else "grid",
        max_channels=FLAGS.channels or None, batch_size=FLAGS.batch_size,
        preprocessing=FLAGS.preprocessing or preprocessing, seed=FLAGS.seed)


def predictions_task():
    from medtransfer_jax.studies import tasks
    if not (FLAGS.predictions_a and FLAGS.predictions_b):
        _fail("predictions needs --predictions_a and --predictions_b (predictions.csv files).")
    return tasks.PredictionsTask(FLAGS.predictions_a, FLAGS.predictions_b,
                                 FLAGS.random_predictions, FLAGS.prediction_split,
                                 FLAGS.label_a, FLAGS.label_b, mode=FLAGS.similarity_mode)


def weight_change_task():
    from medtransfer_jax.studies import tasks
    if not (FLAGS.weights_a and FLAGS.weights_b):
        _fail("weights needs --weights_a and --weights_b (weights directories).")
    return tasks.WeightChangeTask(FLAGS.weights_a, FLAGS.weights_b, FLAGS.include_batch_stats)


def filters_task():
    from medtransfer_jax.studies import tasks
    if not FLAGS.weights:
        _fail("filters needs at least one --weights=NAME=DIR (or --weights=DIR).")
    models = {}
    for item in FLAGS.weights:
        name, d = item.split("=", 1) if "=" in item else (os.path.basename(item.rstrip("/")), item)
        if name in models:
            _fail(f"--weights: duplicate name {name!r}; use NAME=DIR to tell them apart.")
        models[name] = d
    groups = []
    for g in FLAGS.groups:
        if "=" not in g:
            _fail(f"--groups={g!r}: expected GROUP=NAME1,NAME2.")
        k, v = g.split("=", 1)
        groups.append((k, tuple(s for s in v.split(",") if s)))
    return tasks.FiltersTask(tuple(models.items()), tuple(groups), FLAGS.orthogonality)


def auc_vs_similarity_task():
    from medtransfer_jax.studies import tasks
    if not FLAGS.run:
        _fail("auc_vs_similarity needs --run=SIMILARITY_CSV,RESULTS_JSON,RANDOM_RESULTS_JSON"
              "[,SOURCE] (one per fine-tuned run).")
    runs = []
    for item in FLAGS.run:
        parts = item.split(",")
        if len(parts) not in (3, 4):
            _fail(f"--run={item!r}: expected SIMILARITY_CSV,RESULTS_JSON,RANDOM_RESULTS_JSON"
                  "[,SOURCE].")
        runs.append(tasks.RunRecord(*parts))
    return tasks.AucVsSimilarityTask(tuple(runs), FLAGS.auc_metric, FLAGS.auc_split,
                                     FLAGS.similarity_method)


#: analysis -> (flags -> task, name of the tasks.run_* function)
COMMANDS = {"cca": (similarity_task, "run_similarity"),
            "similarity": (similarity_task, "run_similarity"),
            "map": (layer_map_task, "run_layer_map"),
            "predictions": (predictions_task, "run_predictions"),
            "weights": (weight_change_task, "run_weight_change"),
            "filters": (filters_task, "run_filters"),
            "auc_vs_similarity": (auc_vs_similarity_task, "run_auc_vs_similarity")}


def _what(argv: Sequence[str]) -> str:
    if len(argv) > 2:
        _fail(f"Unexpected arguments {list(argv[2:])}; flags need --name=value.")
    what = argv[1] if len(argv) > 1 else FLAGS.what
    if what is None:
        _fail(f"Say what to analyse: `python -m medtransfer_jax.analyze {{{','.join(WHATS)}}} "
              "--output_dir=DIR ...` (or --what=...).")
    if what not in COMMANDS:
        _fail(f"Unknown analysis {what!r}; choose one of {WHATS}.")
    if FLAGS.what and len(argv) > 1 and FLAGS.what != what:
        _fail(f"Positional {what!r} conflicts with --what={FLAGS.what}.")
    return what


def run(argv: Sequence[str]) -> Dict[str, str]:
    """Parses the flags into the task of the analysis named by argv[1] or --what, runs
    it (:mod:`studies.tasks`); returns {kind: written file}."""
    from medtransfer_jax.studies import tasks

    what = _what(argv)
    if not FLAGS.output_dir:
        _fail("--output_dir is required.")
    cli.check_output_dir(FLAGS.output_dir, "--output_dir")
    cli.check_positive(FLAGS.batch_size, "--batch_size")
    cli.check_positive(FLAGS.num_images, "--num_images")
    cli.check_positive(FLAGS.image_size, "--image_size")
    make_task, fn = COMMANDS[what]
    task = make_task()
    local = "://" not in FLAGS.output_dir
    created = local and not os.path.isdir(FLAGS.output_dir)
    paths.makedirs(FLAGS.output_dir)  # a gs:// URL stays one
    try:
        files = getattr(tasks, fn)(task, FLAGS.output_dir)
    except BaseException as e:
        if created and not os.listdir(FLAGS.output_dir):
            os.rmdir(FLAGS.output_dir)  # nothing half-created by a failed analysis
        if isinstance(e, ValueError) and not isinstance(e, UserError):
            raise UserError(str(e)) from e  # the kernels reject bad input with ValueError
        raise
    for k, v in files.items():
        logging.info("wrote %s: %s", k, v)
        print(v)
    return files


def main(argv: Sequence[str]) -> None:
    cli.enable_compile_cache()  # a second analysis of the same shapes reads its programs
    run(argv)


if __name__ == "__main__":
    cli.run(main, "analyze", checkpoints=False)
