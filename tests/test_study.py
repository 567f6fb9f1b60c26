"""The end-to-end study runner on a tiny config: every stage, the report, resume,
progress lines, the partial report, pre-flight and the direction of the results.

One pre-trained stand-in source plus the random baseline, one synthetic target, one
fold, the tag confounder at p=1: four fine-tuning runs of a few steps at 32 px.
"""
import contextlib
import csv
import io
import json
import math
import os
import re

import _train_utils
import ml_collections
import numpy as np
import pytest

from medtransfer_jax.analysis import stats
from medtransfer_jax.studies import analyses, runner

TRAIN = os.path.join(_train_utils.REPO, "configs", "demo.py")
COMMON = ["data.image_size=32", "data.synthetic.image_size=32", "train.batch_size=32",
          "eval.batch_size=64", "log.every_steps=4"]


def _tiny_study_config():
    c = ml_collections.ConfigDict()
    c.name = "tiny"
    c.folds = [0]
    c.model = ml_collections.ConfigDict(dict(depth=18, width=8, layout="keras_v1"))
    c.sources = ml_collections.ConfigDict()
    c.sources.natural = ml_collections.ConfigDict(dict(
        kind="pretrain", config=TRAIN,
        overrides=COMMON + ["data.synthetic.task=natural", "data.synthetic.num_classes=3",
                            "data.synthetic.num_examples=96", "train.num_steps=6",
                            "model.preprocessing=unit"]))
    c.sources.random = ml_collections.ConfigDict(dict(kind="random", seed=0,
                                                      preprocessing="unit"))
    c.targets = ml_collections.ConfigDict()
    c.targets.lesion = ml_collections.ConfigDict(dict(
        config=TRAIN,
        overrides=COMMON + ["data.synthetic.task=lesion", "data.synthetic.num_classes=2",
                            "data.synthetic.num_examples=96", "data.synthetic.seed=21",
                            "train.num_steps=10", "eval.every_steps=5", "train.lr=0.003"]))
    c.confounders = [ml_collections.ConfigDict(dict(kind="tag", ps=[1.0]))]
    c.analysis = ml_collections.ConfigDict()
    c.analysis.bootstrap = 200
    c.analysis.cca = ml_collections.ConfigDict(dict(
        methods=["paper_cca", "linear_cka"], spatial="positions", positions=300,
        num_channels=8, repeats=2, seed=0, num_images=24))
    c.analysis.layer_maps = ml_collections.ConfigDict(dict(
        comparisons=["pre_vs_finetuned"], methods=["linear_cka", "debiased_cka"],
        num_images=24, spatial="pool"))
    return c


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("study"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = runner.run_study(_tiny_study_config(), wd)
    return wd, status, out.getvalue()


def test_every_stage_ran_and_report_reads_top_down(study):
    wd, status, _ = study
    assert status == {s: "done" for s in runner.STAGES}
    md = open(os.path.join(wd, "report.md")).read()
    order = ["## What was run", "## Headline: test AUC", "## Compared with the published",
             "## Figures", "## Details"]
    pos = [md.index(h) for h in order]
    assert pos == sorted(pos), pos
    # the synthetic study matches no published setup
    assert "Nothing to compare" in md
    html = open(os.path.join(wd, "report.html")).read()
    figs = [line.split("](")[1].split(")")[0] for line in md.splitlines() if line.startswith("![")]
    assert len(figs) >= 6
    for f in figs:
        with open(os.path.join(wd, f), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", f
    assert html.count("data:image/png;base64,") == len(figs)
    # the stem's filters before and after fine-tuning, one figure per source (filter_plot.py)
    assert {"figures/conv1_filters_natural.png", "figures/conv1_filters_random.png"} <= set(figs)
    # test-set size next to the AUCs: the headline's last column is the test images / fold
    head = md[pos[1]:pos[2]]
    runs = _rows(os.path.join(wd, "tables", "runs.csv"))
    n_test = {int(float(r["test.num_examples"])) for r in runs if r["confounder"] == "none"}
    assert "test images / fold" in head and f"| {n_test.pop()} |" in head


def test_progress_lines_one_per_run(study):
    wd, _, out = study
    lines = [l for l in out.splitlines() if l.startswith("run ")]
    assert len(lines) == 4
    pat = re.compile(r"run (\d)/4 lesion/(natural|random)/(tag-p1/)?fold0: test AUC "
                     r"\d\.\d{3} \(n=\d+\), .+, ETA .+")
    assert all(pat.fullmatch(l) for l in lines), lines
    assert [int(pat.fullmatch(l).group(1)) for l in lines] == [1, 2, 3, 4]
    assert lines[-1].endswith("ETA 0 s")
    assert "pre-flight: ok" in out and "[study] stage 2/7 finetune" in out
    # the stage and overall ETA: '?' until the first run is timed, then a number
    assert ("[study] stage 2/7 finetune: running (4 runs), stage ETA ?, overall ETA ?"
            in out.splitlines())
    eta = [l for l in out.splitlines() if l.startswith("[study] stage 2/7 finetune (4 runs)")]
    assert len(eta) == 4 and all(
        re.fullmatch(r".*: stage ETA \S+( s)?, overall ETA \d\S*( s)?", l) for l in eta), eta
    assert eta[-1].split(": ")[1].startswith("stage ETA 0 s, overall ETA ")
    rates = json.load(open(os.path.join(wd, "stages", "rates.json")))["stages"]
    assert set(rates) == set(runner.STAGES) and rates["finetune"]["items"] == 4
    assert rates["sources"]["units"] == 3     # natural (pre-trained), random, its twin


def test_analysis_stages_print_one_line_per_item(study):
    wd, _, out = study
    pat = re.compile(r"representations (\d)/5 lesion/fold0 (.+): mean paper_cca (\d\.\d{3}), "
                     r"\S+(?: s)?, stage ETA (\S+(?: s)?), overall ETA (\d\S*(?: s)?)")
    found = [pat.fullmatch(l) for l in out.splitlines() if l.startswith("representations ")]
    assert len(found) == 5 and all(found), found
    assert [int(m.group(1)) for m in found] == [1, 2, 3, 4, 5]
    assert found[0].group(4) != "0 s"   # the maps after the CCA pairs are the stage's rest
    st = runner.Study(_tiny_study_config(), wd)
    assert [m.group(2) for m in found] == [p[0] for p in analyses.cca_pairs(st, "lesion", 0)]
    # the headline of each pair is its mean paper_cca over the layers in the table
    sim = _rows(os.path.join(wd, "tables", "representations.csv"))
    for m in found:
        values = [float(r["value"]) for r in sim
                  if r["pair"] == m.group(2) and r["method"] == "paper_cca"]
        assert len(values) == 5 and float(m.group(3)) == pytest.approx(
            sum(values) / 5, abs=5e-4), m.group(0)
    # layer maps (2 pairs) and filters (2 (pre, fine-tuned) pairs) print theirs; the one
    # target's predictions and robustness are one item each: no line, but timed
    maps = [l for l in out.splitlines() if l.startswith("layer maps ")]
    assert [l.split(" lesion/fold0 ")[0] for l in maps] == ["layer maps 1/2", "layer maps 2/2"]
    assert all(re.search(r": diagonal linear_cka \d\.\d{3}, .*, overall ETA ", l) for l in maps)
    assert ", stage ETA 0 s, " in maps[-1]   # the last item of the stage: nothing left
    # filters: the study's one PCA basis over its 4 models, then its 2 (pre, fine-tuned) pairs
    filt = [l for l in out.splitlines() if l.startswith("filters ")]
    assert [l.split(":")[0] for l in filt] == ["filters 1/3 PCA basis of 4 models",
                                               "filters 2/3 lesion/fold0 natural",
                                               "filters 3/3 lesion/fold0 random"]
    assert re.match(r"filters 1/3 PCA basis of 4 models: [\d,]+ filters, ", filt[0]), filt[0]
    assert not [l for l in out.splitlines() if l.startswith(("predictions ", "robustness "))]
    rates = json.load(open(os.path.join(wd, "stages", "rates.json")))["stages"]
    assert {s: rates[s]["items"] for s in ("representations", "predictions", "filters",
                                           "robustness")} == {
        "representations": 5 + 2, "predictions": 1, "filters": 3, "robustness": 1}


def test_tables_statistics_and_directions(study):
    wd, _, _ = study
    runs = _rows(os.path.join(wd, "tables", "runs.csv"))
    assert len(runs) == 4 and {r["source"] for r in runs} == {"natural", "random"}
    for r in runs:  # each run's bootstrap CI brackets its AUC
        auc, lo, hi = (float(r[k]) for k in ("test.auc", "test.auc_ci_low", "test.auc_ci_high"))
        assert lo <= auc <= hi and hi - lo > 0
    comp = _rows(os.path.join(wd, "tables", "source_comparisons.csv"))
    assert [(c["source_a"], c["source_b"], c["n"]) for c in comp] == [("natural", "random", "1")]
    sim = _rows(os.path.join(wd, "tables", "representations_summary.csv"))
    assert {r["layer"] for r in sim} == {"conv1_relu", "conv2_block2_out", "conv3_block2_out",
                                         "conv4_block2_out", "conv5_block2_out"}
    pairs = {r["pair"] for r in sim}
    assert {"natural (pre) vs natural (fine-tuned)", "natural vs random (pre)",
            "random vs random (pre)"} <= pairs
    for r in (r for r in sim if r["method"] == "paper_cca"):
        assert 0 < float(r["null_mean"]) < 1
        if r["pair"] == "natural (pre) vs natural (fine-tuned)":
            # fine-tuning changed the network: similarity below 1, and above chance where
            # CCA can resolve anything (a deep layer of these tiny images has few
            # positions: its chance level came out at 0.93, so a value there says nothing)
            assert float(r["value"]) < 1 - 1e-4, r
            if float(r["null_mean"]) < 0.5:
                assert float(r["null_mean"]) < float(r["value"]), r
    pred = _rows(os.path.join(wd, "tables", "prediction_similarity_summary.csv"))
    n_test = {r["test.num_examples"] for r in runs if r["confounder"] == "none"}
    assert [float(p["n"]) for p in pred] == [float(n_test.pop())]  # n = test images, not folds
    rob = _rows(os.path.join(wd, "tables", "robustness.csv"))
    assert len(rob) == 2
    for r in rob:
        drop = float(r["drop_iid_to_ood"])
        assert math.isclose(drop, float(r["auc_iid"]) - float(r["auc_ood"]), abs_tol=1e-9)
        assert float(r["n_ood"]) > 0
    # p = 1: the tag marks every positive in training and every negative in the o.o.d.
    # test, so the pre-trained source that learned the shortcut loses on o.o.d.
    nat = [r for r in rob if r["source"] == "natural"][0]
    assert float(nat["auc_ood"]) <= float(nat["auc_iid"]), nat
    drift = _rows(os.path.join(wd, "tables", "filter_drift_summary.csv"))
    assert drift and all(float(r["noise_floor"]) > 0 for r in drift)
    assert drift[0]["key"] == "[0.0, 0.1]"


def test_filter_drifts_share_one_basis_over_every_model(study):
    """Every pair's drift is in one PCA basis and range fitted over the study's four models
    (both sources' pre-trained and fine-tuned weights), checked against sklearn's PCA of
    all their filters pooled in memory and a drift recomputed by hand."""
    from sklearn.decomposition import PCA
    from medtransfer_jax.analysis import filters as F
    from medtransfer_jax.weights import checkpoint
    wd, _, _ = study
    st = runner.Study(_tiny_study_config(), wd)
    saved = json.load(open(os.path.join(wd, "tables", "filter_basis.json")))
    dirs = [st.source_dir("natural"), st.source_dir("random"),
            st.fine_tuned_dir("lesion", "natural", fold=0),
            st.fine_tuned_dir("lesion", "random", fold=0)]
    assert saved["models"] == dirs
    params = [checkpoint.load_weights(d)[0]["params"] for d in dirs]
    pooled = [F.scale_filters(lf.filters) for p in params for lf in F.extract_filters(p)]
    X = np.concatenate(pooled)
    ref = PCA(9, svd_solver="full").fit(X)
    assert saved["num_filters"] == len(X)
    np.testing.assert_allclose(saved["explained_variance_ratio"], ref.explained_variance_ratio_,
                               atol=1e-10)
    basis = F.FilterBasis.from_json(saved)
    c = basis.pca.transform(X)
    np.testing.assert_allclose(saved["range"], [c.min(), c.max()], atol=1e-12)
    # the natural source's drift over all depths, by hand in that basis
    pre, ft = (basis.pca.transform(F.scaled_filters(p)) for p in (params[0], params[2]))
    want = F.kl_drift(F.coefficient_histograms(pre, basis.ranges),
                      F.coefficient_histograms(ft, basis.ranges),
                      basis.pca.explained_variance_ratio)
    got = [float(r["drift"]) for r in _rows(os.path.join(wd, "tables", "filter_drift.csv"))
           if r["source"] == "natural" and r["scope"] == "all"]
    assert got == [pytest.approx(want, rel=1e-9)]


def test_report_stage_on_an_unfinished_study_is_not_marked_done(study, tmp_path):
    wd, _, _ = study
    # A fresh workdir: only the report. It writes what exists and stays unmarked.
    status = runner.run_study(_tiny_study_config(), str(tmp_path), stages=["report"])
    assert status == {"report": "partial"}
    assert "No fine-tuning results yet" in open(tmp_path / "report.md").read()
    assert not os.path.exists(tmp_path / "stages" / "report.done")
    # The finished study: a stage redone after the report makes the report stale.
    marker = os.path.join(wd, "stages", "report.done")
    old = os.path.getmtime(os.path.join(wd, "stages", "robustness.done")) - 10
    os.utime(marker, (old, old))  # the report predates the robustness stage
    status = runner.run_study(_tiny_study_config(), wd, stages=["robustness", "report"])
    assert status == {"robustness": "skipped", "report": "done"}
    assert os.path.getmtime(marker) > old
    status = runner.run_study(_tiny_study_config(), wd, stages=["report"])
    assert status == {"report": "skipped"}


def test_rerun_skips_finished_stages(study):
    wd, _, _ = study
    os.remove(os.path.join(wd, "report.md"))
    os.remove(os.path.join(wd, "stages", "report.done"))
    rates = os.path.join(wd, "stages", "rates.json")
    before = json.load(open(rates))["stages"]
    status = runner.run_study(_tiny_study_config(), wd)
    assert status["finetune"] == "skipped" and status["sources"] == "skipped"
    after = json.load(open(rates))["stages"]   # the resumed study kept its rates
    assert after["finetune"] == before["finetune"] and after["sources"] == before["sources"]
    assert after["report"]["items"] > before["report"]["items"]
    assert status["report"] == "done" and os.path.exists(os.path.join(wd, "report.md"))
    # a report deleted by hand is written again by --stages=report (its marker stays)
    os.remove(os.path.join(wd, "report.html"))
    status = runner.run_study(_tiny_study_config(), wd, stages=["report"])
    assert status["report"] == "done" and os.path.exists(os.path.join(wd, "report.html"))


def test_preflight_lists_everything_missing(tmp_path):
    c = _tiny_study_config()
    c.sources.natural = ml_collections.ConfigDict(dict(kind="convert", format="keras_h5",
                                                       input=str(tmp_path / "nope.h5")))
    c.targets.lesion.overrides = list(c.targets.lesion.overrides) + [
        "data.name=breast", f"data.root={tmp_path / 'no_data'}"]
    pf = runner.preflight(c, str(tmp_path / "wd"))
    assert len(pf.missing) == 2 and pf.runs == 4 and pf.runs_done == 0
    assert "nope.h5" in pf.missing[0] and "no_data" in pf.missing[1]
    with pytest.raises(runner.StudyError,
                       match=r"2 thing\(s\) missing.*nope\.h5.*and 1 more \(the MISSING"):
        runner.run_study(c, str(tmp_path / "wd"))
    assert not os.path.exists(tmp_path / "wd" / "finetune")  # nothing was trained
    ok = runner.preflight(_tiny_study_config(), str(tmp_path / "wd2"))
    assert ok.missing == [] and ok.images == 4 * 10 * 32
    assert "lesion: 4 runs (0 done)" in ok.text() and "pre-flight: ok" in ok.text()


def test_preflight_names_cca_pairs_of_sources_the_study_has_not(tmp_path):
    c = _tiny_study_config()
    c.analysis.cca.between = [["natural", "imagenet"]]
    c.analysis.cca.pairs = [["natural", "pre", "random", "trained"], ["natural", "pre"]]
    pf = runner.preflight(c, str(tmp_path / "wd"))
    assert pf.missing == [
        "analysis.cca.between: ['natural', 'imagenet']: give two of the study's sources "
        "['natural', 'random']",
        "analysis.cca.pairs: ['natural', 'pre', 'random', 'trained']: give [source, stage, "
        "source, stage] with sources from ['natural', 'random'] and stage 'pre' or "
        "'fine-tuned'",
        "analysis.cca.pairs: ['natural', 'pre']: give [source, stage, source, stage] with "
        "sources from ['natural', 'random'] and stage 'pre' or 'fine-tuned'"]


def test_stages_done_with_other_study_settings_are_run_again(study, tmp_path, capsys):
    """A stage's marker keeps the study config it was done with: with other settings (more
    folds after a subset first, a changed analysis option) it is not done, so it runs
    again and the stages after it need it; the same config keeps it."""
    import shutil
    from medtransfer_jax.weights import checkpoint
    wd, _, _ = study
    copy = tmp_path / "wd"
    shutil.copytree(wd, copy)
    same = runner.Study(_tiny_study_config(), str(copy))
    assert all(same.is_done(s) for s in runner.STAGES)
    assert f"config {same.config_fingerprint()}" in (copy / "stages" / "filters.done").read_text()
    cfg = _tiny_study_config()
    cfg.sources.random.seed = 7
    other = runner.Study(cfg, str(copy))
    assert other.config_fingerprint() != same.config_fingerprint()
    assert not any(other.is_done(s) for s in runner.STAGES)
    with pytest.raises(runner.StudyError, match="needs the sources and finetune stages"):
        other.check_stages(["robustness"])
    # the sources stage draws the random source again with the new seed (it kept the old
    # one while it was readable)
    other.stage_sources()
    meta = checkpoint.load_metadata(other.source_dir("random"))
    assert meta.extra["seed"] == 7
    assert "source random: making it again (drawn as (seed, " in capsys.readouterr().out
    # a marker written before fingerprints were kept counts as done with this config
    (copy / "stages" / "robustness.done").write_text("1.0s\ncode abc\n")
    assert other.is_done("robustness")


def test_converted_source_is_converted_again_when_its_file_changed(tmp_path):
    """The converted weights record their input file's SHA-256: another file at the same
    path (the first one was the wrong download) is converted again."""
    from medtransfer_jax.weights import checkpoint, conversion
    f = tmp_path / "w.h5"
    f.write_bytes(b"first")
    spec = ml_collections.ConfigDict(dict(kind="convert", input=str(f), format="keras_h5"))
    meta = checkpoint.WeightsMetadata(source="x", layout="keras_v1", preprocessing="caffe",
                                      extra={"sha256": conversion.file_sha256(str(f))})
    assert runner.Study._converted_differs(meta, spec) is None
    f.write_bytes(b"second")
    assert "converted from another file" in runner.Study._converted_differs(meta, spec)
    f.unlink()    # the input deleted after conversion: the converted weights are kept
    assert runner.Study._converted_differs(meta, spec) is None
    f.write_bytes(b"first")
    spec.preprocessing = "torch"
    assert "preprocessing caffe, the config asks torch" in runner.Study._converted_differs(
        meta, spec)


def test_bad_stage_name_is_a_clear_error(tmp_path):
    with pytest.raises(runner.StudyError, match="unknown stage"):
        runner.Study(_tiny_study_config(), str(tmp_path)).run(stages=["nope"])


def test_a_stage_runs_only_after_the_stages_it_reads(study, tmp_path):
    """A stage whose inputs no stage has made is refused in one line that names the
    stages to add, before anything is written (robustness over untrained runs wrote NaN
    rows and marked itself done, so a later full study skipped it)."""
    fresh = tmp_path / "fresh"
    for stages, missing in ((["robustness"], "sources and finetune stages"),
                            (["finetune"], "sources stage"),
                            (["representations"], "sources and finetune stages"),
                            (["filters", "report"], "sources and finetune stages"),
                            (["finetune", "predictions"], "sources stage")):
        with pytest.raises(runner.StudyError) as e:
            runner.run_study(_tiny_study_config(), str(fresh), stages=stages)
        needed = missing.rsplit(" ", 1)[0].split(" and ")
        want = ",".join(s for s in runner.STAGES if s in stages or s in needed)
        assert f"stage needs the {missing} first" in str(e.value), e.value
        assert f"run --stages={want}," in str(e.value), e.value
        assert not fresh.exists()
    study_obj = runner.Study(_tiny_study_config(), str(fresh))
    study_obj.check_stages(["sources", "finetune", "robustness"])   # made in the same call
    # a finished study: its stages have what they read, forced or not
    wd, _, _ = study
    done = runner.Study(_tiny_study_config(), wd)
    done.check_stages(["robustness"])
    done.check_stages(["robustness"], force=True)


def test_layer_maps_per_pair_are_written_listed_and_resumable(study):
    wd, _, _ = study
    index = _rows(os.path.join(wd, "tables", "layer_maps.csv"))
    assert {(r["pair"], r["method"]) for r in index} == {
        (f"{s} (pre) vs {s} (fine-tuned)", m) for s in ("natural", "random")
        for m in ("linear_cka", "debiased_cka")}
    for r in index:
        rows = _rows(os.path.join(wd, r["csv"]))
        layers = {x["layer_a"] for x in rows}
        assert len(layers) == 9 and len(rows) == 2 * 81  # ResNet18: conv1 + 8 blocks
        with open(os.path.join(wd, r["png"]), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        # a few fine-tuning steps barely move a layer: each layer is closest to itself
        # (linear CKA; debiased CKA of 24 pooled images is too noisy to order a 0.03 gap)
        assert 0 < float(r["off_diagonal_mean"]) <= 1 + 1e-6
        assert float(r["diagonal_mean"]) <= 1 + 1e-6
        if r["method"] == "linear_cka":
            assert float(r["off_diagonal_mean"]) < float(r["diagonal_mean"]), r
    md = open(os.path.join(wd, "report.md")).read()
    sec = md[md.index("## Layer × layer maps"):md.index("## Details")]
    assert sec.count("| lesion | 0 |") == 4 and sec.count("![") == 2  # first fold, first method
    assert "| layer_maps/lesion_fold0/natural_pre_vs_natural_fine_tuned.csv |" in sec
    # resumable: only the pair whose files are missing is computed again
    st = runner.Study(_tiny_study_config(), wd)
    gone = os.path.join(wd, next(r for r in index if r["pair"].startswith("random"))["csv"])
    kept = os.path.join(wd, next(r for r in index if r["pair"].startswith("natural"))["csv"])
    t_kept = os.path.getmtime(kept)
    os.remove(gone)
    again = analyses.layer_maps(st)
    assert os.path.exists(gone) and os.path.getmtime(kept) == t_kept
    assert [r["diagonal_mean"] for r in again] == pytest.approx(
        [float(r["diagonal_mean"]) for r in index], abs=1e-6)


def test_analyze_paper_protocol_reproduces_the_studys_cca_rows(study, tmp_path):
    """`analyze cca --protocol=paper --stimuli_config=<a study run's config>` on the
    study's weights gives the representations table's paper_cca values: same stimuli,
    same draws, same kernel."""
    from absl import flags
    from absl.testing import flagsaver
    from medtransfer_jax import analyze

    wd, _, _ = study
    run_dir = os.path.join(wd, "finetune", "lesion", "natural", "fold0")
    pre = os.path.join(wd, "sources", "natural", "run", "export", "best")
    FLAGS = flags.FLAGS
    if not FLAGS.is_parsed():
        FLAGS.mark_as_parsed()

    def analyze_cca(out, **extra):
        with flagsaver.flagsaver():
            for flag in FLAGS.flags_by_module_dict()[analyze.__name__]:
                flag.unparse()
            for k, v in dict(output_dir=str(out), protocol="paper", methods=["paper_cca"],
                             pair=[f"{pre},{os.path.join(run_dir, 'export', 'best')},x"],
                             positions=300, channels=8, repeats=2, num_images=24, seed=0,
                             batch_size=64, fold=0,
                             stimuli_config=os.path.join(run_dir, "sweep_config.py"),
                             **extra).items():
                setattr(FLAGS, k, v)
            files = analyze.run(["analyze", "cca"])
        return {r["layer"]: float(r["value"]) for r in _rows(files["csv"])}

    theirs = analyze_cca(tmp_path / "same")
    ours = {r["layer"]: float(r["value"])
            for r in _rows(os.path.join(wd, "tables", "representations.csv"))
            if r["pair"] == "natural (pre) vs natural (fine-tuned)"
            and r["method"] == "paper_cca"}
    assert len(ours) == 5 and set(theirs) == set(ours)
    for layer, v in ours.items():
        assert theirs[layer] == pytest.approx(v, abs=1e-6), layer
    # other stimuli (the val split) or other inputs (caffe) give other numbers
    for extra in (dict(split="val"), dict(preprocessing="caffe")):
        other = analyze_cca(tmp_path / "other", **extra)
        assert max(abs(other[l] - v) for l, v in ours.items()) > 1e-3, extra


def test_each_pair_and_map_prints_throttled_lines_inside(study, tmp_path, monkeypatch):
    """A CCA pair (its chance level, then the comparison) and a layer map are minutes of
    forward passes at full size: inside each item, throttled lines (every batch here:
    interval 0) named like the item's own line, and a map's line per method."""
    from medtransfer_jax import ticker
    monkeypatch.setattr(ticker, "INTERVAL_S", 0.0)
    wd = _copy(study, tmp_path)
    lines = _rerun(wd, ["representations"]).splitlines()   # forced: every item again
    st = runner.Study(_tiny_study_config(), str(wd))
    pairs = analyses.cca_pairs(st, "lesion", 0)
    for label in [p[0] for p in pairs]:
        name = analyses.item_name("lesion", 0, label)
        for head in (f"{name} (chance level): ", f"{name}: "):
            # the pool's images once per repeat (one batch each), 2 repeats
            got = [re.match(r"(\d+)/(\d+) images, repeat (\d)/2, ", l[len(head):])
                   for l in lines if l.startswith(head)]
            assert len(got) == 2 and all(got), (head, lines)
            (k, n, r1), (k2, n2, r2) = [tuple(int(x) for x in m.groups()) for m in got]
            assert (r1, r2) == (1, 2) and n == n2 == k2 == 2 * k > 0
    for _, _, _, label, *_ in analyses.map_pairs(st, analyses.layer_map_settings(st)):
        head = f"{analyses.map_item_name('lesion', 0, label)}: "
        got = [l[len(head):].split(", ")[0] for l in lines if l.startswith(head)]
        assert re.fullmatch(r"(\d+)/\1 images", got[0]) and got[1:3] == [
            "linear_cka 9x9 (1/2 methods)", "debiased_cka 9x9 (2/2 methods)"], lines
        assert len(got) == 4 and got[3].startswith("map done in "), lines


def test_resumed_representations_stage_skips_done_items_without_timing_them(study):
    """A representations stage interrupted with its CCA tables and one layer map written
    (not marked done): its rerun runs only the missing map (its line says 2/2), and the
    rates gain that one item only (the skipped CCA pairs and map add nothing)."""
    wd, _, _ = study
    rates_file = os.path.join(wd, "stages", "rates.json")
    before = json.load(open(rates_file))["stages"]
    index = _rows(os.path.join(wd, "tables", "layer_maps.csv"))
    os.remove(os.path.join(wd, next(r for r in index if r["pair"].startswith("random"))["csv"]))
    os.remove(os.path.join(wd, "stages", "representations.done"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = runner.run_study(_tiny_study_config(), wd, stages=["representations"])
    assert status == {"representations": "done"}
    lines = out.getvalue().splitlines()
    assert not [l for l in lines if l.startswith("representations ")]
    maps = [l for l in lines if l.startswith("layer maps ")]
    assert len(maps) == 1 and maps[0].startswith(
        "layer maps 2/2 lesion/fold0 random (pre) vs random (fine-tuned) [map]: diagonal ")
    after = json.load(open(rates_file))["stages"]
    b, a = before["representations"], after["representations"]
    assert a["items"] == b["items"] + 1
    assert a["units"] == pytest.approx(b["units"] + 96 / 5 * (32 / 224) ** 2)  # one map


def test_subprocess_runs_at_once_share_the_gpu_memory(tmp_path, monkeypatch):
    """--mode=subprocess --parallel=N on one GPU: each run preallocates a 1/N share
    (sweep.shared_gpu_env), else the second one could not start; --gpu_slots gives each
    run its slot; in-process runs keep the environment."""
    from medtransfer_jax.training import sweep
    for name in sweep.MEM_FRACTION_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    seen = []

    def fake_run_all(runs, parallel=1, mode="inprocess", env=None, **_):
        env = env or {}
        seen.append((mode, env.get("CUDA_VISIBLE_DEVICES"), env.get(sweep.MEM_FRACTION_ENV)))
        return {r.name: "done" for r in runs}

    monkeypatch.setattr(sweep, "run_all", fake_run_all)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    runs = sweep.expand_grid("demo", targets=[], folds=[0, 1, 2], root=str(tmp_path / "r"))
    runner.Study(_tiny_study_config(), str(tmp_path / "a"), mode="subprocess",
                 parallel=2)._run_all(runs)
    runner.Study(_tiny_study_config(), str(tmp_path / "b"))._run_all(runs)
    assert seen == [("subprocess", None, "0.450")] * 3 + [("inprocess", None, None)] * 3
    # --gpu_slots: a slot per run (as many at once as slots); a shared GPU splits its memory
    seen.clear()
    study = runner.Study(_tiny_study_config(), str(tmp_path / "c"), mode="subprocess",
                         gpu_slots=["0", "0", "1"])
    assert study.parallel == 3
    study._run_all(runs)
    assert len(seen) == 3 and set(seen) <= {("subprocess", "0", "0.450"),
                                            ("subprocess", "1", None)}
    with pytest.raises(runner.StudyError, match="--mode=subprocess"):
        runner.Study(_tiny_study_config(), str(tmp_path / "d"), gpu_slots=["0"])


def test_filters_stage_in_pair_bases_and_a_bad_basis(study, tmp_path):
    """``analysis.filters.basis=pair``: each pair in its own basis (the basis file goes,
    the caption says so); an unknown value is a pre-flight problem naming the field."""
    import shutil
    wd, _, _ = study
    copy = tmp_path / "wd"
    shutil.copytree(wd, copy)
    cfg = _tiny_study_config()
    cfg.analysis.filters = ml_collections.ConfigDict(dict(basis="pair"))
    st = runner.Study(cfg, str(copy))
    analyses.filters_stage(st)
    assert not os.path.exists(copy / "tables" / "filter_basis.json")
    from medtransfer_jax.analysis import filters as F
    from medtransfer_jax.weights import checkpoint
    pre, ft = (checkpoint.load_weights(d)[0]["params"] for d in (
        st.source_dir("natural"), st.fine_tuned_dir("lesion", "natural", fold=0)))
    own = F.analyse_filters({"natural:pre": pre, "natural:fine-tuned": ft})
    want = [r["drift"] for r in own.drift_rows if r["scope"] == "all"]
    got = [float(r["drift"]) for r in _rows(copy / "tables" / "filter_drift.csv")
           if r["source"] == "natural" and r["scope"] == "all"]
    assert got == [pytest.approx(want[0], rel=1e-9)]
    shared = [float(r["drift"]) for r in _rows(os.path.join(wd, "tables", "filter_drift.csv"))
              if r["source"] == "natural" and r["scope"] == "all"]
    assert shared[0] != pytest.approx(got[0], rel=1e-6)
    os.remove(copy / "stages" / "report.done")
    runner.run_study(cfg, str(copy), stages=["report"])
    assert "each (pre, fine-tuned) pair in its own PCA basis" in open(copy / "report.md").read()
    assert "one PCA basis and range over all 4 models" in open(
        os.path.join(wd, "report.md")).read()
    cfg.analysis.filters.basis = "global"
    pf = runner.preflight(cfg, str(copy))
    assert any("analysis.filters.basis='global'" in m for m in pf.missing), pf.missing


def test_robustness_reads_the_studys_auc_metric(study, tmp_path):
    """Source Matters reported Keras' AUC() (``analysis.auc_metric=auc_keras``): the
    robustness tables take that AUC from each run's results, not sklearn's binary AUC."""
    import shutil
    from medtransfer_jax.training import sweep
    wd, _, _ = study
    shutil.copytree(wd, tmp_path / "wd")
    cfg = _tiny_study_config()
    cfg.analysis.auc_metric = "auc_keras"
    st = runner.Study(cfg, str(tmp_path / "wd"))
    analyses.robustness(st)
    rows = _rows(tmp_path / "wd" / "tables" / "robustness.csv")
    runs = {r.keys["source"]: r for r in st.finetune_runs() if r.keys["confounder"] != "none"}
    differs = 0
    for row in rows:
        extra = sweep.read_results(runs[row["source"]].workdir)["extra_tests"]
        assert row["auc_metric"] == "auc_keras"
        for test in ("iid", "clean", "ood"):
            assert float(row[f"auc_{test}"]) == pytest.approx(extra[test]["auc_keras"], abs=1e-12)
            differs += extra[test]["auc_keras"] != pytest.approx(extra[test]["auc"], abs=1e-9)
    assert differs, "the two AUCs coincide on every test: the check would not see a mix-up"
    default = _rows(os.path.join(wd, "tables", "robustness.csv"))
    assert {r["auc_metric"] for r in default} == {"auc"}
    cfg.analysis.compare_sources = ["natural", "random"]
    analyses.robustness(runner.Study(cfg, str(tmp_path / "wd")))
    assert [r["test"] for r in _rows(tmp_path / "wd" / "tables" / "robustness_tests.csv")] == [
        "iid", "clean", "ood"]
    # Source Matters' notebook tests the o.o.d. AUCs only
    cfg.analysis.robustness_test_sets = ["ood"]
    analyses.robustness(runner.Study(cfg, str(tmp_path / "wd")))
    assert [r["test"] for r in _rows(tmp_path / "wd" / "tables" / "robustness_tests.csv")] == [
        "ood"]
    # each mean over folds carries its 95 % bootstrap CI (the Source Matters band)
    summ = _rows(tmp_path / "wd" / "tables" / "robustness_summary.csv")
    for r in summ:
        folds = [float(x["auc_ood"]) for x in rows
                 if (x["source"], x["p"]) == (r["source"], r["p"])]
        want = stats.bootstrap_mean_ci(folds)
        got = (float(r["auc_ood_ci_low"]), float(r["auc_ood_ci_high"]))
        assert got == pytest.approx(want, nan_ok=True)   # one fold here: NaN
    cfg.analysis.robustness_test_sets = ["ood", "reversed"]
    cfg.analysis.robustness_errorbar = "sem"
    pf = runner.preflight(cfg, str(tmp_path / "wd"))
    assert any("analysis.robustness_test_sets=['ood', 'reversed']: ['reversed'] unknown" in m
               for m in pf.missing), pf.missing
    assert any("analysis.robustness_errorbar='sem'" in m for m in pf.missing), pf.missing


def test_filters_stage_with_only_confounded_runs_fits_no_basis(study, tmp_path):
    """A Source Matters study fine-tunes no clean run: no (pre, fine-tuned) pair, so no
    basis to fit and no stem figure of pre-trained weights alone."""
    import shutil
    wd, _, _ = study
    shutil.copytree(wd, tmp_path / "wd")
    for f in ("filter_basis.json",):
        os.remove(tmp_path / "wd" / "tables" / f)
    for f in os.listdir(tmp_path / "wd" / "figures"):
        if f.startswith("conv1_filters"):
            os.remove(tmp_path / "wd" / "figures" / f)
    cfg = _tiny_study_config()
    cfg.targets.lesion.clean = False
    st = runner.Study(cfg, str(tmp_path / "wd"))
    assert st.clean_targets == []
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        analyses.filters_stage(st)
    assert not os.path.exists(tmp_path / "wd" / "tables" / "filter_basis.json")
    assert not [f for f in os.listdir(tmp_path / "wd" / "figures") if f.startswith("conv1")]
    assert _rows(tmp_path / "wd" / "tables" / "filter_drift.csv") == []
    assert "PCA basis" not in out.getvalue()


def test_report_says_what_the_figures_and_tables_hold(study):
    """Read as a first-time reader would: the layer maps' image count is the one used (the
    split can hold fewer than asked), each stem figure names its source, the drift section
    counts the cells above their noise floor, the AUC is named in words."""
    wd, _, _ = study
    md = open(os.path.join(wd, "report.md")).read()
    folder = os.path.join(wd, "layer_maps", "lesion_fold0")
    per_map = _rows(os.path.join(folder, sorted(f for f in os.listdir(folder)
                                                if f.endswith(".csv"))[0]))
    used = {int(float(r["images"])) for r in per_map if r.get("images") not in (None, "")}
    assert len(used) == 1
    n = used.pop()
    assert f"Computed on {n} images" in md
    if n < 24:
        assert "(analysis.layer_maps.num_images=24; the split has fewer)" in md
    for s in ("natural", "random"):
        assert f"{s}: the 7×7 stem filters (conv1_conv) before and after" in md
    drift = _rows(os.path.join(wd, "tables", "filter_drift_summary.csv"))
    above = sum(float(r["drift"]) > float(r["noise_floor"]) for r in drift)
    assert f"here {above} of {len(drift)} (source, depth bin) cells are above theirs" in md
    assert "## Headline: test AUC (ROC AUC: binary, or one-vs-rest macro)" in md
    assert ("Where each source's weights came from: **natural**: pre-trained in this study "
            "(demo.py); **random**: a random initialisation (seed 0); 'random vs random' "
            "compares it with a second one (seed 1).") in md


def test_a_stage_finished_by_other_code_is_kept_and_said(study, tmp_path, monkeypatch):
    """A resumed study keeps finished stages; when the library changed since, the skip line
    says the results are the older code's and how to redo them. Same code: silent."""
    import shutil
    from medtransfer_jax import provenance
    wd, _, _ = study
    shutil.copytree(wd, tmp_path / "wd")
    marker = tmp_path / "wd" / "stages" / "filters.done"
    assert f"code {provenance.code_fingerprint()}" in marker.read_text()
    marker.write_text("12.0s\n")   # a marker of a version that recorded no code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runner.run_study(_tiny_study_config(), str(tmp_path / "wd"),
                         stages=["filters", "robustness"])
    lines = out.getvalue().splitlines()
    filt = [l for l in lines if "filters: done earlier, skipped" in l]
    rob = [l for l in lines if "robustness: done earlier, skipped" in l]
    assert filt and filt[0].endswith(
        f"skipped (by an older version, not this code ({provenance.code_fingerprint()}): its "
        "results are kept; --stages=filters --force redoes it)")
    assert rob and rob[0].endswith("done earlier, skipped")
    # another version's fingerprint is named
    monkeypatch.setattr(provenance, "code_fingerprint", lambda: "0123456789ab")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runner.run_study(_tiny_study_config(), str(tmp_path / "wd"), stages=["robustness"])
    assert "(by code " in out.getvalue() and "not this code (0123456789ab)" in out.getvalue()


def test_fold_plot_box_draws_the_folds_of_done_clean_runs(study, tmp_path, monkeypatch):
    """``analysis.fold_plot=box`` (the Revisiting config): the AUC and prediction figures get
    the fold values (done, unconfounded runs; the study's AUC), and the captions say boxes;
    an unknown value is a pre-flight problem naming the field."""
    import shutil
    from medtransfer_jax.analysis import plots
    wd, _, _ = study
    copy = tmp_path / "wd"
    shutil.copytree(wd, copy)
    cfg = _tiny_study_config()
    cfg.analysis.fold_plot = "box"
    seen = {}

    def spy(name):
        real = getattr(plots, name)

        def wrapped(*a, **k):
            seen[name] = k.get("folds")
            return real(*a, **k)
        monkeypatch.setattr(plots, name, wrapped)
    spy("plot_auc_bars")
    spy("plot_prediction_similarity")
    st = runner.Study(cfg, str(copy))
    analyses.predictions(st)
    os.remove(copy / "stages" / "report.done")
    runner.run_study(cfg, str(copy), stages=["report"])
    runs = [r for r in _rows(copy / "tables" / "runs.csv") if r["confounder"] == "none"]
    assert [(f["target"], f["source"], f["auc"]) for f in seen["plot_auc_bars"]] == [
        (r["target"], r["source"], float(r["test.auc"])) for r in runs]
    pred_rows = _rows(copy / "tables" / "prediction_similarity.csv")
    assert len(seen["plot_prediction_similarity"]) == len(pred_rows) > 0
    report = open(copy / "report.md").read()
    assert report.count(plots.BOX_WORDS) == 2
    assert plots.BOX_WORDS not in open(os.path.join(wd, "report.md")).read()
    cfg.analysis.fold_plot = "violin"
    pf = runner.preflight(cfg, str(copy))
    assert any("analysis.fold_plot='violin'" in m for m in pf.missing), pf.missing


# ------------------------------------------------------------- damaged files of a study
def _copy(study, tmp_path):
    import shutil
    shutil.copytree(study[0], tmp_path / "wd")
    return tmp_path / "wd"


def _confounded_run(wd):
    st = runner.Study(_tiny_study_config(), str(wd))
    return next(r for r in st.finetune_runs() if r.keys["confounder"] != "none")


def _rerun(wd, stages, force=True):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runner.run_study(_tiny_study_config(), str(wd), stages=stages, force=force)
    return out.getvalue()


def _same_table(a, b, name):
    def strip(rows):
        return [{k: v for k, v in r.items() if k != "workdir"} for r in rows]
    assert strip(_rows(os.path.join(a, "tables", name))) == strip(_rows(b / "tables" / name))


def test_a_damaged_run_result_stops_the_robustness_stage_and_finetune_redoes_it(study, tmp_path):
    """A confounded run's results.json emptied after the fine-tuning stage: robustness used
    to read NaN AUCs for it and average over the other folds (exit 0); now it names the
    file and the stages that redo it, and those give back the undamaged tables."""
    from medtransfer_jax.studies import tables
    wd = _copy(study, tmp_path)
    run = _confounded_run(wd)
    for damage in (b"[]", b"", b"\xff\xfe garbage", json.dumps(
            {"status": "done", "val": {"auc": 0.5}}).encode()):
        with open(os.path.join(run.workdir, "results.json"), "wb") as f:
            f.write(damage)
        with pytest.raises(tables.TableError) as e:
            _rerun(wd, ["robustness"])
        assert "results.json" in str(e.value) and (
            "--stages=finetune,robustness,report --force" in str(e.value))
    from medtransfer_jax.training import sweep
    assert run.status() != "done"             # so the fine-tuning stage trains it again
    _rerun(wd, ["finetune", "robustness"])
    assert sweep.read_results(run.workdir)["status"] == "done"
    for name in ("robustness.csv", "robustness_summary.csv", "runs.csv"):
        _same_table(study[0], wd, name)


@pytest.mark.parametrize("table,damage,expect", [
    ("auc_summary.csv", b"", "empty (0 bytes)"),
    ("auc_summary.csv", b"\xff\xd8\xff\xe0 not text", "not UTF-8 text"),
    ("auc_summary.csv", "half", "changed since it was written"),
    ("auc_summary.csv", "half-undigested", "fields, the header"),
    ("auc_summary.csv", "last-row", "changed since it was written"),
    ("auc_summary.csv", "deleted", "missing, though it was written"),
    ("representations_summary.csv", "drop:pair", "changed since it was written"),
    ("representations_summary.csv", "drop:pair-undigested", "no column 'pair'"),
    ("layer_maps.csv", "drop:fold-undigested", "no column 'fold'"),
    ("robustness_summary.csv", "deleted", "missing, though it was written"),
])
def test_a_damaged_table_is_named_with_the_stage_that_rewrites_it(study, tmp_path, table,
                                                                  damage, expect):
    """Format checks (empty, not text, short rows, a missing column: what a table written
    before digests can show) and the digest each write records (a cut at a line boundary,
    a changed column, a deleted table), each named with the stages that rewrite it."""
    from medtransfer_jax.studies import tables
    wd = _copy(study, tmp_path)
    path = wd / "tables" / table
    if isinstance(damage, str) and damage.endswith("-undigested"):
        (wd / "tables" / tables.DIGESTS / table).unlink()
        damage = damage[:-len("-undigested")]
    if damage == "half":
        text = path.read_bytes()
        path.write_bytes(text[:len(text) // 2 + 3])
    elif damage == "last-row":
        lines = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(b"".join(lines[:-1]))
    elif damage == "deleted":
        path.unlink()
    elif isinstance(damage, str) and damage.startswith("drop:"):
        col = damage.split(":")[1]
        rows = _rows(path)
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, [k for k in rows[0] if k != col])
            w.writeheader()
            w.writerows([{k: v for k, v in r.items() if k != col} for r in rows])
    else:
        path.write_bytes(damage)
    with pytest.raises(tables.TableError) as e:
        _rerun(wd, ["report"])
    stage = tables.writer_stage(path)
    assert str(e.value).startswith(str(path)) and expect in str(e.value)
    assert f"--stages={stage},report --force" in str(e.value)
    _rerun(wd, stage.split(",") + ["report"])      # the fix it names works
    assert tables.read_csv(path)
    _same_table(study[0], wd, table)


def test_damaged_caches_are_computed_again_and_forced_stages_redo_theirs(study, tmp_path):
    """A representations stage resumed over a per-fold cache cut at a line boundary (or
    with rows duplicated) used to average it in ('(1 fold)', '(3 folds)' in a 2-fold
    study); the cache's digest shows the change and the fold is computed again. A forced
    stage (--stages=representations --force used to re-read every cache, even ones made
    by older code) starts without its caches."""
    wd = _copy(study, tmp_path)
    cache = wd / "representations" / "lesion_fold0.csv"
    lines = cache.read_bytes().splitlines(keepends=True)
    cache.write_bytes(b"".join(lines[:len(lines) // 2]))
    os.remove(wd / "stages" / "representations.done")
    out = _rerun(wd, None, force=False)
    assert f"{cache}: changed since it was written" in out and "computing it again" in out
    for name in ("representations.csv", "representations_summary.csv", "layer_maps.csv"):
        _same_table(study[0], wd, name)
    cache.write_bytes(b"".join(lines + lines[1:]))   # every row twice
    os.remove(wd / "stages" / "representations.done")
    _rerun(wd, ["representations"], force=False)
    _same_table(study[0], wd, "representations_summary.csv")
    other = wd / "layer_maps"
    stamp = {p: p.stat().st_mtime_ns for p in other.rglob("*.csv")}
    _rerun(wd, ["representations"])
    assert stamp and all(p.stat().st_mtime_ns != t for p, t in stamp.items())  # redone too
    for name in ("representations.csv", "representations_summary.csv", "layer_maps.csv"):
        _same_table(study[0], wd, name)


def test_filter_basis_damaged_or_gone_is_named_and_the_caption_follows_the_config(study,
                                                                                 tmp_path):
    from medtransfer_jax.studies import tables
    wd = _copy(study, tmp_path)
    basis = wd / "tables" / "filter_basis.json"
    digest = wd / "tables" / tables.DIGESTS / "filter_basis.json"
    for damage, expect in ((None, "missing, though analysis.filters.basis=study"),
                           (b"{}", "changed since it was written"),
                           (b"\xff\xfe", "not UTF-8 text"),
                           # a basis written before digests: its format is checked
                           (b"{\"models\": [", "not JSON"), (b"{}", "no 'models' list")):
        if damage is None:
            basis.unlink()
        else:
            basis.write_bytes(damage)
        if expect in ("not JSON", "no 'models' list") and digest.exists():
            digest.unlink()
        with pytest.raises(tables.TableError) as e:
            _rerun(wd, ["report"])
        assert expect in str(e.value) and "--stages=filters,report --force" in str(e.value)
    _rerun(wd, ["filters", "report"])
    assert "one PCA basis and range over all 4 models" in (wd / "report.md").read_text()


def test_bad_rates_a_damaged_marker_and_a_damaged_random_source_do_not_stop_a_study(
        study, tmp_path):
    from medtransfer_jax.weights import checkpoint
    wd = _copy(study, tmp_path)
    from medtransfer_jax.studies import progress, tables
    rates = wd / "stages" / "rates.json"
    data = json.loads(rates.read_text())
    data["stages"]["finetune"] = {"units": 3}             # no seconds
    data["stages"]["report"] = {"seconds": "x", "units": 1}
    rates.write_text(json.dumps(data))
    (wd / "stages" / tables.DIGESTS / "rates.json").unlink()   # as written before digests
    kept = progress.Rates.load(str(rates)).measured
    assert "finetune" not in kept and "report" not in kept and kept["representations"]
    (wd / "stages" / "filters.done").write_bytes(b"\xff\xfe\x00garbage")
    meta = wd / "sources" / "random" / "weights" / checkpoint.METADATA_FILE
    if not meta.exists():
        meta = next((wd / "sources" / "random").rglob(checkpoint.METADATA_FILE))
    before = checkpoint.load_weights(str(meta.parent))[0]
    meta.write_bytes(b"")
    out = _rerun(wd, None, force=False)
    assert "filters: done earlier, skipped (by an older version" in out
    out = _rerun(wd, ["sources", "report"])
    assert "source random: making it again" in out
    after = checkpoint.load_weights(str(meta.parent))[0]
    import jax
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                    jax.tree.leaves(after)))


def test_a_trained_study_still_checks_its_analysis_settings(study, tmp_path):
    """Pre-flight is skipped once training is done; a misspelled analysis setting on such
    a study was a plain ValueError traceback from the stage that read it."""
    wd = _copy(study, tmp_path)
    cfg = _tiny_study_config()
    cfg.analysis.auc_metric = "auc_kears"
    cfg.analysis.cca.repeats = 0
    with pytest.raises(runner.StudyError, match=r"2 analysis setting\(s\) to fix: "
                       r"analysis.auc_metric='auc_kears'.*analysis.cca.repeats=0"):
        runner.run_study(cfg, str(wd), stages=["report"], force=True)


def test_preflight_names_a_misspelled_or_missing_cca_field(tmp_path):
    """The stage reads analysis.cca's fields by name after fine-tuning: 'positons' was
    ignored and a missing 'seed' an AttributeError hours in."""
    c = _tiny_study_config()
    c.analysis.cca.positons = 5
    del c.analysis.cca["seed"]
    c.analysis.layer_maps.spatail = "pool"
    missing = runner.preflight(c, str(tmp_path / "wd")).missing
    assert any(m.startswith("analysis.cca has no field 'positons'; its fields: methods")
               for m in missing), missing
    assert "analysis.cca.seed is not set" in missing
    assert any(m.startswith("analysis.layer_maps has no field 'spatail'") for m in missing)
