"""The study report from hand-made tables (no training): order, counts, the published
comparison, and the HTML page rendered in headless Chromium (skipped without it)."""
import json
import math
import os
import re
import shutil
import subprocess
import types

import ml_collections
import numpy as np
import pytest

from medtransfer_jax.analysis import plots
from medtransfer_jax.studies import published, report, tables


def _study(tmp_path, published_kind="revisiting"):
    c = ml_collections.ConfigDict()
    c.name = "fake"
    c.folds = [0, 1, 2]
    c.published = published_kind
    c.protocol = "feb2023"     # the protocol Revisiting's published tables came from
    c.model = ml_collections.ConfigDict(dict(depth=50, width=64, layout="keras_v1"))
    c.sources = ml_collections.ConfigDict({s: {"kind": "random"} for s in
                                           ("imagenet", "radimagenet", "random")})
    c.targets = ml_collections.ConfigDict({"breast": {"config": "x.py"}})
    c.analysis = ml_collections.ConfigDict(dict(auc_metric="auc_keras", bootstrap=100))
    c.analysis.cca = ml_collections.ConfigDict(dict(methods=["paper_cca"], spatial="positions",
                                                    positions=10000, num_channels=64,
                                                    repeats=5))
    wd = str(tmp_path)
    study = types.SimpleNamespace(config=c, workdir=wd, path=lambda *p: os.path.join(wd, *p))
    rng = np.random.default_rng(0)
    runs = [dict(name=f"breast/{s}/fold{f}", target="breast", source=s, fold=f,
                 confounder="none", p="", status="done", **{
                     "test.auc_keras": float(a), "test.num_examples": 117.0,
                     "val.auc_keras": float(a) - 0.01})
            for s, base in (("imagenet", 0.9), ("radimagenet", 0.85), ("random", 0.55))
            for f, a in enumerate(base + 0.02 * rng.normal(size=3))]
    tables.write_csv(study.path("tables", "runs.csv"), runs)
    summ = tables.summarise(runs, ("target", "source", "confounder", "p"),
                            ("test.auc_keras", "test.num_examples", "val.auc_keras"))
    tables.write_csv(study.path("tables", "auc_summary.csv"), summ)
    sim = [dict(target="breast", pair="imagenet (pre) vs imagenet (fine-tuned)",
                comparison="pre_vs_finetuned", layer=l, method="paper_cca", value=v,
                value_sd=0.02, value_n=3.0, null_mean=0.05)
           for l, v in (("conv1_relu", 0.88), ("conv5_block3_out", 0.41))]
    tables.write_csv(study.path("tables", "representations_summary.csv"), sim)
    tables.write_csv(study.path("tables", "prediction_similarity_summary.csv"), [dict(
        target="breast", pair="imagenet vs radimagenet", observed=0.8, n=117.0, n_rows=3,
        expected_independent=0.7)])
    plots.plot_layer_similarity([dict(r, std=r["value_sd"]) for r in sim],
                                study.path("figures", "similarity_breast.png"))
    return study, summ


def test_report_order_counts_and_published_comparison(tmp_path):
    study, summ = _study(tmp_path)
    report.write_report(study)
    md = open(tmp_path / "report.md").read()
    heads = [m.group(0) for m in re.finditer(r"^## .*$", md, re.M)]
    assert [h.split(":")[0] for h in heads] == [
        "## What was run", "## Headline", "## Compared with the published numbers",
        "## Figures", "## Details"]
    # counts are integers: 117 test images, 3 folds (never '1.000' / '3.000')
    assert "| breast | imagenet vs radimagenet | 0.800 | 0.700 |" in md
    assert "Prediction similarity (test split)" in md and "| test images | folds |" in md
    assert re.search(r"\| 117 \| 3 \|", md) and "117.000" not in md
    headline = md[md.index("## Headline"):md.index("## Compared")]
    im = [r for r in summ if r["source"] == "imagenet"][0]
    assert (f"{im['test.auc_keras']:.3f} ± {im['test.auc_keras_sd']:.3f} (3 folds)"
            in headline)
    assert "| 117 |" in headline  # test-set size beside the AUCs
    # ours vs theirs in fold-sd units, theirs from the shipped file
    theirs = published.load()["revisiting"]["auc"]["breast"]["imagenet"]
    z = (im["test.auc_keras"] - theirs["mean"]) / math.sqrt(
        (im["test.auc_keras_sd"] ** 2 + theirs["sd"] ** 2) / 2)
    rows = published.compare("revisiting", summ, "test.auc_keras",
                             tables.read_csv(study.path("tables", "representations_summary.csv")),
                             [])
    auc_row = [r for r in rows if r["key"] == "breast / imagenet"][0]
    assert auc_row["theirs"] == theirs["mean"] == 0.905
    assert auc_row["diff_in_fold_sd"] == pytest.approx(z)
    cca_row = [r for r in rows if r["quantity"] == "mean CCA" and "conv1_relu" in r["key"]][0]
    pub_cca = published.load()["revisiting"]["cca"]["breast"][
        "imagenet (pre) vs imagenet (fine-tuned)"]["conv1_relu"]
    assert cca_row["theirs"] == pub_cca["mean"] and 0.8 < pub_cca["mean"] < 0.95
    assert "breast / imagenet" in md and "diff (fold sd)" in md


def test_prediction_table_names_the_split_the_paper_mode_used(tmp_path):
    study, _ = _study(tmp_path)
    tables.write_csv(study.path("tables", "prediction_similarity_summary.csv"), [dict(
        target="breast", pair="imagenet vs radimagenet", observed=0.8, n=156.0, n_rows=5,
        expected_independent=0.7, split="val", mode="paper")])
    report.write_report(study)
    md = open(tmp_path / "report.md").read()
    assert "Prediction similarity (val split)" in md and "| val images | folds |" in md
    assert "(test split)" not in md


def test_published_file_agrees_with_its_fold_values():
    pub = published.load()
    for target, by_src in pub["revisiting"]["auc"].items():
        for src, v in by_src.items():
            assert len(v["folds"]) == v["n"] == 5
            # the paper's mean/std columns are the fold mean and the sample sd (ddof=1)
            assert np.mean(v["folds"]) == pytest.approx(v["mean"], abs=6e-4), (target, src)
            assert np.std(v["folds"], ddof=1) == pytest.approx(v["sd"], abs=6e-4), (target, src)
    # CCA at full precision (a 4-decimal rounding read as ~0.3 fold sd on the tightest
    # layers): each mean and sd is its folds' own
    n = 0
    for target, pairs in pub["revisiting"]["cca"].items():
        for pair, layers in pairs.items():
            for layer, v in layers.items():
                assert len(v["folds"]) == v["n"] == 5, (target, pair, layer)
                assert v["mean"] == pytest.approx(np.mean(v["folds"]), abs=1e-12)
                assert v["sd"] == pytest.approx(np.std(v["folds"], ddof=1), abs=1e-12)
                n += 1
    assert n == 7 * 14 * 5
    sm = pub["source_matters"]["confounders"]["lowpass"]["1.0"]
    assert sm["p_permutation"] == pytest.approx(2 / 252, abs=1e-5)


def test_nothing_to_compare_without_a_published_setup(tmp_path):
    study, _ = _study(tmp_path, published_kind="")
    report.write_report(study)
    assert "Nothing to compare" in open(tmp_path / "report.md").read()


CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const over = [...document.querySelectorAll('img, p, h1, h2, .scroll, figure')]
      .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1).length;
  const r = {images: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0))
      .length, page: document.documentElement.scrollWidth, window: window.innerWidth,
      overflowing: over,
      order: [...document.querySelectorAll('h2')].map(h => h.textContent.split(':')[0])};
  const p = document.createElement('pre'); p.id = 'check'; p.textContent = JSON.stringify(r);
  document.body.appendChild(p);
});</script>"""


@pytest.mark.skipif(not shutil.which("chromium"), reason="headless Chromium not installed")
@pytest.mark.parametrize("width", [1280, 500])  # 500: figures must shrink
def test_report_html_renders_in_chromium(tmp_path, width):
    study, _ = _study(tmp_path)
    paths = report.write_report(study)
    page = open(paths["html"]).read().replace("</body>", CHECK + "</body>")
    probe = tmp_path / "probe.html"
    probe.write_text(page)
    out = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                          f"--window-size={width},900", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    r = json.loads(re.search(r'<pre id="check">(.*?)</pre>', out).group(1).replace(
        "&quot;", '"'))
    assert r["images"] == 2 and r["broken"] == 0  # AUC bars + similarity figure
    assert r["page"] <= r["window"] and r["overflowing"] == 0, r
    assert r["order"] == ["What was run", "Headline", "Compared with the published numbers",
                          "Figures", "Details"]


def test_confounded_study_headline_and_source_matters_comparison(tmp_path):
    study, _ = _study(tmp_path, published_kind="source_matters")
    os.remove(study.path("tables", "auc_summary.csv"))
    tables.write_csv(study.path("tables", "auc_summary.csv"), [dict(
        target="lowpass", source="imagenet", confounder="lowpass", p=1.0, **{"test.auc": 0.2})])
    rows = [dict(target="lowpass", source=s, confounder="lowpass", p=1.0, fold=f, auc_iid=0.9,
                 auc_clean=0.8, auc_ood=a, n_iid=100.0, n_clean=100.0, n_ood=100.0)
            for s, aa in (("imagenet", (0.15, 0.2)), ("radimagenet", (0.7, 0.72)))
            for f, a in enumerate(aa)]
    summ = tables.summarise(rows, ("target", "source", "confounder", "p"),
                            ["auc_iid", "auc_clean", "auc_ood", "n_iid", "n_clean", "n_ood"])
    tables.write_csv(study.path("tables", "robustness_summary.csv"), summ)
    report.write_report(study)
    md = open(tmp_path / "report.md").read()
    head = md[md.index("## Headline"):md.index("## Compared")]
    assert "| lowpass | lowpass | 1.000 | imagenet |" in head and "0.175 ± 0.035 (2 folds)" in head
    theirs = published.load()["source_matters"]["confounders"]["lowpass"]["1.0"][
        "imagenet_ood_auc"]
    row = published.compare_source_matters(tables.read_csv(
        study.path("tables", "robustness_summary.csv")))[0]
    assert row["theirs"] == theirs["mean"] and row["ours"] == pytest.approx(0.175)
    assert row["diff_in_fold_sd"] == pytest.approx(
        (0.175 - theirs["mean"]) / math.sqrt((np.std([0.15, 0.2], ddof=1) ** 2
                                              + theirs["sd"] ** 2) / 2))


def test_similarity_table_gives_each_layers_datapoints_and_channels(tmp_path):
    """The header says 'up to'; the last row gives what each layer had (a deep layer of a
    small image has few positions: a CCA there sits at chance)."""
    study, _ = _study(tmp_path)
    tables.write_csv(study.path("tables", "representations.csv"), [
        dict(layer="conv1_relu", datapoints=10000.0, channels=64.0, fold=f) for f in (0, 1)]
        + [dict(layer="conv5_block3_out", datapoints=d, channels=64.0, fold=f)
           for f, d in ((0, 49.0), (1, 48.0))])
    report.write_report(study)
    md = open(tmp_path / "report.md").read()
    assert ("up to 10000 per layer, up to 64 channels drawn at random and shared by both "
            "networks") in md
    assert re.search(r"\|\s*\| datapoints × channels \|\s*\| 10000 × 64 \| 48 × 64 \|", md), md



def test_a_sep2023_study_is_not_compared_with_the_feb2023_tables(tmp_path):
    """Revisiting's results/ (AUC, CCA) were made by its Feb-2023 scripts (val-fold sklearn
    AUC): a Sep-2023 study says so instead of comparing unlike numbers."""
    study, _ = _study(tmp_path)
    study.config.protocol = "sep2023"
    report.write_report(study)
    md = open(tmp_path / "report.md").read()
    part = md[md.index("## Compared"):md.index("## Figures")]
    assert "Nothing to compare: the published revisiting numbers come from its feb2023 " \
           "protocol" in part and "protocol=feb2023 to compare" in part
    assert "| theirs |" not in part
    assert published.load()["revisiting"]["auc_metric"] == "test.auc_ovr_weighted"
