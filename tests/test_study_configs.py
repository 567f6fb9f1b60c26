"""The real-study configs: grids, one-argument subsets, each run's protocol, pre-flight,
and the filters-only study end to end on two tiny weights dirs."""
import importlib.util
import os

import _train_utils
import jax
import pytest

from medtransfer_jax.models import resnet
from medtransfer_jax.studies import runner, tables
from medtransfer_jax.training import sweep
from medtransfer_jax.weights import checkpoint

CONFIGS = os.path.join(_train_utils.REPO, "configs")


def _config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def test_revisiting_grid_and_subset(tmp_path):
    full = runner.Study(_config("study_revisiting"), str(tmp_path)).finetune_runs()
    assert len(full) == 7 * 5 * 5 == 175
    cfg = _config("study_revisiting", f"targets=breast,thyroid,folds=0,1,data={tmp_path}/d")
    study = runner.Study(cfg, str(tmp_path / "wd"))
    runs = study.finetune_runs()
    assert len(runs) == 2 * 5 * 2
    by_name = {r.name: r for r in runs}
    frz = sweep.load_config(by_name["breast/imagenet_frz/fold1"])
    assert frz.train.freeze == "two_phase" and frz.data.fold == 1
    assert frz.model.init == study.source_dir("imagenet") == study.source_dir("imagenet_frz")
    assert frz.data.root == str(tmp_path / "d" / "breast") and frz.train.lr == 1e-3
    rnd = sweep.load_config(by_name["thyroid/random/fold0"])
    assert rnd.train.freeze == "none" and rnd.model.init == study.source_dir("random")
    assert cfg.published == "revisiting" and cfg.analysis.auc_metric == "auc_keras"
    assert [list(p) for p in cfg.analysis.cca.between] == [
        ["imagenet", "radimagenet"], ["imagenet_frz", "radimagenet_frz"]]
    feb = _config("study_revisiting", "targets=breast,protocol=feb2023,freeze=no")
    feb_runs = runner.Study(feb, str(tmp_path)).finetune_runs()
    assert len(feb_runs) == 3 * 5 and sweep.load_config(feb_runs[0]).train.lr == 1e-5
    assert feb.published == ""  # the published table is the sep2023 protocol's


def test_revisiting_preflight_lists_missing_files(tmp_path):
    cfg = _config("study_revisiting", f"targets=breast,thyroid,folds=0,data={tmp_path}/d,"
                                      f"imagenet={tmp_path}/in.h5,radimagenet={tmp_path}/rad.h5")
    pf = runner.preflight(cfg, str(tmp_path / "wd"))
    # two .h5 files, two data roots, two fold-CSV folders (folds=paper is the default)
    assert len(pf.missing) == 6, pf.missing
    assert any("in.h5" in m for m in pf.missing) and any("rad.h5" in m for m in pf.missing)
    assert sum("data root" in m for m in pf.missing) == 2
    assert sum("fold_csv_dir" in m for m in pf.missing) == 2
    # 5 sources x 1 fold per target, <= 30 epochs over 4/5 of BUSI (780) / DDTI (480)
    assert pf.runs == 10 and pf.images == 5 * int(30 * 0.8 * 780) + 5 * int(30 * 0.8 * 480)
    with pytest.raises(ValueError, match="unknown argument 'target'"):
        _config("study_revisiting", "target=breast")
    with pytest.raises(ValueError, match="targets \\['lung'\\] unknown"):
        _config("study_revisiting", "targets=lung")


def test_source_matters_grid(tmp_path):
    full = runner.Study(_config("study_source_matters"), str(tmp_path)).finetune_runs()
    assert len(full) == 4 * 3 * 6 * 5
    cfg = _config("study_source_matters", "confounders=tag,noise,ps=0,1.0,folds=0")
    study = runner.Study(cfg, str(tmp_path))
    runs = study.finetune_runs()
    assert len(runs) == 2 * 3 * 2 and study.clean_targets == []
    r = [r for r in runs if r.name == "noise/radimagenet/noise-p1/fold0"][0]
    c = sweep.load_config(r)
    assert c.data.confounder.kind == "noise" and c.data.confounder.p == 1.0
    # The noise experiment defaults to the chest X-rays (#12.8); LIDC is one argument away.
    assert c.data.name == "nih_cxr14" and c.model.preprocessing == "radimagenet"
    lidc = runner.Study(_config("study_source_matters", f"confounders=noise,noise_dataset=lidc,"
                                                        f"lidc={tmp_path}/l,folds=0"),
                        str(tmp_path)).finetune_runs()
    c = sweep.load_config(lidc[0])
    assert c.data.name == "lidc" and c.data.root == str(tmp_path / "l")


def _save_tiny(path, seed):
    model = resnet.ResNet(depth=18, layout="keras_v1", width=8, num_classes=None)
    checkpoint.save_weights(str(path), resnet.init_variables(model, jax.random.key(seed), 32),
                            checkpoint.WeightsMetadata(source=f"s{seed}", layout="keras_v1",
                                                       depth=18, width=8, num_classes=None,
                                                       preprocessing="unit"))


def test_filters_study_end_to_end(tmp_path):
    _save_tiny(tmp_path / "alpha", 0)
    _save_tiny(tmp_path / "beta", 1)
    cfg = _config("study_filters", f"weights={tmp_path}/alpha,{tmp_path}/beta")
    assert set(cfg.sources) == {"alpha", "beta"}
    status = runner.run_study(cfg, str(tmp_path / "wd"))
    assert status["report"] == "done" and status["filters"] == "done"
    drift = [r for r in tables.read_csv(str(tmp_path / "wd" / "tables" / "filter_drift.csv"))
             if r["scope"] == "depth_bin"]
    assert {(r["a"], r["b"]) for r in drift} == {("alpha", "beta")}
    assert all(r["drift"] > 0 and r["noise_floor"] > 0 for r in drift)
    md = open(tmp_path / "wd" / "report.md").read()
    assert "filter_layer_statistics.png" in md and "filter_kl_drift.png" in md
