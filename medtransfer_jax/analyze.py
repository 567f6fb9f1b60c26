r"""Post-training analyses: ``python -m medtransfer_jax.analyze WHAT --output_dir=DIR ...``.

WHAT (positional, or ``--what``):

* ``cca`` / ``similarity``: layer-by-layer similarity of two networks (weights dirs) on the
  same images -> similarity.csv/.json/.png. ``--protocol=paper`` (default) is the
  Revisiting CCA (mean CCA, stage outputs, ~10k positions, 64 shared channels, 5 repeats);
  ``--protocol=custom`` uses ``--methods``, ``--layers``, ``--spatial``, ``--streaming``.
  Several pairs: repeat ``--pair=DIR_A,DIR_B[,LABEL]``. Images: ``--images=data`` (the
  data config: ``--dataset``, ``--data_root``, ``--fold``, ``--split``,
  ``--data_override=key=value``) or ``--images=random`` (uniform noise, for smoke tests).
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
"""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Optional, Sequence

from absl import app, flags, logging
import numpy as np

from medtransfer_jax import cli, configs
from medtransfer_jax.errors import ConfigError, UserError

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
_define("integer", "fold", 0, "Fold of the data splits.")
_define("string", "split", "test", "Split used as stimulus (train/val/test or an extra test).")
_define("multi_string", "data_override", [], "key=value overrides of the data config.")
# predictions
_define("string", "predictions_a", None, "predictions.csv of model A.")
_define("string", "predictions_b", None, "predictions.csv of model B.")
_define("string", "random_predictions", None, "predictions.csv of the random-init model.")
_define("string", "prediction_split", None, "Only rows of this split (default: all rows).")
# weights / filters
_define("bool", "include_batch_stats", False, "weights: include BatchNorm running stats.")
_define("multi_string", "weights", [], "filters: NAME=DIR or DIR (repeatable).")
_define("multi_string", "groups", [], "filters: GROUP=NAME1,NAME2 pooled groups.")
_define("bool", "orthogonality", False, "filters: also compute filter orthogonality.")
# auc_vs_similarity
_define("multi_string", "run", [], "auc_vs_similarity: SIMILARITY_CSV,RESULTS_JSON,"
        "RANDOM_RESULTS_JSON for one fine-tuned run (repeatable): its pre-trained-vs-"
        "fine-tuned similarity table, its results.json and the random-init run's.")
_define("string", "auc_metric", "auc", "auc_vs_similarity: metric key in results.json.")
_define("string", "auc_split", "test", "auc_vs_similarity: results.json section (val/test).")
_define("string", "similarity_method", None, "auc_vs_similarity: method rows to use "
        "(default: the first method in each table).")


def _fail(msg: str):
    """Bad input: the harness prints 'analyze: error: msg' and exits 2."""
    raise app.UsageError(msg)


def _write_rows(rows: Sequence[dict], path: str, drop: Sequence[str] = ("values",)) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in drop))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    return path


def _write_json(obj, path: str) -> str:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
    return path


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


# ----------------------------------------------------------------------------- images
def load_images(image_size: int) -> np.ndarray:
    """The stimulus pool: (N, S, S, 3) uint8 from the data split, or uniform noise."""
    rng = np.random.default_rng(FLAGS.seed)
    if FLAGS.images == "random":
        return rng.integers(0, 256, (FLAGS.num_images, image_size, image_size, 3), np.uint8)
    from medtransfer_jax import data, preprocessing
    from medtransfer_jax.data import pipeline

    cfg = data.default_data_config()
    if FLAGS.dataset:
        cfg.name = FLAGS.dataset
    if FLAGS.data_root:
        cfg.root = FLAGS.data_root
    try:
        configs.override(cfg, FLAGS.data_override, flag="data_override")
    except ConfigError as e:
        _fail(f"{e} (of the data config)")
    splits = data.get_splits(cfg, fold=FLAGS.fold)
    sources = {"train": splits.train, "val": splits.val, "test": splits.test,
               **dict(splits.extra_tests)}
    if FLAGS.split not in sources:
        _fail(f"--split={FLAGS.split!r}: {splits.name} has splits {sorted(sources)}.")
    src = sources[FLAGS.split]
    if len(src) < 2:
        _fail(f"--split={FLAGS.split} of {splits.name} has {len(src)} examples; need >= 2.")
    idx = np.sort(rng.choice(len(src), min(FLAGS.num_images, len(src)), replace=False))
    out = np.zeros((len(idx), image_size, image_size, 3), np.uint8)
    for j, i in enumerate(idx):
        img = preprocessing.to_three_channels(np.asarray(src[int(i)]["image"]))
        if img.shape[:2] != (image_size, image_size):
            img = pipeline.resize(img.astype(np.uint8), image_size,
                                  cfg.get("resize_method", "bilinear"))
        out[j] = img
    logging.info("Loaded %d images of %s/%s fold %d at %d px.", len(out), splits.name,
                 FLAGS.split, FLAGS.fold, image_size)
    return out


# ----------------------------------------------------------------------------- commands
def _pairs() -> List[tuple]:
    pairs = []
    if FLAGS.weights_a or FLAGS.weights_b:
        if not (FLAGS.weights_a and FLAGS.weights_b):
            _fail("Give both --weights_a and --weights_b (or use --pair=DIR_A,DIR_B).")
        pairs.append((FLAGS.weights_a, FLAGS.weights_b, FLAGS.label_a, FLAGS.label_b))
    for p in FLAGS.pair:
        parts = p.split(",")
        if len(parts) not in (2, 3):
            _fail(f"--pair={p!r}: expected DIR_A,DIR_B[,LABEL].")
        pairs.append((parts[0], parts[1], None, None) + ((parts[2],) if len(parts) == 3 else ()))
    if not pairs:
        _fail("cca/similarity needs --weights_a and --weights_b, or --pair=DIR_A,DIR_B.")
    for p in pairs:
        for d in p[:2]:
            if not os.path.isdir(d):
                _fail(f"Weights directory {d!r} does not exist.")
    return pairs


def _check_layers(pairs: List[tuple]) -> None:
    """Unknown --layers fail before any image is loaded or any file written."""
    if not FLAGS.layers:
        return
    from medtransfer_jax.inference import activations as act
    for d in dict.fromkeys(p for pair in pairs for p in pair[:2]):
        try:
            act.check_layers(act.load_model(d), FLAGS.layers)
        except ValueError as e:
            _fail(f"--layers={','.join(FLAGS.layers)}: {e}")


def run_similarity(out_dir: str) -> Dict[str, str]:
    from medtransfer_jax.inference import activations as act
    from medtransfer_jax.analysis import compare, plots

    pairs = _pairs()
    first = act.load_model(pairs[0][0])
    size = FLAGS.image_size or _data_image_size() or first.metadata.image_size
    images = load_images(size)
    rows: List[dict] = []
    for pair in pairs:
        a = act.load_model(pair[0], pair[2])
        b = act.load_model(pair[1], pair[3])
        label = pair[4] if len(pair) > 4 else f"{a.name} vs {b.name}"
        if FLAGS.protocol == "paper":
            d = compare.PaperCCAProtocol()
            proto = compare.PaperCCAProtocol(
                layers=tuple(FLAGS.layers) if FLAGS.layers else None,
                positions=FLAGS.positions or d.positions,
                num_channels=(d.num_channels if FLAGS.channels is None
                              else (FLAGS.channels or None)),
                repeats=FLAGS.repeats or d.repeats,
                method=(FLAGS.methods or [d.method])[0], seed=FLAGS.seed,
                batch_size=FLAGS.batch_size)
            if FLAGS.methods and len(FLAGS.methods) > 1:
                _fail("--protocol=paper computes one method; use --protocol=custom for several.")
            r = compare.run_paper_protocol(a, b, images, proto,
                                           preprocessing=FLAGS.preprocessing)
        else:
            r = compare.compare_networks(
                a, b, images, layers=FLAGS.layers, method=FLAGS.methods or ["mean_cca"],
                spatial=FLAGS.spatial, positions=FLAGS.positions or 10000,
                num_channels=FLAGS.channels or None, repeats=FLAGS.repeats or 1,
                seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                preprocessing=FLAGS.preprocessing, streaming_mode=FLAGS.streaming)
        for row in r:
            row["pair"] = label
        rows.extend(r)
    return dict(csv=_write_rows(rows, os.path.join(out_dir, "similarity.csv")),
                json=_write_json(rows, os.path.join(out_dir, "similarity.json")),
                png=plots.plot_layer_similarity(rows, os.path.join(out_dir, "similarity.png")))


def _data_image_size() -> Optional[int]:
    if FLAGS.images != "data":
        return None
    try:
        from medtransfer_jax import data
        return int(data.default_data_config().image_size)
    except Exception:  # data module missing or config without image_size
        return None


def run_predictions(out_dir: str) -> Dict[str, str]:
    from medtransfer_jax.analysis import plots, predictions

    if not (FLAGS.predictions_a and FLAGS.predictions_b):
        _fail("predictions needs --predictions_a and --predictions_b (predictions.csv files).")
    try:
        res = predictions.compare_prediction_files(
            FLAGS.predictions_a, FLAGS.predictions_b, split=FLAGS.prediction_split,
            random_path=FLAGS.random_predictions)
    except ValueError as e:
        _fail(str(e))
    res.update(model_a=FLAGS.label_a or _short(FLAGS.predictions_a),
               model_b=FLAGS.label_b or _short(FLAGS.predictions_b))
    return dict(csv=_write_rows([res], os.path.join(out_dir, "prediction_similarity.csv")),
                json=_write_json(res, os.path.join(out_dir, "prediction_similarity.json")),
                png=plots.plot_prediction_similarity(
                    [res], os.path.join(out_dir, "prediction_similarity.png")))


def _short(path: str) -> str:
    """'runs/imagenet_fold1/predictions.csv' -> 'imagenet_fold1/predictions.csv'."""
    parts = os.path.normpath(path).split(os.sep)
    return os.path.join(*parts[-2:]) if len(parts) > 1 else path


def run_weights(out_dir: str) -> Dict[str, str]:
    from medtransfer_jax.analysis import plots, weight_change

    if not (FLAGS.weights_a and FLAGS.weights_b):
        _fail("weights needs --weights_a and --weights_b (weights directories).")
    rows = weight_change.weight_change_dirs(FLAGS.weights_a, FLAGS.weights_b,
                                            include_batch_stats=FLAGS.include_batch_stats)
    return dict(csv=_write_rows(rows, os.path.join(out_dir, "weight_change.csv")),
                json=_write_json(rows, os.path.join(out_dir, "weight_change.json")),
                png=plots.plot_weight_change(rows, os.path.join(out_dir, "weight_change.png")))


def run_filters(out_dir: str) -> Dict[str, str]:
    from medtransfer_jax.analysis import filters, plots
    from medtransfer_jax.weights import checkpoint

    if not FLAGS.weights:
        _fail("filters needs at least one --weights=NAME=DIR (or --weights=DIR).")
    models = {}
    for item in FLAGS.weights:
        name, d = item.split("=", 1) if "=" in item else (os.path.basename(item.rstrip("/")), item)
        if name in models:
            _fail(f"--weights: duplicate name {name!r}; use NAME=DIR to tell them apart.")
        models[name] = checkpoint.load_weights(d)[0]["params"]
    groups = {}
    for g in FLAGS.groups:
        if "=" not in g:
            _fail(f"--groups={g!r}: expected GROUP=NAME1,NAME2.")
        k, v = g.split("=", 1)
        groups[k] = [s for s in v.split(",") if s]
    try:
        rep = filters.analyse_filters(models, groups=groups or None,
                                      with_orthogonality=FLAGS.orthogonality)
    except ValueError as e:
        _fail(str(e))
    files = dict(
        layers=_write_rows(rep.layer_rows, os.path.join(out_dir, "filter_layers.csv")),
        drift=_write_rows(rep.drift_rows, os.path.join(out_dir, "filter_drift.csv")),
        json=_write_json(dict(pca_components=rep.pca.components, pca_mean=rep.pca.mean,
                              explained_variance_ratio=rep.pca.explained_variance_ratio,
                              ranges=rep.ranges, layers=rep.layer_rows, drift=rep.drift_rows),
                         os.path.join(out_dir, "filters.json")))
    np.savez(os.path.join(out_dir, "filter_histograms.npz"),
             bin_edges=rep.bin_edges(),
             **{f"{m}|{k}": h for (m, k), h in rep.histograms.items()},
             **{f"layer|{m}|{k}": h for (m, k), h in rep.layer_histograms.items()})
    files["npz"] = os.path.join(out_dir, "filter_histograms.npz")
    units = list(groups) if groups else list(models)
    files["hist_png"] = plots.plot_filter_histograms(
        rep.histograms, rep.bin_edges(), os.path.join(out_dir, "filter_histograms.png"),
        keys=[(u, "all") for u in units], explained=rep.pca.explained_variance_ratio)
    for b in sorted({k[1] for k in rep.histograms if k[1] != "all"}):
        files[f"hist_png_{b}"] = plots.plot_filter_histograms(
            rep.histograms, rep.bin_edges(),
            os.path.join(out_dir, f"filter_histograms_depth_{b}.png"),
            keys=[(u, b) for u in units if (u, b) in rep.histograms],
            explained=rep.pca.explained_variance_ratio)
    if rep.drift_rows:
        files["drift_layer_png"] = plots.plot_kl_drift(
            rep.drift_rows, os.path.join(out_dir, "filter_drift_layer.png"), scope="layer")
        files["drift_depth_png"] = plots.plot_kl_drift(
            rep.drift_rows, os.path.join(out_dir, "filter_drift_depth.png"), scope="depth_bin")
    return files


def _read_metric(path: str) -> float:
    if not os.path.exists(path):
        _fail(f"--run: results file {path!r} does not exist.")
    with open(path) as f:
        res = json.load(f)
    try:
        return float(res[FLAGS.auc_split][FLAGS.auc_metric])
    except (KeyError, TypeError, ValueError):
        _fail(f"{path}: no {FLAGS.auc_split}.{FLAGS.auc_metric} (see --auc_split/--auc_metric).")


def run_auc_vs_similarity(out_dir: str) -> Dict[str, str]:
    from medtransfer_jax.analysis import plots, predictions

    if not FLAGS.run:
        _fail("auc_vs_similarity needs --run=SIMILARITY_CSV,RESULTS_JSON,RANDOM_RESULTS_JSON "
              "(one per fine-tuned run).")
    records = []
    for item in FLAGS.run:
        parts = item.split(",")
        if len(parts) != 3:
            _fail(f"--run={item!r}: expected SIMILARITY_CSV,RESULTS_JSON,RANDOM_RESULTS_JSON.")
        sim_csv, res, rand = parts
        if not os.path.exists(sim_csv):
            _fail(f"--run: similarity table {sim_csv!r} does not exist.")
        with open(sim_csv) as f:
            rows = list(csv.DictReader(f))
        method = FLAGS.similarity_method or (rows[0]["method"] if rows else None)
        sim = {r["layer"]: float(r["value"]) for r in rows if r["method"] == method}
        if not sim:
            _fail(f"{sim_csv}: no rows for method {method!r}.")
        records.append(dict(similarity=sim, auc=_read_metric(res), auc_random=_read_metric(rand),
                            run=res))
    table = predictions.auc_gain_vs_similarity(records)
    return dict(csv=_write_rows(table, os.path.join(out_dir, "auc_vs_similarity.csv"),
                                drop=("similarity", "gain")),
                json=_write_json(dict(layers=table, runs=records),
                                 os.path.join(out_dir, "auc_vs_similarity.json")),
                png=plots.plot_auc_vs_similarity(table,
                                                 os.path.join(out_dir, "auc_vs_similarity.png")))


def run_map(out_dir: str) -> Dict[str, str]:
    """``analyze map``: a layer x layer similarity map (analysis/layer_map.py)."""
    from medtransfer_jax.inference import activations as act
    from medtransfer_jax.analysis import layer_map

    if not FLAGS.weights_a:
        _fail("map needs --weights_a (and --weights_b, or none to map A against itself).")
    for d in (FLAGS.weights_a, FLAGS.weights_b):
        if d and not os.path.isdir(d):
            _fail(f"Weights directory {d!r} does not exist.")
    bad = [m for m in FLAGS.methods or [] if m not in layer_map.MAP_METHODS]
    if bad:
        _fail(f"--methods: {bad} cannot be mapped; choose from {layer_map.MAP_METHODS}.")
    a = act.load_model(FLAGS.weights_a, FLAGS.label_a)
    b = act.load_model(FLAGS.weights_b, FLAGS.label_b) if FLAGS.weights_b else None
    images = load_images(FLAGS.image_size or _data_image_size() or a.metadata.image_size)
    try:
        lmap = layer_map.layer_map(
            a, b, images, layers=FLAGS.layers or "all_blocks",
            methods=FLAGS.methods or layer_map.DEFAULT_MAP_METHODS,
            spatial="pool" if FLAGS.spatial == "pool" else "grid",
            max_channels=FLAGS.channels or None, batch_size=FLAGS.batch_size,
            preprocessing=FLAGS.preprocessing, seed=FLAGS.seed)
    except ValueError as e:
        _fail(f"map: {e}")
    rows = lmap.rows()
    files = dict(csv=_write_rows(rows, os.path.join(out_dir, "layer_map.csv")),
                 json=_write_json(rows, os.path.join(out_dir, "layer_map.json")))
    for m in lmap.values:
        files[f"png_{m}"] = layer_map.plot_layer_map(
            lmap, m, os.path.join(out_dir, f"layer_map_{m}.png"))
    return files


COMMANDS = {"auc_vs_similarity": run_auc_vs_similarity, "cca": run_similarity, "map": run_map,
            "similarity": run_similarity, "predictions": run_predictions,
            "weights": run_weights, "filters": run_filters}


def run(argv: Sequence[str]) -> Dict[str, str]:
    """Runs the analysis named by argv[1] or --what; returns {kind: written file}."""
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
    if not FLAGS.output_dir:
        _fail("--output_dir is required.")
    cli.check_output_dir(FLAGS.output_dir, "--output_dir")
    cli.check_positive(FLAGS.batch_size, "--batch_size")
    cli.check_positive(FLAGS.num_images, "--num_images")
    cli.check_positive(FLAGS.image_size, "--image_size")
    if what in ("cca", "similarity"):
        _check_layers(_pairs())
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    try:
        files = COMMANDS[what](FLAGS.output_dir)
    except ValueError as e:  # the analysis kernels reject bad input with ValueError
        raise UserError(str(e)) from e
    for k, v in files.items():
        logging.info("wrote %s: %s", k, v)
        print(v)
    return files


def main(argv: Sequence[str]) -> None:
    run(argv)


if __name__ == "__main__":
    cli.run(main, "analyze")
