"""The end-to-end study runner on a tiny config: every stage, the report, and resume.

One pre-trained stand-in source plus the random baseline, one synthetic target, one
fold, the tag confounder at p=1: four fine-tuning runs of a few steps at 32 px.
"""
import csv
import importlib.util
import math
import os

import _train_utils
import pytest

from medtransfer_jax.studies import runner

DEMO = os.path.join(_train_utils.REPO, "configs", "study_demo.py")
TRAIN = os.path.join(_train_utils.REPO, "configs", "demo.py")


def _tiny_study_config():
    spec = importlib.util.spec_from_file_location("study_demo", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.name = "tiny"
    c.folds = [0]
    common = [o for o in mod.COMMON if not o.startswith("train.warmup")] + ["log.every_steps=4"]
    nat = c.sources.natural
    nat.config = TRAIN
    nat.overrides = common + ["data.synthetic.task=natural", "data.synthetic.num_classes=3",
                              "data.synthetic.num_examples=96", "train.num_steps=6",
                              "model.preprocessing=unit"]
    del c.sources["medical"]
    t = c.targets.lesion
    t.config = TRAIN
    t.overrides = common + ["data.synthetic.task=lesion", "data.synthetic.num_classes=2",
                            "data.synthetic.num_examples=96", "data.synthetic.seed=21",
                            "train.num_steps=8", "eval.every_steps=4"]
    c.confounders[0].ps = [1.0]
    c.analysis.cca.update(positions=300, num_channels=8, repeats=1, num_images=24)
    return c


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("study"))
    status = runner.run_study(_tiny_study_config(), wd)
    return wd, status


def test_every_stage_ran_and_report_is_complete(study):
    wd, status = study
    assert status == {s: "done" for s in runner.STAGES}
    for name in ("report.md", "report.html"):
        assert os.path.getsize(os.path.join(wd, name)) > 500
    md = open(os.path.join(wd, "report.md")).read()
    for heading in ("Fine-tuning AUC", "Layer-wise representation similarity",
                    "Prediction similarity", "3×3 filter distributions",
                    "Robustness to confounders"):
        assert heading in md, heading
    # Every figure the report links exists and is a PNG.
    html = open(os.path.join(wd, "report.html")).read()
    figs = [line.split("](")[1].split(")")[0] for line in md.splitlines() if line.startswith("![")]
    assert len(figs) >= 4
    for f in figs:
        with open(os.path.join(wd, f), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", f
    # The HTML page is self-contained: one embedded PNG per figure.
    assert html.count("data:image/png;base64,") == len(figs)


def test_tables_have_expected_rows_and_finite_values(study):
    wd, _ = study
    runs = _rows(os.path.join(wd, "tables", "runs.csv"))
    # 2 sources x 1 fold x (clean + tag p=1)
    assert len(runs) == 4
    assert {r["source"] for r in runs} == {"natural", "random"}
    for r in runs:
        auc = float(r["test.auc"])
        assert 0.0 <= auc <= 1.0
    sim = _rows(os.path.join(wd, "tables", "representations_summary.csv"))
    layers = {r["layer"] for r in sim}
    assert len(layers) == 5  # the five stage outputs
    for r in sim:
        assert 0.0 <= float(r["value"]) <= 1.0 + 1e-5, r
    pairs = {r["pair"] for r in sim}
    assert any("(pre)" in p and "(fine-tuned)" in p for p in pairs)  # before vs after
    assert any(p.startswith("natural vs random") for p in pairs)      # between sources
    pred = _rows(os.path.join(wd, "tables", "prediction_similarity_summary.csv"))
    assert len(pred) == 1
    for k in ("observed", "expected_independent", "agreement"):
        assert 0.0 <= float(pred[0][k]) <= 1.0
    rob = _rows(os.path.join(wd, "tables", "robustness.csv"))
    assert len(rob) == 2
    for r in rob:
        for k in ("auc_iid", "auc_clean", "auc_ood"):
            assert 0.0 <= float(r[k]) <= 1.0
        drop = float(r["drop_iid_to_ood"])
        assert math.isclose(drop, float(r["auc_iid"]) - float(r["auc_ood"]), abs_tol=1e-9)
    drift = _rows(os.path.join(wd, "tables", "filter_drift.csv"))
    assert drift and all(float(r["drift"]) >= 0.0 for r in drift)


def test_rerun_skips_finished_and_redoes_an_unfinished_stage(study, capsys):
    wd, _ = study
    os.remove(os.path.join(wd, "stages", "report.done"))
    os.remove(os.path.join(wd, "report.md"))
    status = runner.run_study(_tiny_study_config(), wd)
    assert status["finetune"] == "skipped" and status["sources"] == "skipped"
    assert status["report"] == "done"
    assert os.path.exists(os.path.join(wd, "report.md"))


def test_bad_stage_name_is_a_clear_error(tmp_path):
    with pytest.raises(runner.StudyError, match="unknown stage"):
        runner.run_study(_tiny_study_config(), str(tmp_path), stages=["nope"])
