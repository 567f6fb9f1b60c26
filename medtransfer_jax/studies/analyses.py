"""The study's analysis stages as functions of a study (paths + grid) -> tables and figures.

Each function reads what earlier stages wrote (run workdirs, weights dirs, predictions
files, tables) and writes its own tables (``tables.py``) and figures; the runner calls
them as one line per stage. ``study`` is anything with the :class:`runner.Study`
attributes used here (``config``, ``path()``, ``source_dir()``, ``fine_tuned_dir()``,
``finetune_runs()``, ``folds``, ``random_twin_dir()``, ``clean_targets``); this module never imports the
runner, so the layers stay one-way.

Statistics (``analysis/stats.py``): spreads are sample sds over folds; each run's test
AUC gets a bootstrap 95% CI over its test images; sources are compared per target with
a paired test over folds (Revisiting) and per (confounder, p, test set) with Source
Matters' permutation t-test; each similarity comes with its chance level.
"""
from __future__ import annotations

import functools
import itertools
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from medtransfer_jax import paths
from medtransfer_jax.configs import study_options
from medtransfer_jax.inference import activations as act
from medtransfer_jax.analysis import compare, filters, plots
from medtransfer_jax.analysis import layer_map as layer_map_lib
from medtransfer_jax.analysis import predictions as pred
from medtransfer_jax.analysis import similarity as sim
from medtransfer_jax.analysis import stats, stimuli, weight_change
from medtransfer_jax.models import resnet
from medtransfer_jax.studies import progress, tables, tasks
from medtransfer_jax.ticker import Ticker
from medtransfer_jax.training import sweep
from medtransfer_jax.inference import metrics
from medtransfer_jax.weights import checkpoint

#: The metric of ``runs.csv``'s ``test.<name>`` -> a function of (labels, probs) for the
#: bootstrap, so a CI is always of the same AUC the table shows.
AUC_FUNCTIONS = {"auc": metrics.auc_ovr, "auc_micro": metrics.auc_micro,
                 "auc_keras": metrics.auc_keras,
                 "auc_ovr_weighted": lambda y, p: metrics.auc_ovr(y, p, "weighted")}
TESTS = study_options.TEST_SETS


def option(study, name: str):
    """The study's ``analysis.<name>``, validated, its default where unset (study_options)."""
    return study_options.get(study.config, name)


def _auc_name(study) -> str:
    return option(study, "auc_metric")


def item_name(target: str, fold: int, what: str) -> str:
    """An analysis item's name in its progress line and in the stage's cost model
    (``preflight.stage_work``): 'breast/fold2 imagenet (pre) vs imagenet (fine-tuned)'."""
    return f"{target}/fold{fold} {what}"


def _items(study, kind: str, names: Sequence[str], skip: Sequence[str] = ()):
    """The progress of a stage's item loop (:class:`progress.StageItems`), fed to the
    running study's cost model when there is one."""
    return progress.StageItems(kind, getattr(study, "tracker", None), names, skip=skip)


def _mean(values) -> float:
    """Mean of the finite values; NaN (without numpy's empty-slice warning) if none."""
    values = [v for v in (float(v) for v in values) if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


# ------------------------------------------------------------------------- fine-tuning
def run_auc_ci(run_dir: str, split: str, auc_name: str, n_boot: int) -> Dict[str, float]:
    """Bootstrap 95% CI of one run's AUC on ``split`` from its predictions file."""
    path = paths.to_str(paths.join(run_dir, "predictions.csv"))
    if n_boot <= 0 or not paths.exists(path):
        return {}
    p = pred.load_predictions(path)
    sel = p["split"] == split
    if sel.sum() < 2:
        return {}
    lo, hi = stats.bootstrap_ci(p["label"][sel], p["probs"][sel], AUC_FUNCTIONS[auc_name],
                                n_boot=n_boot)
    return {f"{split}.{auc_name}_ci_low": lo, f"{split}.{auc_name}_ci_high": hi}


def finetune_tables(study, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """runs.csv (+ bootstrap CI per run), auc_summary.csv and source_comparisons.csv."""
    auc_name = _auc_name(study)
    n_boot = int(option(study, "bootstrap"))
    for r in rows:
        if r.get("status") == "done":
            r.update(run_auc_ci(r["workdir"], "test", auc_name, n_boot))
    tables.write_csv(study.path("tables", "runs.csv"), rows)
    done = [r for r in rows if r.get("status") == "done"]
    summary = tables.summarise(done, ("target", "source", "confounder", "p"),
                               (f"test.{auc_name}", "test.num_examples", f"val.{auc_name}"))
    tables.write_csv(study.path("tables", "auc_summary.csv"), summary)
    tables.write_csv(study.path("tables", "source_comparisons.csv"),
                     source_comparisons(done, f"test.{auc_name}"))
    return rows


def source_comparisons(rows: Sequence[Dict[str, Any]], metric: str) -> List[Dict[str, Any]]:
    """Per target (clean runs): every pair of sources, paired over the folds both ran."""
    clean = [r for r in rows if r.get("confounder", "none") in ("none", "")]
    out = []
    for target in dict.fromkeys(r["target"] for r in clean):
        by_src: Dict[str, Dict[Any, float]] = {}
        for r in clean:
            if r["target"] == target:
                by_src.setdefault(r["source"], {})[r["fold"]] = float(r.get(metric, "nan"))
        for a, b in itertools.combinations(by_src, 2):
            folds = sorted(set(by_src[a]) & set(by_src[b]))
            t = stats.paired_test([by_src[a][f] for f in folds], [by_src[b][f] for f in folds])
            out.append(dict(target=target, source_a=a, source_b=b, metric=metric, **t))
    return out


# ------------------------------------------------------------------- representations
def _probe_config(study, target: str):
    tspec = study.config.targets[target]
    return sweep.load_config(sweep.Run("probe", study.target_config(target), "",
                                       list(tspec.get("overrides", []))))


def target_stimuli(study, target: str, fold: int,
                   num_images: int) -> Tuple[stimuli.StimulusSpec, Optional[str]]:
    """(the stimulus pool of a target's fold, the protocol's preprocessing): what the
    target's config declares (:func:`stimuli.protocol_spec`), as ``analyze
    --stimuli_config`` reads it."""
    cfg = _probe_config(study, target)
    return (stimuli.protocol_spec(cfg, fold=fold, num_images=num_images),
            stimuli.protocol_of(cfg)["preprocessing"])


def target_images(study, target: str, fold: int, num_images: int) -> np.ndarray:
    """Raw uint8 stimuli (N, S, S, 3) of a target's fold (:func:`target_stimuli`)."""
    return stimuli.load_pool(target_stimuli(study, target, fold, num_images)[0])


#: The similarity figure's panel rows by kind of pair: Revisiting's two CCA figures
#: (``CCA_plot.py``: each source before vs after fine-tuning; between networks), then
#: the pairs it put in no figure.
SIMILARITY_PANELS = {"pre_vs_finetuned": "each source before vs after fine-tuning",
                     "between_sources_pre": "between networks",
                     "between_sources_finetuned": "between networks",
                     "random_vs_random": "between networks",
                     "finetuned_vs_pre": "fine-tuned vs another network before fine-tuning"}


def cca_pairs(study, target: str, fold: int) -> List[tuple]:
    """(label, comparison, weights a, weights b) as the paper: pre vs fine-tuned per
    source, between sources before and after fine-tuning, random vs random, and the
    config's ``analysis.cca.pairs``."""
    acfg, sources = study.config.analysis.cca, list(study.config.sources)
    ft = functools.partial(study.fine_tuned_dir, target, fold=fold)
    pairs = [(f"{s} (pre) vs {s} (fine-tuned)", "pre_vs_finetuned", study.source_dir(s), ft(s))
             for s in sources]
    between = acfg.get("between") or list(itertools.combinations(sources, 2))
    seen_pre = set()   # imagenet_frz's pre-trained weights are imagenet's: one pair, not two
    for s1, s2 in between:
        dirs = (study.source_dir(s1), study.source_dir(s2))
        if dirs[0] != dirs[1] and dirs not in seen_pre:
            seen_pre.add(dirs)
            pairs.append((f"{s1} vs {s2} (pre)", "between_sources_pre", *dirs))
        pairs.append((f"{s1} vs {s2} (fine-tuned)", "between_sources_finetuned", ft(s1), ft(s2)))
    for s in sources:
        if study.random_twin_dir(s):
            pairs.append((f"{s} vs {s} (pre)", "random_vs_random", study.source_dir(s),
                          study.random_twin_dir(s)))
    # ``analysis.cca.pairs``: more pairs, each [source, stage, source, stage] with stage
    # 'pre' or 'fine-tuned' (the paper's results/CCA_<task>.csv also has ImageNet vs
    # random, fine-tuned vs random init, and freezeFalse vs freezeTrue)
    dirs = {"pre": study.source_dir, "fine-tuned": ft}
    have = {(a, b) for _, _, a, b in pairs}
    for s1, st1, s2, st2 in acfg.get("pairs", []):
        if st1 not in dirs or st2 not in dirs:
            raise ValueError(f"analysis.cca.pairs: stage {st1!r} / {st2!r}; choose 'pre' or "
                             "'fine-tuned'")
        a, b = dirs[st1](s1), dirs[st2](s2)
        if (a, b) in have or a == b:
            continue
        have.add((a, b))
        label = (f"{s1} vs {s2} ({st1})" if st1 == st2 else f"{s1} ({st1}) vs {s2} ({st2})")
        kind = {"pre": "between_sources_pre", "fine-tuned": "between_sources_finetuned"
                }[st1] if st1 == st2 else "finetuned_vs_pre"
        pairs.append((label, kind, a, b))
    return pairs


def shuffled_null(task: tasks.SimilarityTask, pair: tasks.Pair, images: np.ndarray,
                  method: str, progress: Optional[Ticker] = None) -> Dict[str, tuple]:
    """{layer: (mean, sd)} of ``method`` on the comparison's own draws (same seed, so the
    same images, positions and channels as :func:`tasks.pair_rows`) with the rows of B
    shuffled: the chance level of exactly that comparison. One permutation per draw; the
    spread is over the ``repeats`` draws. ``progress``: throttled lines of its forward
    passes (as many as the comparison's own)."""
    a, b = act.load_model(pair.a), act.load_model(pair.b)
    layers = task.layers or resnet.stage_output_names(a.depth)
    draws = compare.make_plan(act.layer_shapes(a, images.shape[1:3], layers), len(images),
                              positions=task.positions, num_channels=task.num_channels,
                              repeats=task.repeats, seed=task.seed, spatial=task.spatial)
    pairs = compare.collect_draws(a, b, images, draws, spatial=task.spatial,
                                  preprocessing=task.preprocessing, progress=progress)
    fn = lambda x, y: float(sim.similarity(x, y, method))  # noqa: E731
    values: Dict[str, list] = {}
    for i, (d, (x, y)) in enumerate(zip(draws, pairs)):
        values.setdefault(d.layer, []).append(
            stats.null_similarity(x, y, fn, repeats=1, seed=task.seed + i)[0])
    return {l: (float(np.mean(v)), stats.mean_sd(v)[1]) for l, v in values.items()}


def _pair(label: str, wa: str, wb: str) -> tasks.Pair:
    name_a, name_b = label.split(" vs ")
    return tasks.Pair(wa, wb, label, name_a, name_b)


def compare_fold(study, target: str, fold: int,
                 items: Optional[progress.StageItems] = None) -> List[Dict[str, Any]]:
    """Rows of every CCA pair of one (target, fold): value, sd over repeats, and the
    shuffled-rows chance level of the first method. ``items``: the stage's progress,
    one line per pair (default: this fold's own)."""
    acfg = study.config.analysis.cca
    spec, preprocessing = target_stimuli(study, target, fold, acfg.num_images)
    task = tasks.SimilarityTask.from_study(acfg, spec, preprocessing)
    images = stimuli.load_pool(spec)
    pairs = cca_pairs(study, target, fold)
    if items is None:
        items = _items(study, "representations",
                       [item_name(target, fold, p[0]) for p in pairs])
    rows, method = [], task.methods[0]
    for label, kind, wa, wb in pairs:
        name = item_name(target, fold, label)
        with items.item(name) as it:
            pair = _pair(label, wa, wb)
            null = shuffled_null(task, pair, images, method, Ticker(f"{name} (chance level)"))
            pair_rows = tasks.pair_rows(task, pair, images, Ticker(name))
            it.detail = f"mean {method} " + format(
                _mean(r["value"] for r in pair_rows if r["method"] == method), ".3f")
        for r in pair_rows:
            chance = null.get(r["layer"]) if r["method"] == method else None
            r.update(comparison=kind, target=target, fold=fold,
                     repeat_sd=stats.mean_sd(r.get("values", []))[1],
                     null_mean=chance[0] if chance else float("nan"),
                     null_sd=chance[1] if chance else float("nan"))
            rows.append(r)
    return rows


#: What a stage keeps per item so that an interrupted stage resumes (workdir-relative):
#: a forced stage starts without them (runner.Study._forget).
STAGE_CACHES = {"representations": ("representations", "layer_maps", "figures/layer_maps")}


def representations(study):
    """tables/representations*.csv and one figure per target (mean over folds); one
    progress line per CCA pair (a (target, fold) whose CSV exists is skipped whole)."""
    tf = list(itertools.product(study.clean_targets, study.folds))
    csvs = {k: study.path("representations", f"{k[0]}_fold{k[1]}.csv") for k in tf}
    cached = {k: tables.read_cache(csvs[k]) for k in tf}
    names = {k: [item_name(*k, p[0]) for p in cca_pairs(study, *k)] for k in tf}
    items = _items(study, "representations", [n for k in tf for n in names[k]],
                   skip=[n for k in tf if cached[k] is not None for n in names[k]])
    all_rows = []
    for k in tf:
        if cached[k] is None:
            tables.write_csv(csvs[k], compare_fold(study, *k, items=items))
            cached[k] = tables.read_csv(csvs[k])
        all_rows += cached[k]
    tables.write_csv(study.path("tables", "representations.csv"), all_rows)
    summary = tables.summarise(all_rows, ("target", "pair", "comparison", "layer", "method"),
                               ("value", "null_mean"))
    tables.write_csv(study.path("tables", "representations_summary.csv"), summary)
    for target in study.clean_targets:
        order = list(dict.fromkeys(SIMILARITY_PANELS.values()))
        sel = [dict(r, std=r["value_sd"], panel=SIMILARITY_PANELS.get(r["comparison"], ""))
               for r in summary if r["target"] == target]
        sel.sort(key=lambda r: order.index(r["panel"]) if r["panel"] in order else len(order))
        plots.plot_layer_similarity(
            sel, study.path("figures", f"similarity_{target}.png"),
            title=f"{target} (n = {len(study.folds)} folds)", error_label="sd over folds",
            panel_key="panel")
    layer_maps(study)


# ------------------------------------------------------------------------ layer maps
def layer_map_settings(study) -> Optional[Any]:
    """``analysis.layer_maps`` of the study config, or None when it asks for no maps
    (absent, or no ``comparisons``)."""
    lm = study.config.get("analysis", {}).get("layer_maps", None)
    return lm if lm and lm.get("comparisons") else None


def map_item_name(target: str, fold: int, label: str) -> str:
    """A layer map's item name (progress line, cost model): its pair's CCA item name
    would collide with the CCA item of the same stage."""
    return item_name(target, fold, f"{label} [map]")


def map_pairs(study, lm) -> List[tuple]:
    """(item name, target, fold, label, kind, weights a, weights b) of every pair the
    study's ``analysis.layer_maps`` selects."""
    return [(map_item_name(t, f, p[0]), t, f) + tuple(p)
            for t, f in itertools.product(study.clean_targets, lm.get("folds", None)
                                          or study.folds)
            for p in cca_pairs(study, t, f) if p[1] in lm.comparisons]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def layer_map_files(target: str, fold: int, label: str,
                    methods: Sequence[str]) -> Dict[str, str]:
    """Where one pair's map goes, relative to the study's workdir:
    ``layer_maps/<target>_fold<k>/<pair>.csv`` (+ .json) and
    ``figures/layer_maps/<target>_fold<k>_<pair>_<method>.png``."""
    stem = f"{target}_fold{fold}_{_slug(label)}"
    return dict(csv=f"layer_maps/{target}_fold{fold}/{_slug(label)}.csv",
                **{f"png_{m}": f"figures/layer_maps/{stem}_{m}.png" for m in methods})


def _map_summary(rows: Sequence[Dict[str, Any]], method: str) -> Dict[str, float]:
    """Mean similarity of a map on its diagonal (same layer) and off it."""
    sel = [r for r in rows if r["method"] == method]
    diag = [float(r["value"]) for r in sel if r["layer_a"] == r["layer_b"]]
    off = [float(r["value"]) for r in sel if r["layer_a"] != r["layer_b"]]
    return dict(diagonal_mean=float(np.mean(diag)) if diag else float("nan"),
                off_diagonal_mean=float(np.mean(off)) if off else float("nan"),
                layers=len({r["layer_a"] for r in sel}),
                images=int(sel[0]["images"]) if sel else 0)


def _layer_map_pair(study, lm, methods, target_fold, pair_spec, where, pools) -> None:
    """Computes and writes one pair's map; ``pools`` keeps the stimuli of the last
    (target, fold), loaded once for its pairs."""
    if target_fold not in pools:
        spec, preprocessing = target_stimuli(study, *target_fold,
                                             int(lm.get("num_images", 128)))
        pools.clear()
        pools[target_fold] = spec, preprocessing, stimuli.load_pool(spec)
    spec, preprocessing, images = pools[target_fold]
    label, wa, wb = pair_spec
    pair = _pair(label, wa, wb)
    task = tasks.LayerMapTask(
        wa, wb, spec, name_a=pair.name_a, name_b=pair.name_b, methods=methods,
        spatial=lm.get("spatial", "pool"), max_channels=lm.get("max_channels"),
        preprocessing=preprocessing, seed=int(lm.get("seed", 0)))
    lmap = tasks.layer_map_of(task, images, Ticker(map_item_name(*target_fold, label)))
    tasks.write_layer_map(lmap, where["csv"],
                          {m: where[f"png_{m}"] for m in methods})


def layer_maps(study) -> List[Dict[str, Any]]:
    """Layer x layer maps (``analysis.layer_maps``: ``comparisons`` = pair kinds of
    :func:`cca_pairs`, ``methods``, ``num_images``, ``spatial``, ``max_channels``,
    ``folds``) of every selected pair of each clean (target, fold): a CSV and one heatmap
    per method each (pairs whose files exist are skipped), and ``tables/layer_maps.csv``
    listing them (paths relative to the workdir)."""
    lm = layer_map_settings(study)
    if lm is None:
        return []
    methods = tuple(lm.get("methods", None) or layer_map_lib.DEFAULT_MAP_METHODS)
    pairs = map_pairs(study, lm)
    files = {n: layer_map_files(t, f, label, methods) for n, t, f, label, *_ in pairs}
    where = {n: {k: study.path(*f.split("/")) for k, f in fs.items()}
             for n, fs in files.items()}
    done = {n for n in where if all(paths.exists(f) for f in where[n].values())
            and tables.read_cache(where[n]["csv"]) is not None}
    items, pools, index = _items(study, "layer maps", list(where), skip=done), {}, []
    for name, target, fold, label, kind, wa, wb in pairs:
        if name not in done:
            with items.item(name) as it:
                _layer_map_pair(study, lm, methods, (target, fold), (label, wa, wb),
                                where[name], pools)
                it.detail = f"diagonal {methods[0]} " + format(_map_summary(
                    tables.read_csv(where[name]["csv"]), methods[0])["diagonal_mean"], ".3f")
        rows = tables.read_csv(where[name]["csv"])
        index += [dict(target=target, fold=fold, pair=label, comparison=kind, method=m,
                       **_map_summary(rows, m), csv=files[name]["csv"],
                       png=files[name][f"png_{m}"]) for m in methods]
    tables.write_csv(study.path("tables", "layer_maps.csv"), index)
    return index


# ----------------------------------------------------------------------- predictions
def _pre_vs_ft(sim_rows, target, fold, source, method) -> Dict[str, float]:
    return {r["layer"]: r["value"] for r in sim_rows
            if r["target"] == target and r["fold"] == fold and r["method"] == method
            and r["pair"] == f"{source} (pre) vs {source} (fine-tuned)"}


def _predictions_fold(study, target, fold, mode, sim_rows, method) -> tuple:
    """(prediction-similarity rows of every source pair, AUC-gain records vs random) of
    one (target, fold)."""
    sources = list(study.config.sources)
    split = "test" if mode == "corrected" else None   # None: the mode's own split
    files = {s: paths.to_str(paths.join(study.fine_tuned_dir(target, s, fold=fold,
                                                              export=False),
                                         "predictions.csv")) for s in sources}
    rows, gain_records = [], []
    for s1, s2 in itertools.combinations(sources, 2):
        r = pred.compare_prediction_files(files[s1], files[s2], split=split, mode=mode)
        rows.append(dict(target=target, fold=fold, pair=f"{s1} vs {s2}", model_a=s1,
                         model_b=s2, mode=mode, **r))
    if "random" not in files:
        return rows, gain_records
    for s in sources:
        per_layer = _pre_vs_ft(sim_rows, target, fold, s, method)
        if s != "random" and per_layer:
            r = pred.compare_prediction_files(files[s], files["random"], split=split,
                                              random_path=files["random"], mode=mode)
            gain_records.append(dict(auc=r["auc_a"], auc_random=r["auc_random"],
                                     similarity=per_layer, source=s, target=target,
                                     fold=fold))
    return rows, gain_records


def predictions(study):
    """Prediction similarity per source pair (n = images of the mode's split: test, or
    the paper's val) and AUC gain vs CCA per source; one progress line per target (its
    folds' pairs)."""
    if not study.clean_targets:
        return
    sim_rows = tables.read_csv_if(study.path("tables", "representations.csv"))
    method = study.config.analysis.cca.methods[0]
    rows, gain_records = [], []
    # 'paper' reproduces the published similarity.csv (Feb-2023)
    modes = {t: (_probe_config(study, t).get("analysis", None) or {}).get(
        "similarity_mode", "corrected") for t in study.clean_targets}
    items = _items(study, "predictions", study.clean_targets)
    for target in study.clean_targets:
        with items.item(target) as it:
            for fold in study.folds:
                r, g = _predictions_fold(study, target, fold, modes[target], sim_rows, method)
                rows += r
                gain_records += g
            it.detail = "mean kappa " + format(_mean(
                r["cohen_kappa"] for r in rows if r["target"] == target), ".3f")
    tables.write_csv(study.path("tables", "prediction_similarity.csv"), rows)
    summary = tables.summarise(rows, ("target", "pair", "mode", "split"), (
        "observed", "expected_independent", "excess", "agreement", "cohen_kappa",
        "prob_correlation", "n"))
    tables.write_csv(study.path("tables", "prediction_similarity_summary.csv"), summary)
    if summary:
        plots.plot_prediction_similarity(
            summary, study.path("figures", "prediction_similarity.png"), panel_key="target",
            folds=rows if option(study, "fold_plot") == "box" else None)
    if len(gain_records) >= 2:
        gain_rows = pred.auc_gain_vs_similarity(gain_records)
        tables.write_csv(study.path("tables", "auc_gain_vs_similarity.csv"), gain_rows)
        plots.plot_auc_vs_similarity(gain_rows, study.path("figures", "auc_gain_vs_cca.png"),
                                     method=method)


# --------------------------------------------------------------------------- filters
def filter_models(study, tf) -> List[str]:
    """The weights dirs the filters stage compares: each source's pre-trained weights
    (once, however many sources share them) and every clean fine-tuned run's."""
    return list(dict.fromkeys(
        [study.source_dir(s) for s in study.config.sources]
        + [study.fine_tuned_dir(t, s, fold=f) for s in study.config.sources for t, f in tf]))


def basis_item_name(n_models: int) -> str:
    return f"PCA basis of {n_models} models"


def study_filter_basis(study, dirs: Sequence[str]) -> filters.FilterBasis:
    """One basis over ``dirs``' 3x3 filters, two streamed passes (one model in memory at a
    time); written to ``tables/filter_basis.json`` with the models it was fitted on."""
    basis = filters.fit_basis_of_weights(dirs)
    tables.write_json(study.path("tables", "filter_basis.json"),
                      dict(basis.to_json(), models=list(dirs)))
    return basis


def _conv1(variables) -> Optional[np.ndarray]:
    """The stem's kernel (HWIO), the layer Revisiting's ``filter_plot.py`` draws."""
    return variables["params"].get("conv1_conv", {}).get("kernel")


def _filter_pair(pre, ft, labels, basis=None):
    """Drift and layer rows of one (pre-trained, fine-tuned) pair, in ``basis`` (default:
    the pair's own)."""
    rep = filters.analyse_filters({labels[0]: pre["params"], labels[1]: ft["params"]},
                                  basis=basis)
    return rep.drift_rows, rep.layer_rows


def filters_stage(study):
    """Filter KL drift (with noise floor), sparsity, variance entropy, weight change."""
    if not study.config.targets:
        return filters_of_sources(study)
    drift, layers, change = [], [], []
    tf = list(itertools.product(study.clean_targets, study.folds))
    shared = option(study, "filters.basis") == "study" and bool(tf)   # no pairs: no basis
    dirs = filter_models(study, tf) if shared else []
    names = [item_name(t, f, s) for s in study.config.sources for t, f in tf]
    items = _items(study, "filters", ([basis_item_name(len(dirs))] if shared else []) + names)
    basis, basis_file = None, study.path("tables", "filter_basis.json")
    if shared:
        with items.item(basis_item_name(len(dirs))) as it:
            basis = study_filter_basis(study, dirs)
            it.detail = f"{basis.num_filters:,} filters"
    elif paths.exists(basis_file):
        tables.remove(basis_file)   # a stale one would caption these drifts
    pre_of: Dict[str, str] = {}   # pre-trained weights dir -> the first source starting there
    for s in study.config.sources:
        pre, _ = checkpoint.load_weights(study.source_dir(s))
        twin = pre_of.setdefault(study.source_dir(s), s)
        conv1 = {f"{s}: pre-trained": _conv1(pre)}
        for target, fold in tf:
            with items.item(item_name(target, fold, s)) as it:
                ft, _ = checkpoint.load_weights(study.fine_tuned_dir(target, s, fold=fold))
                if fold == study.folds[0]:
                    conv1[f"fine-tuned: {target} fold{fold}"] = _conv1(ft)
                keys = dict(source=s, target=target, fold=fold)
                d, l = _filter_pair(pre, ft, (f"{s}:pre", f"{s}:fine-tuned"), basis)
                c = [dict(r, **keys) for r in weight_change.weight_change(pre, ft)]
                it.detail = "mean relative weight change " + format(
                    _mean(r["rel_l2"] for r in c if r["status"] == "ok"), ".3f")
            drift += [dict(r, comparison="pre_vs_finetuned", **keys) for r in d]
            # a frozen variant's pre-trained filters are its twin's: listed once
            layers += [dict(r, **keys) for r in l
                       if twin == s or r["model"] != f"{s}:pre"]
            change += c
        if len(conv1) > 1 and all(k is not None for k in conv1.values()):
            plots.plot_first_layer_filters(conv1, study.path("figures", f"conv1_filters_{s}.png"))
    tables.write_csv(study.path("tables", "filter_drift.csv"), drift)
    tables.write_csv(study.path("tables", "filter_layers.csv"), layers)
    tables.write_csv(study.path("tables", "weight_change.csv"), change)
    _filter_figures(study, drift, layers, change)


def _filter_figures(study, drift, layers, change):
    fig = functools.partial(study.path, "figures")
    by_depth = tables.summarise([r for r in drift if r["scope"] == "depth_bin"],
                                ("source", "key"), ("drift", "noise_floor"))
    tables.write_csv(study.path("tables", "filter_drift_summary.csv"), by_depth)
    if by_depth:
        plots.plot_depth_drift(by_depth, fig("filter_kl_drift.png"))
    per_layer = tables.summarise(layers, ("model", "layer"), ("sparsity", "variance_entropy"))
    tables.write_csv(study.path("tables", "filter_layers_summary.csv"), per_layer)
    if per_layer:
        plots.plot_layer_statistics(per_layer, fig("filter_layer_statistics.png"))
    for s in dict.fromkeys(r["source"] for r in change):
        sel = [r for r in change if r["source"] == s]
        mean_rows = tables.summarise(sel, ("layer", "kind", "status"), ("rel_l2", "cosine"))
        runs = len({(r.get("target"), r.get("fold")) for r in sel})
        start = ("its random initialisation" if study.config.sources.get(s, {}).get("kind")
                 == "random" else "pre-trained")
        plots.plot_weight_change(mean_rows, fig(f"weight_change_{s}.png"), title=(
            f"{s}: a = {start}, b = fine-tuned weights (mean over {runs} runs)"))


def filters_of_sources(study):
    """The Gavrikov analyses over the sources only (no fine-tuning): one PCA basis over
    every model, drifts between ``analysis.filters.groups`` (default: each model)."""
    models = {s: checkpoint.load_weights(study.source_dir(s))[0]["params"]
              for s in study.config.sources}
    conv1 = {s: _conv1({"params": p}) for s, p in models.items()}
    if all(k is not None for k in conv1.values()):
        plots.plot_first_layer_filters(conv1, study.path("figures", "conv1_filters.png"))
    groups = option(study, "filters.groups") or None
    rep = filters.analyse_filters({k: v for k, v in models.items()},
                                  groups=dict(groups) if groups else None)
    tables.write_csv(study.path("tables", "filter_drift.csv"), rep.drift_rows)
    tables.write_csv(study.path("tables", "filter_layers.csv"), rep.layer_rows)
    plots.plot_kl_drift(rep.drift_rows, study.path("figures", "filter_kl_drift.png"),
                        scope="depth_bin")
    plots.plot_layer_statistics(rep.layer_rows, study.path("figures",
                                                           "filter_layer_statistics.png"))
    units = list(groups) if groups else list(models)
    plots.plot_filter_histograms(rep.histograms, rep.bin_edges(),
                                 study.path("figures", "filter_histograms.png"),
                                 keys=[(u, "all") for u in units],
                                 explained=rep.pca.explained_variance_ratio)


# ------------------------------------------------------------------------ robustness
def robustness_row(run, auc_name: str, trained: bool) -> Dict[str, Any]:
    """AUC (``auc_name``, the study's ``analysis.auc_metric``: Source Matters reported
    Keras' ``AUC()``) and test-set size on the i.i.d., clean and o.o.d. tests of one run
    (NaN for a run that diverged or failed). Once the fine-tuning stage is done
    (``trained``) every run has results, so a missing or damaged results.json (or a done
    one without the three tests) is an error naming it: NaN rows would quietly shrink the
    means over folds."""
    res = sweep.read_results(run.workdir)
    extra = (res or {}).get("extra_tests", {}) if (res or {}).get("status") == "done" else {}
    if trained and (res is None or (res.get("status") == "done"
                                    and not all(t in extra for t in TESTS))):
        raise tables.damaged(paths.join(run.workdir, "results.json"),
                             "missing, unreadable, or without the i.i.d./clean/o.o.d. tests",
                             stage="finetune,robustness")
    row = dict(run.keys, auc_metric=auc_name)
    for name in TESTS:
        row[f"auc_{name}"] = extra.get(name, {}).get(auc_name, float("nan"))
        row[f"n_{name}"] = extra.get(name, {}).get("num_examples", float("nan"))
    row["drop_iid_to_ood"] = row["auc_iid"] - row["auc_ood"]
    row["drop_clean_to_ood"] = row["auc_clean"] - row["auc_ood"]
    return row


def robustness_marks(tests: Sequence[Dict[str, Any]]) -> Dict[tuple, str]:
    """(target, confounder, p, test set) -> its stars: the mark alone when one pair of
    sources was tested, else each significant pair named ('imagenet/random **')."""
    by: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in tests:
        by.setdefault((r["target"], r["confounder"], r["p"], r["test"]), []).append(r)
    return {k: (rs[0]["mark"] if len(rs) == 1 else " ".join(
        f"{r['source_a']}/{r['source_b']} {r['mark']}" for r in rs if r["mark"]))
            for k, rs in by.items()}


def robustness_tests(rows, sources, test_sets: Sequence[str] = TESTS) -> List[Dict[str, Any]]:
    """Source Matters' permutation t-test between every two sources per (target,
    confounder, p, test set in ``test_sets``), over folds."""
    out = []
    settings = dict.fromkeys((r["target"], r["confounder"], r["p"]) for r in rows)
    for (target, kind, p), test in itertools.product(settings, test_sets):
        sel = [r for r in rows if (r["target"], r["confounder"], r["p"]) == (target, kind, p)]
        for a, b in itertools.combinations(sources, 2):
            xa = [r[f"auc_{test}"] for r in sel if r["source"] == a]
            xb = [r[f"auc_{test}"] for r in sel if r["source"] == b]
            t, pv = stats.permutation_ttest_ind(xa, xb)
            out.append(dict(target=target, confounder=kind, p=p, test=test, source_a=a,
                            source_b=b, t=t, p_value=pv, mark=stats.significance_mark(pv),
                            n_a=len(xa), n_b=len(xb)))
    return out


def robustness(study):
    """tables/robustness*.csv (+ tests) and the AUC-vs-p figure with significance marks."""
    runs = [run for run in study.finetune_runs() if run.keys["confounder"] != "none"]
    targets, rows = list(dict.fromkeys(run.keys["target"] for run in runs)), []
    items = _items(study, "robustness", targets)
    for target in targets:   # one progress line per target (its runs)
        with items.item(target) as it:
            rows += [robustness_row(run, _auc_name(study), study.is_done("finetune"))
                     for run in runs if run.keys["target"] == target]
            it.detail = "mean AUC drop i.i.d. -> o.o.d. " + format(_mean(
                r["drop_iid_to_ood"] for r in rows if r["target"] == target), ".3f")
    tables.write_csv(study.path("tables", "robustness.csv"), rows)
    keys = ("target", "source", "confounder", "p")
    summary = tables.summarise(rows, keys, [f"auc_{t}" for t in TESTS]
                               + [f"n_{t}" for t in TESTS] + ["drop_iid_to_ood"])
    for row in summary:   # the 95 % bootstrap CI of each mean over folds (Source Matters' band)
        sel = [r for r in rows if all(r[k] == row[k] for k in keys)]
        for t in TESTS:
            row[f"auc_{t}_ci_low"], row[f"auc_{t}_ci_high"] = stats.bootstrap_mean_ci(
                [r[f"auc_{t}"] for r in sel])
    tables.write_csv(study.path("tables", "robustness_summary.csv"), summary)
    pairs = option(study, "compare_sources") or [
        s for s in study.config.sources if s != "random"]
    tests = robustness_tests(rows, list(pairs), option(study, "robustness_test_sets"))
    tables.write_csv(study.path("tables", "robustness_tests.csv"), tests)
    if summary:
        plots.plot_robustness(summary, study.path("figures", "robustness.png"),
                              marks=robustness_marks(tests), metric=_auc_name(study),
                              errorbar=option(study, "robustness_errorbar"),
                              compared=", ".join(dict.fromkeys(
                                  f"{r['source_a']} vs {r['source_b']}" for r in tests)))
