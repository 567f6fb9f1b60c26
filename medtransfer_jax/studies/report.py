"""The study report: ``report.md`` and ``report.html`` (figures embedded) from the tables.

Built from a list of blocks (heading, paragraph, table, figure) rendered twice, so the
Markdown and the HTML page always say the same thing. Everything comes from the CSV
tables the stages wrote, so the report can be rebuilt alone (``--stages=report``) at any
time, also mid-study (it then shows what exists).

The page reads top-down as a reader needs it: what was run; the headline table (test
AUC per target and source, mean ± sample sd over folds, folds and test images, with the
paired comparison of sources); how it compares with the published numbers; the figures;
then the details (per-run CIs, similarity tables with their chance levels, prediction
similarity, filters, robustness tests).
"""
from __future__ import annotations

import base64
import datetime
import html
import math
from typing import Any, Dict, List, Sequence, Tuple

from medtransfer_jax import paths
from medtransfer_jax.analysis import plots
from medtransfer_jax.analysis import predictions as pred_lib
from medtransfer_jax.studies import analyses, published, tables

TEST_WORDS = {"iid": "i.i.d.", "clean": "clean", "ood": "o.o.d."}
#: The AUC a table holds, in words.
AUC_WORDS = {"auc": "ROC AUC: binary, or one-vs-rest macro",
             "auc_keras": "Keras AUC(): one-hot micro, 200 thresholds, as the papers "
                          "reported it",
             "auc_ovr_weighted": "one-vs-rest ROC AUC weighted by class frequency, as the "
                                 "Feb-2023 scripts",
             "auc_micro": "micro-averaged ROC AUC"}

Block = Tuple[str, Any]


#: Columns that hold counts (folds, images): printed as integers, never as '1.000'.
COUNT_COLUMNS = {"n", "n_rows", "n_a", "n_b", "value_n", "ours_n", "theirs_n",
                 "test.num_examples", "n_iid", "n_clean", "n_ood"}


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _cell(col: str, v: Any) -> Any:
    if col in COUNT_COLUMNS and isinstance(v, float) and math.isfinite(v):
        return int(round(v))
    return v


def mean_sd_cell(mean: float, sd: float, n: Any, unit: str = "folds") -> str:
    """'0.912 ± 0.013 (5 folds)'; the ± is the sample sd (ddof=1), omitted for n = 1."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    n = int(n) if isinstance(n, (int, float)) and not math.isnan(n) else n
    spread = f" ± {sd:.3f}" if isinstance(sd, float) and math.isfinite(sd) else ""
    return f"{mean:.3f}{spread} ({n} {unit[:-1] if n == 1 else unit})"


def auc_table(summary: Sequence[Dict[str, Any]], sources: Sequence[str],
              metric: str = "test.auc") -> Tuple[List[str], List[List[str]]]:
    """The Revisiting table: one row per target, one column per source, mean ± sd over
    folds of ``metric`` (clean runs), and the test-set size per fold."""
    clean = [r for r in summary if r.get("confounder", "none") in ("none", "")]
    header = ["target"] + list(sources) + ["test images / fold"]
    rows = []
    for t in dict.fromkeys(r["target"] for r in clean):
        by_src = {r["source"]: r for r in clean if r["target"] == t}
        line = [t] + [mean_sd_cell(by_src[s][metric], by_src[s][f"{metric}_sd"],
                                   by_src[s][f"{metric}_n"]) if s in by_src else "n/a"
                      for s in sources]
        sizes = sorted({int(r["test.num_examples"]) for r in by_src.values()
                        if isinstance(r.get("test.num_examples"), float)
                        and math.isfinite(r["test.num_examples"])})
        rows.append(line + [", ".join(map(str, sizes)) or "n/a"])
    return header, rows


def render_markdown(blocks: Sequence[Block], root: str) -> str:
    out = []
    for kind, val in blocks:
        if kind == "h1":
            out.append(f"# {val}\n")
        elif kind == "h2":
            out.append(f"## {val}\n")
        elif kind == "p":
            out.append(f"{val}\n")
        elif kind == "table":
            header, rows = val
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
            out.append("")
        elif kind == "img":
            path, caption = val
            out.append(f"![{caption}]({paths.relpath(path, root)})\n")
    return "\n".join(out)


def render_html(blocks: Sequence[Block], title: str) -> str:
    """A self-contained page: figures are embedded as base64 PNG."""
    body = []
    for kind, val in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(val)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(val)}</p>")
        elif kind == "table":
            header, rows = val
            cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r)
                          + "</tr>" for r in rows)
            body.append(f"<div class='scroll'><table><thead><tr>{cells}</tr></thead><tbody>"
                        f"{trs}</tbody></table></div>")
        elif kind == "img":
            path, caption = val
            data = base64.b64encode(paths.read_bytes(path)).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="'
                        f'{html.escape(caption)}"><figcaption>{html.escape(caption)}'
                        "</figcaption></figure>")
    # Wide tables scroll inside their own box and figures shrink to the page, so nothing
    # pushes the page wider than the window (checked in headless Chromium by the tests).
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;}"
             ".scroll{overflow-x:auto;max-width:100%;}"
             "table{border-collapse:collapse;margin:1em 0;font-size:90%;}td,th{border:1px "
             "solid #bbb;padding:3px 8px;text-align:right;}th{background:#eee;}"
             "img{max-width:100%;height:auto;}figure{margin:1em 0;}"
             "figcaption{font-size:90%;color:#444;}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>")


def _table(rows: Sequence[Dict[str, Any]], cols: Sequence[str],
           names: Sequence[str] = ()) -> Tuple[List[str], List[list]]:
    return list(names or cols), [[_cell(c, r.get(c, "")) for c in cols] for r in rows]


def similarity_pivot(rows: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[list]]:
    """One row per (target, pair, method), one column per layer: 'mean ± sd [chance]'."""
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    keyed: Dict[tuple, Dict[str, Any]] = {}
    for r in rows:
        cell = mean_sd_cell(r.get("value"), r.get("value_sd"), r.get("value_n"))
        if isinstance(r.get("null_mean"), float) and math.isfinite(r["null_mean"]):
            cell += f" [chance {r['null_mean']:.3f}]"
        keyed.setdefault((r["target"], r["pair"], r["method"]), {})[r["layer"]] = cell
    header = ["target", "pair", "method"] + layers
    return header, [list(k) + [cells.get(l, "") for l in layers] for k, cells in keyed.items()]


def datapoints_row(header: Sequence[str], rows: Sequence[Dict[str, Any]]) -> list:
    """The pivot's last row: each layer's datapoints × channels (the fewest over the
    per-fold rows, ``representations.csv``), so a reader sees where n is small."""
    cells = []
    for layer in header[3:]:
        sel = [r for r in rows if r.get("layer") == layer]
        dp = [r["datapoints"] for r in sel if _finite(r.get("datapoints"))]
        ch = [r["channels"] for r in sel if _finite(r.get("channels"))]
        cells.append(f"{int(min(dp))} × {int(min(ch))}" if dp and ch else "")
    return ["", "datapoints × channels", ""] + cells


def _finite(v) -> bool:
    """A finite number of a table read back (tables.read_csv makes numbers floats)."""
    return isinstance(v, float) and math.isfinite(v)


class _Page:
    """Collects blocks; figure() adds an image only if its file exists."""

    def __init__(self, study):
        self.study, self.blocks = study, []

    def add(self, kind: str, val: Any):
        self.blocks.append((kind, val))

    def table(self, name: str) -> List[Dict[str, Any]]:
        return tables.read_csv_if(self.study.path("tables", name))

    def figure(self, name: str, caption: str):
        path = self.study.path("figures", name)
        if paths.exists(path):
            self.add("img", (path, caption))


def source_words(spec, twin: bool = False) -> str:
    """A source in a sentence: the config's ``about`` if it has one, else from its kind."""
    if spec.get("about"):
        return str(spec.about)
    if spec.get("weights_of"):
        frozen = "freeze=true" in str(spec.get("arg", ""))
        return (f"{spec.weights_of}'s weights" + (", fine-tuned with the base frozen first "
                                                  "(head, then everything)" if frozen else ""))
    kind = spec.get("kind")
    if kind == "convert":
        return f"converted from the {spec.format} file {paths.basename(str(spec.input))}"
    if kind == "weights":
        return f"the weights in {spec.path}"
    if kind == "pretrain":
        return f"pre-trained in this study ({paths.basename(str(spec.config))})"
    seed = int(spec.get("seed", 0))
    return (f"a random initialisation (seed {seed})"
            + (f"; 'random vs random' compares it with a second one (seed {seed + 1})"
               if twin else ""))


def _has_twin(study, name: str) -> bool:
    twin = getattr(study, "random_twin_dir", None)   # not every study-like object has it
    return bool(twin and twin(name))


def _what_was_run(page: _Page, runs: List[Dict[str, Any]]):
    cfg, study = page.study.config, page.study
    page.add("h1", f"Study report: {cfg.get('name', 'study')}")
    page.add("h2", "What was run")
    done = sum(r.get("status") == "done" for r in runs)
    stages = [s for s in ("sources", "finetune", "representations", "predictions", "filters",
                          "robustness") if paths.exists(study.path("stages", f"{s}.done"))]
    page.add("p", f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
                  f" in {study.workdir}. Sources: {', '.join(cfg.sources)}; targets: "
                  f"{', '.join(cfg.targets) or 'none'}; folds: {list(cfg.folds)}; model: "
                  + (f"ResNet{cfg.model.depth} (width {cfg.model.width}, {cfg.model.layout}). "
                     if cfg.targets else "each source's own (no fine-tuning). ")
                  + (f"Fine-tuning runs finished: {done} of {len(runs)}. " if runs else
                     "No fine-tuning runs recorded yet. ")
                  + f"Stages done: {', '.join(stages) or 'none'}.")
    page.add("p", "Where each source's weights came from: " + "; ".join(
        f"**{name}**: {source_words(spec, _has_twin(study, name))}"
        for name, spec in cfg.sources.items()) + ".")


def _headline(page: _Page, auc: str, summary: List[Dict[str, Any]]):
    sources = list(page.study.config.sources)
    page.add("h2", f"Headline: test AUC ({AUC_WORDS.get(auc, auc)}), mean ± sample sd over "
                   "folds")
    if not page.study.config.targets:
        page.add("p", "This study fine-tunes nothing: it compares the sources' 3×3 filters "
                      "(figures below).")
        return
    if not summary:
        page.add("p", "No fine-tuning results yet.")
        return
    if not any(r.get("confounder", "none") in ("none", "") for r in summary):
        _robustness_headline(page)
        return
    page.add("table", auc_table(summary, sources, f"test.{auc}"))
    comp = page.table("source_comparisons.csv")
    if comp:
        page.add("p", "Sources compared per target on the same folds: mean difference of "
                      "test AUC (a − b), paired t-test p and exact sign-flip permutation p "
                      "(with n folds the smallest possible permutation p is 2/2^n).")
        page.add("table", _table(comp, ("target", "source_a", "source_b", "n", "mean_diff",
                                        "sd_diff", "p_t", "p_perm"),
                                 ("target", "a", "b", "folds", "mean diff", "sd diff",
                                  "p (t)", "p (perm.)")))
    page.figure("auc.png", "Test AUC per target and source; " + (
        plots.BOX_WORDS + " (analysis.fold_plot=box, the paper's figure)"
        if analyses.option(page.study, "fold_plot") == "box" else "error bars: sample sd over folds") + ".")


def _robustness_headline(page: _Page):
    """Source Matters-style studies (every run confounded): AUC per test set and p."""
    summ = page.table("robustness_summary.csv")
    page.add("p", "Every run carries a confounder: test AUC on the i.i.d. / clean / o.o.d. "
                  "tests per source and artefact fraction p (mean ± sample sd over folds).")
    header = ["target", "confounder", "p", "source"] + [f"{t} AUC" for t in
                                                        ("i.i.d.", "clean", "o.o.d.")]
    rows = [[r["target"], r["confounder"], r["p"], r["source"]] + [
        mean_sd_cell(r[f"auc_{t}"], r[f"auc_{t}_sd"], r[f"auc_{t}_n"]) + (
            f", n={int(r[f'n_{t}'])} img" if isinstance(r.get(f"n_{t}"), float)
            and math.isfinite(r[f"n_{t}"]) else "") for t in ("iid", "clean", "ood")]
            for r in summ]
    page.add("table", (header, rows))


def _published(page: _Page, auc: str, summary):
    kind = page.study.config.get("published", "")
    protocol = page.study.config.get("protocol", "")
    rows = published.compare(kind, summary, f"test.{auc}",
                             page.table("representations_summary.csv"),
                             page.table("robustness_summary.csv"), protocol=protocol)
    page.add("h2", "Compared with the published numbers")
    why_not = published.protocol_mismatch(kind, protocol)
    if why_not:
        page.add("p", f"Nothing to compare: {why_not}.")
        return
    if not rows:
        page.add("p", "Nothing to compare: this study declares no published setup it "
                      f"matches (published={kind!r}; its targets/sources are not the papers')."
                      if not kind else f"Nothing to compare yet: no finished result matches a "
                      f"published {kind} number.")
        return
    page.add("p", "diff in fold sd = (ours − theirs) / sqrt((sd_ours² + sd_theirs²)/2); "
                  "|z| ≲ 1 is within fold-to-fold variation. Source: "
                  + published.load()[kind]["source"])
    page.add("table", _table(rows, ("quantity", "key", "ours", "ours_sd", "ours_n", "theirs",
                                    "theirs_sd", "theirs_n", "diff", "diff_in_fold_sd"),
                             ("quantity", "what", "ours", "sd", "n", "theirs", "sd", "n",
                              "diff", "diff (fold sd)")))


def _figures(page: _Page):
    cfg = page.study.config
    page.add("h2", "Figures")
    for t in cfg.targets:
        page.figure(f"similarity_{t}.png",
                    f"{t}: representation similarity per layer (Keras layer names) for each "
                    "pair, one row of panels per kind of pair; a pair before and after "
                    "fine-tuning shares its colour (solid: pre-trained, dashed: fine-tuned); "
                    "'random vs random (pre)' compares two independent random inits, the "
                    "level at which two unrelated networks already agree; error bars: "
                    "sample sd over folds; grey dotted: chance level (shuffled rows), the "
                    "highest over the pairs at each layer, where the method has one (the CCA "
                    "methods).")
    pred_rows = page.table("prediction_similarity_summary.csv")
    splits = "/".join(dict.fromkeys(str(r.get("split") or "test") for r in pred_rows)) or "test"
    baselines = "; ".join(pred_lib.BASELINES.get(m, m) for m in dict.fromkeys(
        str(r.get("mode") or "corrected") for r in pred_rows)) or pred_lib.BASELINES["corrected"]
    page.figure("prediction_similarity.png",
                f"Prediction similarity on the {splits} split vs the independent-errors "
                f"baseline {baselines}; " + (
                    plots.BOX_WORDS if analyses.option(page.study, "fold_plot") == "box"
                    else "mean over folds, error bars: sample sd over folds") + ". "
                "The baseline comes from the accuracies alone: two models that each predict "
                "one class agree far above it; Cohen's κ in the table corrects for the "
                "predicted-class rates (with 2 classes, both right or both wrong is the "
                "same as predicting the same class).")
    page.figure("auc_gain_vs_cca.png", "Relative AUC gain over random init, (AUC − "
                                       "AUC_random)/AUC_random, vs similarity pre/fine-tuned "
                                       "per layer; one row of panels per source, one point per "
                                       "run coloured by target; grey: that source's "
                                       "least-squares line (as the paper fits each source).")
    bars = ("95 % bootstrap CI of the mean over folds (as Source Matters' figures)"
            if analyses.option(page.study, "robustness_errorbar") == "ci95"
            else "sample sd over folds")
    sets = analyses.option(page.study, "robustness_test_sets")
    tested = (f"on the {' and '.join(TEST_WORDS.get(t, t) for t in sets)} test"
              if set(sets) != set(analyses.TESTS) else "on each test set")
    page.figure("robustness.png", "AUC vs artefact fraction p per source (colour) and test set "
                                  f"(line style and marker); error bars: {bars}; series "
                                  "shifted slightly sideways so bars at one p stay apart; "
                                  f"stars: permutation t-test between sources {tested} "
                                  "(* p<.05, ** p<.01; with k folds per source no p is below "
                                  "2/C(2k, k): 0.33 with 2 folds, 0.008 with 5).")
    if cfg.targets:
        page.figure("filter_kl_drift.png", "3×3 filter KL drift pre vs fine-tuned by depth "
                                           "bin (CNN-Filter-DB definition); dotted: noise "
                                           f"floor; {_filter_basis_words(page)}.")
    else:
        page.figure("filter_kl_drift.png", "3×3 filter KL drift between the sources by depth "
                                           "bin (CNN-Filter-DB definition).")
        page.figure("filter_histograms.png", "Distribution of each of the 9 PCA coefficients "
                                             "of the sources' 3×3 filters (shared basis).")
    page.figure("filter_layer_statistics.png", "Sparsity (the fraction of a layer's 3×3 "
                                               "filters whose 9 weights are all below 1 % of "
                                               "the layer's largest |weight|) and variance "
                                               "entropy (how evenly the filters' variance "
                                               "spreads over the 9 directions: 0 = one "
                                               "direction, 0.954 = evenly over all 9, as "
                                               "random filters do) per layer.")
    how = ("as Revisiting's filter_plot.py draws them: its first 36 filters (fewer if the "
           "stem has fewer) of input channel 0, each panel min-max scaled over its whole "
           "kernel (black: its smallest weight, white: its largest)")
    if cfg.targets:
        for s in cfg.sources:
            page.figure(f"conv1_filters_{s}.png", f"{s}: the 7×7 stem filters (conv1_conv) "
                                                  "before and after fine-tuning on each "
                                                  f"target (first fold), {how}.")
    else:
        page.figure("conv1_filters.png", f"The 7×7 stem filters (conv1_conv) of each source, "
                                         f"{how}.")
    for s in cfg.sources:
        page.figure(f"weight_change_{s}.png", f"{s}: relative L2 change and cosine per layer, "
                                              "pre-trained vs fine-tuned (mean over runs).")


def _images_used(index, lm) -> str:
    """'38 images' as the maps used them (a split smaller than analysis.layer_maps.
    num_images gives all it has), from the index rows."""
    used = sorted({int(float(r["images"])) for r in index if r.get("images") not in (None, "")})
    if not used:
        return f"up to {lm.get('num_images', '?')} images"
    asked = lm.get("num_images")
    tail = (f" (analysis.layer_maps.num_images={asked}; the split has fewer)"
            if asked and max(used) < int(asked) else "")
    n = str(used[0]) if len(used) == 1 else f"{used[0]} to {used[-1]}"
    return f"{n} images{tail}"


def _layer_maps(page: _Page):
    """The layer x layer maps of the representations stage (``analysis.layer_maps``): one
    line per (target, fold, pair, method) with its files; the first fold's maps shown."""
    index = [dict(r, fold=int(r["fold"])) for r in page.table("layer_maps.csv")]
    if not index:
        return
    page.add("h2", "Layer × layer maps")
    lm = page.study.config.get("analysis", {}).get("layer_maps", {})
    folds = sorted({r["fold"] for r in index})
    datapoints = ("spatially pooled features (one datapoint per image)"
                  if lm.get("spatial") == "pool" else "features on a common spatial grid")
    page.add("p", "Every block output of A against every block output of B on the "
                  "target's stimuli (tables under layer_maps/, heatmaps under "
                  "figures/layer_maps/): the diagonal compares the same layer; bright "
                  "off-diagonal cells are layers of B that represent a layer of A. "
                  f"Computed on {_images_used(index, lm)} with "
                  f"{datapoints}, for fold(s) {', '.join(map(str, folds))} "
                  "(analysis.layer_maps.folds): not the same datapoints as the similarity "
                  "table above (spatial positions), so the two need not agree on a layer's "
                  "value.")
    page.add("table", _table(index, ("target", "fold", "pair", "method", "diagonal_mean",
                                     "off_diagonal_mean", "csv", "png"),
                             ("target", "fold", "pair", "method", "diagonal mean",
                              "off-diagonal mean", "table", "heatmap")))
    first = index[0]["fold"]
    for r in index:
        if r["fold"] == first and r["method"] == index[0]["method"]:
            page.figure(f"layer_maps/{paths.basename(r['png'])}",
                        f"{r['target']} fold {r['fold']}: {r['pair']} ({r['method']}).")


def _details(page: _Page, auc: str, runs):
    page.add("h2", "Details")
    done = [r for r in runs if r.get("status") == "done"]
    if done:
        boot = analyses.option(page.study, "bootstrap")
        confounded = any(r.get("confounder") not in (None, "", "none") for r in done)
        page.add("p", f"Every run: test {auc} with its percentile bootstrap 95% CI over the "
                      f"test images ({boot} resamples), and the number of test images."
                 + (" A run with a confounder reports, as its 'test', the test the paper's "
                    "script evaluated: the i.i.d. one (artefact as in training) for tag, "
                    "lowpass and noise, the o.o.d. one for the sampled attribute; the "
                    "robustness section gives all three." if confounded else ""))
        page.add("table", _table(done, ("name", f"test.{auc}", f"test.{auc}_ci_low",
                                        f"test.{auc}_ci_high", "test.num_examples",
                                        f"val.{auc}"),
                                 ("run", "test AUC", "CI low", "CI high", "test images",
                                  "val AUC")))
    summ = page.table("representations_summary.csv")
    if summ:
        cca = page.study.config.analysis.cca
        spatial = {"positions": "spatial positions as datapoints",
                   "pool": "spatially pooled features, one datapoint per image"}.get(
                       cca.spatial, f"{cca.spatial} datapoints")
        page.add("p", "Representation similarity ("
                      + ", ".join(f"{plots.sim.label(m)} [{m}]" for m in cca.methods)
                      + f"; {spatial}, up to {cca.positions} per layer, up to "
                      f"{cca.num_channels} channels drawn at random and shared by both "
                      f"networks, {cca.repeats} repeats), mean ± sd over folds [chance "
                      "level]. A layer with fewer positions or channels uses what it has: "
                      "the last row gives each layer's datapoints × channels; CCA near its "
                      "chance level says nothing about the networks.")
        header, rows = similarity_pivot(summ)
        page.add("table", (header, rows + [datapoints_row(header, page.table(
            "representations.csv") or [])]))
    pred = page.table("prediction_similarity_summary.csv")
    if pred:
        split = "/".join(dict.fromkeys(str(r.get("split") or "test") for r in pred))
        page.add("p", f"Prediction similarity ({split} split), mean over folds; {split} "
                      "images = images per fold.")
        page.add("table", _table(pred, ("target", "pair", "observed", "expected_independent",
                                        "excess", "agreement", "cohen_kappa", "n", "n_rows"),
                                 ("target", "pair", "observed", "expected (indep.)", "excess",
                                  "agreement", "kappa", f"{split} images", "folds")))
    _filter_details(page)
    _robustness_details(page)


def _filter_basis_words(page: _Page) -> str:
    """How the drifts' PCA basis was fitted, for the figure's caption: the counts of
    ``tables/filter_basis.json`` where the filters stage wrote one (it removes it in
    ``analysis.filters.basis=pair``), else the config's mode; a damaged one, or none beside
    drawn drifts in the study mode, is a TableError naming it."""
    path = page.study.path("tables", "filter_basis.json")
    if not paths.exists(path):
        if analyses.option(page.study, "filters.basis") == "pair":
            return "each (pre, fine-tuned) pair in its own PCA basis and range"
        if (paths.exists(page.study.path("figures", "filter_kl_drift.png"))
                and page.table("filter_drift.csv")):
            raise tables.damaged(path, "missing, though analysis.filters.basis=study")
        return "one PCA basis and range over every model compared"
    basis = tables.read_json(path)
    try:
        return (f"one PCA basis and range over all {len(basis['models'])} models' "
                f"{int(basis['num_filters']):,} filters, so every drift is in the same units")
    except (KeyError, TypeError, ValueError):
        raise tables.damaged(path, "no 'models' list or 'num_filters'") from None


def _filter_details(page: _Page):
    drift = page.table("filter_drift_summary.csv")
    if drift:
        above = [r for r in drift if _finite(r.get("drift")) and _finite(r.get("noise_floor"))
                 and r["drift"] > r["noise_floor"]]
        page.add("p", "Filter KL drift per depth bin (how far fine-tuning moved the "
                      "distribution of the 3×3 filters, as symmetric KL divergences of their "
                      "9 PCA coefficients weighted by each coefficient's share of the "
                      "variance), mean ± sd over runs, beside the noise floor: the drift "
                      "between two random halves of the pre-trained filters of that bin "
                      "(each half has half the filters, so the floor is on the high side). A "
                      "drift below its floor is not distinguishable from resampling the same "
                      f"filters: here {len(above)} of {len(drift)} (source, depth bin) "
                      "cells are above theirs.")
        page.add("table", _table(drift, ("source", "key", "drift", "drift_sd", "noise_floor",
                                         "n_rows"),
                                 ("source", "depth bin", "drift", "sd", "noise floor", "runs")))


def _robustness_details(page: _Page):
    summ = page.table("robustness_summary.csv")
    if not summ:
        return
    auc = analyses.option(page.study, "auc_metric")
    page.add("p", f"Robustness: AUC ({AUC_WORDS.get(auc, auc)}) on the i.i.d. "
                  "test (artefact as in training), the clean test and the o.o.d. test "
                  "(artefact on every negative), mean ± sd over folds.")
    page.add("table", _table(summ, ("target", "source", "confounder", "p", "auc_iid",
                                    "auc_iid_sd", "auc_clean", "auc_clean_sd", "auc_ood",
                                    "auc_ood_sd", "n_ood", "n_rows"),
                             ("target", "source", "confounder", "artefact p", "i.i.d.", "sd",
                              "clean", "sd", "o.o.d.", "sd", "o.o.d. test images", "folds")))
    tests = page.table("robustness_tests.csv")
    if tests:
        pairs = sorted({f"{r['source_a']} vs {r['source_b']}" for r in tests})
        page.add("p", "Sources compared per setting: Source Matters' permutation t-test "
                      "(unpaired: the two sources' fold AUCs, all relabellings of the "
                      f"folds; with k folds per source the smallest p is 2/C(2k, k)); pairs: "
                      f"{', '.join(pairs)} (random init is not compared; "
                      "analysis.compare_sources sets the sources); * p<.05, ** p<.01.")
        page.add("table", _table(tests, ("target", "confounder", "p", "test", "source_a",
                                         "source_b", "n_a", "t", "p_value", "mark"),
                                 ("target", "confounder", "artefact p", "test set", "a", "b",
                                  "folds per source", "t", "p-value (perm.)", "signif.")))


def build_blocks(study) -> List[Block]:
    """The report's blocks, in reading order (see module docstring)."""
    page = _Page(study)
    auc = analyses.option(study, "auc_metric")
    runs = page.table("runs.csv")
    summary = page.table("auc_summary.csv")
    if summary:
        def clean(rs):
            return [r for r in rs if r.get("confounder", "none") in ("none", "")]
        boxes = analyses.option(study, "fold_plot") == "box"
        plots.plot_auc_bars([dict(r, auc=r[f"test.{auc}"], auc_sd=r[f"test.{auc}_sd"],
                                  auc_n=r[f"test.{auc}_n"]) for r in clean(summary)],
                            study.path("figures", "auc.png"), sources=list(study.config.sources),
                            folds=[dict(r, auc=r.get(f"test.{auc}")) for r in clean(runs)
                                   if r.get("status") == "done"] if boxes else None)
    _what_was_run(page, runs)
    _headline(page, auc, summary)
    _published(page, auc, summary)
    _figures(page)
    _layer_maps(page)
    _details(page, auc, runs)
    return page.blocks


def write_report(study) -> Dict[str, str]:
    """Writes report.md and report.html into the study's workdir; returns their paths."""
    blocks = build_blocks(study)
    md_path, html_path = study.path("report.md"), study.path("report.html")
    for path, text in ((md_path, render_markdown(blocks, study.workdir)),
                       (html_path, render_html(blocks, "Study report: "
                                               + study.config.get("name", "study")))):
        paths.write_text_atomic(path, text)
    print(f"[study] report: {md_path}\n[study] report: {html_path}", flush=True)
    return {"markdown": md_path, "html": html_path}
