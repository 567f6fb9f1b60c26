"""The analyses as typed tasks: one frozen dataclass of arguments and one function each.

``python -m medtransfer_jax.analyze`` parses its flags into these dataclasses and calls
the ``run_*`` functions; the study's stages (``analyses.py``) call the same functions (or
their row-level parts, :func:`pair_rows`, :func:`layer_map_of`) with arguments built from
the study config. So a comparison reached from either computes the same numbers on the
same stimuli (:mod:`analysis.stimuli`), and every table is written atomically through
:mod:`tables`. Nothing here reads flags; bad input raises :class:`AnalysisError` (a
UserError: the CLI prints it as ``analyze: error: ...`` and exits 2).

``run_*(task, out_dir)`` returns ``{kind: written file}``.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from medtransfer_jax import paths
from medtransfer_jax.analysis import compare, filters, layer_map as layer_map_lib, plots
from medtransfer_jax.analysis import predictions as pred
from medtransfer_jax.analysis import stimuli as stimuli_lib
from medtransfer_jax.analysis import weight_change
from medtransfer_jax.errors import UserError
from medtransfer_jax.inference import activations as act
from medtransfer_jax.studies import progress as progress_lib
from medtransfer_jax.studies import tables
from medtransfer_jax.ticker import Ticker
from medtransfer_jax.weights import checkpoint


class AnalysisError(UserError):
    """An analysis that cannot run on its input; the message names the file or value."""


def _exists(path: str, what: str) -> str:
    if not paths.exists(path):
        raise AnalysisError(f"{what} {path!r} does not exist.")
    return path


def _out(out_dir: str, name: str) -> str:
    return paths.to_str(paths.join(out_dir, name))


# ------------------------------------------------------------------------ similarity
@dataclasses.dataclass(frozen=True)
class Pair:
    """Two weights dirs compared; ``label`` names the comparison (default 'A vs B')."""
    a: str
    b: str
    label: Optional[str] = None
    name_a: Optional[str] = None
    name_b: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class SimilarityTask:
    """Layer-by-layer similarity of each pair on one stimulus pool.

    Defaults = the Revisiting CCA (:class:`compare.PaperCCAProtocol`: paper_cca on the
    stage outputs, ~``positions`` datapoints per layer, ``num_channels`` shared random
    channels, ``repeats`` draws); ``preprocessing`` None = each model's own.
    ``streaming``: every position of every image through the streaming accumulators.
    """
    pairs: Tuple[Pair, ...]
    stimuli: stimuli_lib.StimulusSpec
    methods: Tuple[str, ...] = (compare.PaperCCAProtocol.method,)
    layers: Optional[Tuple[str, ...]] = None
    spatial: str = "positions"
    positions: int = compare.PaperCCAProtocol.positions
    num_channels: Optional[int] = compare.PaperCCAProtocol.num_channels
    repeats: int = compare.PaperCCAProtocol.repeats
    seed: int = 0
    batch_size: int = 64
    preprocessing: Optional[str] = None
    streaming: bool = False

    @classmethod
    def from_study(cls, acfg, stimuli: stimuli_lib.StimulusSpec,
                   preprocessing: Optional[str], pairs: Sequence[Pair] = ()) -> "SimilarityTask":
        """The study's CCA (``analysis.cca`` of a study config) on ``stimuli``."""
        return cls(tuple(pairs), stimuli, methods=tuple(acfg.methods), spatial=acfg.spatial,
                   positions=int(acfg.positions), num_channels=acfg.num_channels,
                   repeats=int(acfg.repeats), seed=int(acfg.seed),
                   preprocessing=preprocessing)


def pair_label(pair: Pair) -> str:
    """The pair's label, else 'A vs B' from its names or weights dirs."""
    return pair.label or f"{pair.name_a or pair.a} vs {pair.name_b or pair.b}"


def pair_rows(task: SimilarityTask, pair: Pair, images: np.ndarray,
              progress: Optional[Ticker] = None) -> List[dict]:
    """Rows (one per layer and method, :mod:`analysis.compare`) of one pair; ``pair``
    column = the pair's label. ``progress``: the pair's throttled lines (default: one
    labelled with :func:`pair_label`), as a pair is minutes of forward passes on a CPU."""
    rows = compare.compare_networks(
        pair.a, pair.b, images, layers=list(task.layers) if task.layers else None,
        method=list(task.methods), spatial=task.spatial, positions=task.positions,
        num_channels=task.num_channels, repeats=task.repeats, seed=task.seed,
        batch_size=task.batch_size, preprocessing=task.preprocessing,
        streaming_mode=task.streaming, name_a=pair.name_a, name_b=pair.name_b,
        progress=Ticker(pair_label(pair)) if progress is None else progress)
    label = (pair.label or f"{rows[0]['model_a']} vs {rows[0]['model_b']}") if rows else ""
    for r in rows:
        r["pair"] = label
    return rows


def similarity_rows(task: SimilarityTask, images: Optional[np.ndarray] = None) -> List[dict]:
    """Rows of every pair on ``images`` (default: :func:`stimuli.load_pool` of the task),
    one progress line per pair as a study's stage prints them (``analyze`` runs this; a
    study loops over :func:`pair_rows` with its own lines)."""
    images = stimuli_lib.load_pool(task.stimuli) if images is None else images
    labels = [pair_label(p) for p in task.pairs]
    items = progress_lib.StageItems("pair", None, labels)
    rows: List[dict] = []
    for pair, label in zip(task.pairs, labels):
        with items.item(label) as it:
            got = pair_rows(task, pair, images)
            first = [r["value"] for r in got if r["method"] == task.methods[0]]
            if first:
                it.detail = f"mean {task.methods[0]} {np.nanmean(first):.3f}"
        rows += got
    return rows


def run_similarity(task: SimilarityTask, out_dir: str) -> Dict[str, str]:
    """similarity.csv/.json/.png of every pair."""
    rows = similarity_rows(task)
    return dict(csv=tables.write_csv(_out(out_dir, "similarity.csv"), rows),
                json=tables.write_json(_out(out_dir, "similarity.json"), rows),
                png=plots.plot_layer_similarity(rows, _out(out_dir, "similarity.png")))


# ------------------------------------------------------------------------- layer map
@dataclasses.dataclass(frozen=True)
class LayerMapTask:
    """Every layer of A against every layer of B (or of A, ``b=None``) in one pass;
    ``spatial`` 'pool' or 'grid', ``max_channels`` per layer (None = automatic)."""
    a: str
    b: Optional[str]
    stimuli: stimuli_lib.StimulusSpec
    name_a: Optional[str] = None
    name_b: Optional[str] = None
    layers: Any = "all_blocks"
    methods: Tuple[str, ...] = layer_map_lib.DEFAULT_MAP_METHODS
    spatial: str = "pool"
    max_channels: Optional[int] = None
    batch_size: int = 64
    preprocessing: Optional[str] = None
    seed: int = 0


def layer_map_of(task: LayerMapTask, images: Optional[np.ndarray] = None,
                 progress: Optional[Ticker] = None):
    """The :class:`layer_map.LayerMap` of ``task`` on ``images`` (default: its pool);
    ``progress``: its lines (default: labelled 'map A vs B')."""
    images = stimuli_lib.load_pool(task.stimuli) if images is None else images
    if progress is None:
        name_a = task.name_a or task.a
        name_b = task.name_b or task.b or name_a   # b None: A against itself
        progress = Ticker(f"map {name_a} vs {name_b}")
    return layer_map_lib.layer_map(
        task.a, task.b, images, layers=task.layers, methods=task.methods,
        spatial=task.spatial, max_channels=task.max_channels, batch_size=task.batch_size,
        preprocessing=task.preprocessing, seed=task.seed, name_a=task.name_a,
        name_b=task.name_b, progress=progress)


def write_layer_map(lmap, csv_path: str, pngs: Dict[str, str]) -> Dict[str, str]:
    """A map's table (CSV + JSON twin) and its heatmaps (``pngs``: method -> file)."""
    rows = lmap.rows()
    files = dict(csv=tables.write_csv(csv_path, rows),
                 json=tables.write_json(os.path.splitext(csv_path)[0] + ".json", rows))
    for m in lmap.values:
        files[f"png_{m}"] = plots.plot_layer_map(lmap, m, pngs[m])
    return files


def run_layer_map(task: LayerMapTask, out_dir: str) -> Dict[str, str]:
    """layer_map.csv/.json and layer_map_<method>.png."""
    return write_layer_map(layer_map_of(task), _out(out_dir, "layer_map.csv"),
                           {m: _out(out_dir, f"layer_map_{m}.png") for m in task.methods})


# ----------------------------------------------------------------------- predictions
@dataclasses.dataclass(frozen=True)
class PredictionsTask:
    """Similarity of two classifiers' predictions files (``random``: the random-init
    model's, for the relative AUC gain); ``split`` None = all rows; ``mode``: 'corrected'
    or 'paper' (:data:`analysis.predictions.MODES`)."""
    a: str
    b: str
    random: Optional[str] = None
    split: Optional[str] = None
    label_a: Optional[str] = None
    label_b: Optional[str] = None
    mode: str = "corrected"


def _short(path: str) -> str:
    """'runs/imagenet_fold1/predictions.csv' -> 'imagenet_fold1/predictions.csv'."""
    parts = os.path.normpath(path).split(os.sep)
    return os.path.join(*parts[-2:]) if len(parts) > 1 else path


def run_predictions(task: PredictionsTask, out_dir: str) -> Dict[str, str]:
    """prediction_similarity.csv/.json/.png."""
    try:
        res = pred.compare_prediction_files(task.a, task.b, split=task.split,
                                            random_path=task.random, mode=task.mode)
    except ValueError as e:
        raise AnalysisError(str(e)) from None
    res.update(model_a=task.label_a or _short(task.a), model_b=task.label_b or _short(task.b))
    return dict(csv=tables.write_csv(_out(out_dir, "prediction_similarity.csv"), [res]),
                json=tables.write_json(_out(out_dir, "prediction_similarity.json"), res),
                png=plots.plot_prediction_similarity(
                    [res], _out(out_dir, "prediction_similarity.png")))


# ----------------------------------------------------------------- weights / filters
@dataclasses.dataclass(frozen=True)
class WeightChangeTask:
    """Per-layer relative L2 / cosine between two weights dirs."""
    a: str
    b: str
    include_batch_stats: bool = False


def run_weight_change(task: WeightChangeTask, out_dir: str) -> Dict[str, str]:
    """weight_change.csv/.json/.png."""
    rows = weight_change.weight_change_dirs(_exists(task.a, "weights dir"),
                                            _exists(task.b, "weights dir"),
                                            include_batch_stats=task.include_batch_stats)
    return dict(csv=tables.write_csv(_out(out_dir, "weight_change.csv"), rows),
                json=tables.write_json(_out(out_dir, "weight_change.json"), rows),
                png=plots.plot_weight_change(rows, _out(out_dir, "weight_change.png"),
                                             title=f"a = {task.a}\nb = {task.b}"))


@dataclasses.dataclass(frozen=True)
class FiltersTask:
    """3x3 filter distributions of ``models`` ((name, weights dir), ...); ``groups``
    ((group, (name, ...)), ...) pool models before the drifts."""
    models: Tuple[Tuple[str, str], ...]
    groups: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    orthogonality: bool = False


def run_filters(task: FiltersTask, out_dir: str) -> Dict[str, str]:
    """filter_layers.csv, filter_drift.csv, filters.json, filter_histograms.npz, PNGs (the
    histograms, drifts and the stem's filters as pictures)."""
    models = {n: checkpoint.load_weights(_exists(d, "weights dir"))[0]["params"]
              for n, d in task.models}
    groups = {g: list(names) for g, names in task.groups}
    try:
        rep = filters.analyse_filters(models, groups=groups or None,
                                      with_orthogonality=task.orthogonality,
                                      progress=Ticker("filters"))
    except ValueError as e:
        raise AnalysisError(str(e)) from None
    files = dict(
        layers=tables.write_csv(_out(out_dir, "filter_layers.csv"), rep.layer_rows),
        drift=tables.write_csv(_out(out_dir, "filter_drift.csv"), rep.drift_rows),
        json=tables.write_json(_out(out_dir, "filters.json"), dict(
            pca_components=rep.pca.components, pca_mean=rep.pca.mean,
            explained_variance_ratio=rep.pca.explained_variance_ratio, ranges=rep.ranges, layers=rep.layer_rows, drift=rep.drift_rows)),
        npz=_write_histograms(rep, _out(out_dir, "filter_histograms.npz")))
    files.update(_filter_figures(rep, list(groups) if groups else list(models), out_dir))
    stems = {n: p.get("conv1_conv", {}).get("kernel") for n, p in models.items()}
    if all(k is not None for k in stems.values()):   # Revisiting's filter_plot.py picture
        files["conv1_png"] = plots.plot_first_layer_filters(
            stems, _out(out_dir, "conv1_filters.png"))
    return files


def _write_histograms(rep, path: str) -> str:
    """The histograms as one .npz, written to a temporary name then renamed."""
    buf = io.BytesIO()
    np.savez(buf, bin_edges=rep.bin_edges(),
             **{f"{m}|{k}": h for (m, k), h in rep.histograms.items()},
             **{f"layer|{m}|{k}": h for (m, k), h in rep.layer_histograms.items()})
    paths.makedirs(paths.workdir(path).parent)
    paths.write_bytes_atomic(paths.workdir(path), buf.getvalue())
    return path


def _bin_slug(depth_bin: str) -> str:
    """'(0.1, 0.2]' -> '0.1-0.2': a file name without spaces, brackets or commas."""
    return "-".join(re.findall(r"\d+(?:\.\d+)?", depth_bin)) or re.sub(r"\W+", "_", depth_bin)


def _filter_figures(rep, units: Sequence[str], out_dir: str) -> Dict[str, str]:
    files = {"hist_png": plots.plot_filter_histograms(
        rep.histograms, rep.bin_edges(), _out(out_dir, "filter_histograms.png"),
        keys=[(u, "all") for u in units], explained=rep.pca.explained_variance_ratio)}
    for b in sorted({k[1] for k in rep.histograms if k[1] != "all"}):
        files[f"hist_png_{_bin_slug(b)}"] = plots.plot_filter_histograms(
            rep.histograms, rep.bin_edges(),
            _out(out_dir, f"filter_histograms_depth_{_bin_slug(b)}.png"),
            keys=[(u, b) for u in units if (u, b) in rep.histograms],
            explained=rep.pca.explained_variance_ratio)
    if rep.drift_rows:
        files["drift_layer_png"] = plots.plot_kl_drift(
            rep.drift_rows, _out(out_dir, "filter_drift_layer.png"), scope="layer")
        files["drift_depth_png"] = plots.plot_kl_drift(
            rep.drift_rows, _out(out_dir, "filter_drift_depth.png"), scope="depth_bin")
    return files


# ----------------------------------------------------------------- AUC vs similarity
@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One fine-tuned run: its pre-trained-vs-fine-tuned similarity table, its
    results.json, the random-init run's results.json and its source ('' = one group)."""
    similarity_csv: str
    results: str
    random_results: str
    source: str = ""


@dataclasses.dataclass(frozen=True)
class AucVsSimilarityTask:
    """Relative AUC gain over random init vs per-layer similarity across runs;
    ``method`` None = the first method of each table."""
    runs: Tuple[RunRecord, ...]
    metric: str = "auc"
    split: str = "test"
    method: Optional[str] = None


def _read_metric(path: str, split: str, metric: str) -> float:
    res = tables.read_json(_exists(path, "results file"),
                           fix="give the results.json a finished run wrote")
    try:
        return float(res[split][metric])
    except (KeyError, TypeError, ValueError):
        raise AnalysisError(f"{path}: no {split}.{metric} (analyze: see --auc_split/"
                            "--auc_metric).") from None


#: Columns of a similarity table (representations.csv / a study's per-fold table) that
#: auc_vs_similarity reads.
SIMILARITY_COLUMNS = ("layer", "method", "value")
SIMILARITY_FIX = ("give the similarity.csv that `python -m medtransfer_jax.analyze similarity` "
                  "writes (or a study's representations/TARGET_foldK.csv), written again")


def _run_similarity(run: RunRecord, method: Optional[str]) -> Dict[str, float]:
    """{layer: value} of ``method`` (default: the first row's) in a run's similarity table
    (analyze similarity's similarity.csv, or a study's representations/TARGET_foldK.csv);
    a damaged table is a tables.TableError naming it."""
    path = run.similarity_csv
    rows = tables.read_csv(_exists(path, "similarity table"), required=SIMILARITY_COLUMNS,
                           fix=SIMILARITY_FIX)
    method = method or (rows[0]["method"] if rows else None)
    per_layer = {r["layer"]: r["value"] for r in rows if r["method"] == method}
    bad = [v for v in per_layer.values() if not isinstance(v, float)]
    if bad:
        raise tables.damaged(path, f"column 'value' holds {bad[0]!r}, not a number",
                             fix=SIMILARITY_FIX)
    if not per_layer:
        raise AnalysisError(f"{run.similarity_csv}: no rows for method {method!r}.")
    return per_layer


def run_auc_vs_similarity(task: AucVsSimilarityTask, out_dir: str) -> Dict[str, str]:
    """auc_vs_similarity.csv/.json/.png."""
    if len(task.runs) < 2:
        raise AnalysisError(f"auc_vs_similarity correlates runs: give at least 2 (got "
                            f"{len(task.runs)}); one run has no slope or correlation.")
    records = [dict(similarity=_run_similarity(r, task.method),
                    auc=_read_metric(r.results, task.split, task.metric),
                    auc_random=_read_metric(r.random_results, task.split, task.metric),
                    source=r.source, run=r.results) for r in task.runs]
    table = pred.auc_gain_vs_similarity(records)
    return dict(csv=tables.write_csv(_out(out_dir, "auc_vs_similarity.csv"), table),
                json=tables.write_json(_out(out_dir, "auc_vs_similarity.json"),
                                       dict(layers=table, runs=records)),
                png=plots.plot_auc_vs_similarity(table, _out(out_dir, "auc_vs_similarity.png"),
                                                 method=task.method or ""))


def check_layers(weights_dirs: Sequence[str], layers: Optional[Sequence[str]]) -> None:
    """Unknown ``layers`` of any network fail before any image is loaded."""
    if not layers:
        return
    for d in dict.fromkeys(weights_dirs):
        try:
            act.check_layers(act.load_model(_exists(d, "weights dir")), layers)
        except ValueError as e:
            raise AnalysisError(f"layers {','.join(layers)}: {e}") from None

