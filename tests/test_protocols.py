"""The papers' protocols as config files: each value as the papers' code had it, and the
fields the protocols rely on (resize method, reported AUC, splits) actually read."""
import importlib.util
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from medtransfer_jax import data
from medtransfer_jax.data.base import ArraySource
from medtransfer_jax.inference import predict
from medtransfer_jax.training import loop, presets, run_setup, sweep
from medtransfer_jax import sharding as shard_lib

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _load(sub, name, arg=None):
    path = os.path.join(CONFIGS, sub, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"cfg_{sub}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


#: Revisiting target -> (Sep-2023 size, Feb-2023 size, CCA.py size, horizontal flip).
SIZES = {"chest": (112, 112, 112, False), "breast": (256, 224, 224, True),
         "thyroid": (256, 112, 224, True), "mammograms": (224, 112, 224, True),
         "knee": (112, 112, 112, True), "isic": (112, 112, 112, True),
         "pcam": (96, 96, 96, True)}


@pytest.mark.parametrize("target", presets.REVISITING_TARGETS)
def test_revisiting_files_show_both_protocols(target):
    sep_size, feb_size, cca_size, hflip = SIZES[target]
    sep = _load("revisiting", target, "imagenet,fold=1")
    feb = _load("revisiting", target, "radimagenet,protocol=feb2023,freeze=true")
    for c in (sep, feb):
        assert c.data.resize_method == "nearest" and c.data.folds == "paper"
        assert c.model.preprocessing == "caffe" and c.model.dropout_rate == 0.5
        assert c.data.augment.flip == hflip and c.data.augment.fill == "nearest"
        assert c.analysis.cca_image_size == cca_size and c.analysis.cca_preprocessing == "caffe"
    assert c.data.synthetic.image_size == c.data.image_size      # one FieldReference
    assert (sep.data.image_size, feb.data.image_size) == (sep_size, feb_size)
    # folds=kfold's val share of the held-out fifth: make_dataframe.py's StratifiedKFold(5)
    # for the image-split targets, GroupKFold(4) for the patient-split ones
    by_image = target in ("breast", "isic", "pcam")
    assert (sep.data.fold, sep.data.heldout_val_fraction, feb.data.heldout_val_fraction) == (
        1, .2 if by_image else .25, 1.)
    assert (sep.train.lr, sep.train.batch_size, sep.train.num_epochs, sep.eval.patience) == \
        (1e-3, 256, 30, 30)
    assert (feb.train.lr, feb.train.batch_size, feb.train.num_epochs, feb.eval.patience) == \
        (1e-5, 128, 200, 3)
    assert (sep.eval.reported_auc, feb.eval.reported_auc) == ("auc_keras", "auc_ovr_weighted")
    assert sep.train.epoch_steps == feb.train.epoch_steps == "ceil"   # Keras: N/B steps
    # Feb-2023: Dense(1, sigmoid) for binary targets; Sep-2023: Dense(K, softmax)
    assert (sep.model.head, feb.model.head) == ("softmax", "sigmoid_binary")
    assert sep.train.freeze == "none"
    assert (feb.train.freeze, feb.train.head_phase.patience, feb.train.head_phase.lr,
            feb.train.head_phase.monitor) == ("two_phase", 2, 1e-3, "accuracy")
    assert _load("revisiting", target, "imagenet,freeze=1").train.head_phase.patience == 10
    csv_task = "pcam-small" if target == "pcam" else target
    assert sep.data.fold_csv_dir.endswith(os.path.join("revisiting-transfer", "data", csv_task))
    assert feb.data.fold_csv_dir.endswith(os.path.join("feb2023", "data", csv_task))
    assert "7bf4356" in feb.data.fold_csv_origin
    assert "MEDTRANSFER_FOLD_CSVS_FEB2023" in feb.data.fold_csv_origin
    assert "MEDTRANSFER_FOLD_CSVS=" in sep.data.fold_csv_origin
    assert (sep.analysis.similarity_mode, feb.analysis.similarity_mode) == ("corrected", "paper")
    rnd = _load("revisiting", target, "random")
    assert rnd.model.init == "random" and rnd.model.dropout_rate == 0.0


def test_revisiting_options_and_quirks():
    assert _load("revisiting", "knee", "imagenet").data.knee_layout == "png"
    with pytest.raises(ValueError, match="pcam-small subset"):
        _load("revisiting", "pcam", "imagenet,folds=kfold")
    assert _load("revisiting", "breast", "imagenet,folds=kfold").data.folds == "kfold"
    # The paper's argparse type=bool: '--freeze False' froze; strict parsing does not.
    assert _load("revisiting", "breast", "imagenet,freeze=False").train.freeze == "none"
    quirk = _load("revisiting", "breast", "imagenet,freeze=False,freeze_parse=argparse")
    assert quirk.train.freeze == "two_phase" and quirk.train.freeze_parse == "argparse"
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['lr'\]"):
        _load("revisiting", "breast", "imagenet,lr=3")
    with pytest.raises(ValueError, match="not one of"):
        _load("revisiting", "breast", "imagenet21k")
    with pytest.raises(ValueError, match="needs a pre-trained source"):
        _load("revisiting", "chest", "random,freeze=true")
    with pytest.raises(ValueError, match="protocol="):
        _load("revisiting", "chest", "imagenet,protocol=mar2023")


@pytest.mark.parametrize("kind", presets.CONFOUNDERS)
def test_source_matters_files(kind):
    c = _load("source_matters", kind, "radimagenet,p=0.2,fold=3")
    assert c.data.name == "nih_cxr14"                    # noise too (it was LIDC)
    assert (c.data.confounder.kind, c.data.confounder.p, c.data.fold) == (kind, 0.2, 3)
    assert c.model.preprocessing == "radimagenet" and not c.data.augment.flip
    assert (c.data.image_size, c.data.resize_method, c.data.folds) == (224, "nearest", "paper")
    assert (c.train.lr, c.train.batch_size, c.eval.patience, c.eval.reported_auc) == \
        (1e-3, 256, 30, "auc_keras")
    assert c.data.fold_csv_labels == "csv" and c.train.epoch_steps == "ceil"
    if kind == "sampled":
        assert c.data.fold_csv_dir.endswith(os.path.join("chest14", "gender", "F_20"))
        assert c.data.fold_csv_test.endswith(os.path.join("chest14", "gender", "test.csv"))
    else:
        assert c.data.fold_csv_dir.endswith(os.path.join("source-matters", "data", "chest14"))
    assert _load("source_matters", kind, "random").model.dropout_rate == 0.5
    lidc = _load("source_matters", kind, "imagenet,dataset=lidc")
    assert lidc.data.folds == "kfold"                     # no paper CSVs exist for LIDC
    noise = _load("source_matters", "noise", "imagenet,p=0")
    assert noise.data.confounder.p0_originals and noise.data.confounder.clean_test_originals



@pytest.mark.parametrize("sub,name,arg", [("revisiting", t, "imagenet")
                                          for t in presets.REVISITING_TARGETS] +
                         [("source_matters", k, "imagenet,p=0.5")
                          for k in presets.CONFOUNDERS])
def test_the_seed_option_is_the_runs_seed(sub, name, arg):
    """Every paper file accepts ``seed=S``; it must reach ``config.seed`` (it was parsed
    and dropped, so a sweep over --seeds ran the same seed under different names)."""
    assert _load(sub, name, arg).seed == 0
    assert _load(sub, name, arg + ",seed=7").seed == 7
    with pytest.raises(ValueError, match=r"seed='x' is not an integer"):
        _load(sub, name, arg + ",seed=x")
    with pytest.raises(ValueError, match=r"fold='1.5' is not an integer"):
        _load(sub, name, arg + ",fold=1.5")


def test_a_sweep_over_seeds_gives_runs_of_those_seeds(tmp_path):
    runs = sweep.expand_grid("revisiting", targets=["breast"], folds=[0], seeds=[0, 3],
                             root=str(tmp_path), config_dir=CONFIGS)
    assert [sweep.load_config(r).seed for r in runs] == [0, 3]
    runs = sweep.expand_grid("source_matters", targets=["tag"], folds=[0], seeds=[1, 2],
                             ps=[0.5], root=str(tmp_path), config_dir=CONFIGS)
    assert [sweep.load_config(r).seed for r in runs] == [1, 2]
    # Without --ps the runs are p = 0.5's, named so (a later --ps=0.5 finds them).
    plain = sweep.expand_grid("source_matters", targets=["tag"], folds=[0], seeds=[1, 2],
                              root=str(tmp_path), config_dir=CONFIGS)
    assert [r.name for r in plain] == [r.name for r in runs] == [
        "tag/imagenet/p0.5/fold0/seed1", "tag/imagenet/p0.5/fold0/seed2"]

def test_every_protocol_config_passes_validation_untouched():
    """configs.validation accepts every protocol file (both studies, every option) and
    the embedded demo, and changes no field."""
    from medtransfer_jax.configs import base, validation
    cases = [base.demo_config(), base.base_config(), presets.tiny_config()]
    for target in presets.REVISITING_TARGETS:
        cases += [_load("revisiting", target, arg) for arg in (
            "imagenet,fold=4", "radimagenet,protocol=feb2023,freeze=true", "random")]
    for kind in presets.CONFOUNDERS:
        cases += [_load("source_matters", kind, arg) for arg in (
            "radimagenet,p=0.2,fold=3", "imagenet,dataset=lidc", "random")]
    for c in cases:
        before = c.to_dict()
        validation.validate(c)
        assert c.to_dict() == before
    assert len(cases) == 3 + 3 * len(presets.REVISITING_TARGETS) + 3 * len(presets.CONFOUNDERS)
    bad = _load("revisiting", "breast", "imagenet,fold=4")
    bad.data.num_folds = 4   # the same fold, now out of range: the check reads the config
    with pytest.raises(data.DataError, match="--config.data.fold=4: the data has 4 folds"):
        validation.validate(bad)


def _synthetic_like(c, n=200):
    """The protocol's data section on the synthetic dataset (the project's own k-fold)."""
    c.data.name, c.data.folds = "synthetic", "kfold"
    c.data.synthetic.num_examples = n
    c.data.image_size = 16
    return c


def test_feb2023_split_sizes():
    """Feb-2023: train 80 % / one 20 % fold that is both val and test; Sep-2023: the held-out
    fifth split again into val and test, for breast (split by image) 4 % and 16 %."""
    feb = data.get_splits(_synthetic_like(_load("revisiting", "breast", "imagenet,protocol=feb2023")).data)
    assert (len(feb.train), len(feb.val)) == (160, 40)
    assert list(feb.test.ids) == list(feb.val.ids)
    assert not set(feb.train.ids) & set(feb.val.ids)
    sep = data.get_splits(_synthetic_like(_load("revisiting", "breast", "imagenet")).data)
    assert (len(sep.train), len(sep.val), len(sep.test)) == (160, 8, 32)
    assert not set(sep.val.ids) & set(sep.test.ids)


def test_the_train_loop_reads_data_resize_method_and_data_fold(monkeypatch, tmp_path):
    """data.resize_method used to be a dead field: the loop now hands it to the pipeline."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_train_iter(source, **kw):
        seen.update(kw, n=len(source))
        raise Stop

    c = presets.tiny_config()
    c.data.resize_method = "nearest"
    c.data.fold = 2
    monkeypatch.setattr(run_setup.data_lib, "make_train_iter", fake_train_iter)
    spec = types.SimpleNamespace(depth=18, layout="keras_v1", width=8)   # no model build
    monkeypatch.setattr(run_setup.model_init, "build_model_and_variables",
                        lambda *a, **k: (None, {}, "unit", "random", spec))
    with pytest.raises(Stop):
        loop.train_and_evaluate(c, str(tmp_path))
    assert seen["resize_method"] == "nearest"
    want = data.get_splits(c.data, fold=2)
    assert seen["n"] == len(want.train)


def test_evaluate_source_resizes_and_reports_the_protocol_auc():
    """The eval pass resizes with the method asked for and repeats the protocol's AUC as
    reported_auc. Scores = mean grey of the resized image, so they depend on the filter:
    a 1-pixel checkerboard is black under 'nearest' (input pixel (2i+1, 2j+1)) and
    mid-grey under 'bilinear'."""
    yy, xx = np.mgrid[0:32, 0:32]
    board = (((yy + xx) % 2) * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    flat = [np.full((32, 32), v, np.uint8) for v in rng.integers(0, 256, 11)]
    images = np.stack([board] + flat)
    labels = np.array([1] + list(rng.integers(0, 2, 11)))
    labels[1] = 0
    src = ArraySource(images, labels, ("a", "b"))
    mesh = shard_lib.make_mesh(1)

    def eval_step(variables, batch):
        m = jnp.mean(batch["image"], axis=(1, 2, 3))
        probs = jnp.stack([1.0 - m, m], axis=1)
        return {"probs": probs, "label": batch["label"], "weight": batch["weight"],
                "index": batch["index"], "loss": jnp.zeros_like(m)}

    out = {}
    for method in ("nearest", "bilinear"):
        mets, arrays = predict.evaluate_source(eval_step, None, src, mesh, image_size=16,
                                            preprocessing="unit", batch_size=4,
                                            resize_method=method, reported_auc="auc_ovr_weighted")
        out[method] = arrays["probs"][0, 1]
        assert mets["reported_auc"] == pytest.approx(
            skm.roc_auc_score(labels, arrays["probs"][:, 1]), abs=1e-12)
    assert out["nearest"] == pytest.approx(0.0, abs=1e-6)
    assert out["bilinear"] == pytest.approx(0.5, abs=0.02)


def test_image_size_ties_the_synthetic_size():
    c = presets.tiny_config()
    c.data.image_size = 48
    assert c.data.synthetic.image_size == 48
    c.data.synthetic.image_size = 40
    assert c.data.image_size == 40
    assert "fold" not in c and c.data.fold == 0          # one fold field: data.fold


def test_configs_without_options_refuse_an_argument(tmp_path):
    """configs/common.py and a sweep's resolved file take no argument: a `seed=3` given to
    them must fail, not run seed 0 (the shape of the dropped seed= option)."""
    from medtransfer_jax import configs
    from medtransfer_jax.errors import ConfigError
    common = os.path.join(CONFIGS, "common.py")
    assert configs.load(common).seed == 0
    resolved = configs.write_resolved(configs.load(common), str(tmp_path / "r.py"))
    for path in (common, resolved):
        with pytest.raises(ConfigError, match="takes no argument, got 'seed=3'"):
            configs.load(f"{path}:seed=3")


def test_the_head_phase_follows_the_runs_epochs_unless_set_itself():
    """Revisiting freeze=true: both phases get the protocol's epochs; shortening the run
    (--config.train.num_epochs=2) shortens the head phase too (it stayed at 30), and the
    head phase can still be set alone."""
    from medtransfer_jax import configs
    spec = os.path.join(CONFIGS, "revisiting", "breast.py") + ":imagenet,freeze=true"
    for overrides, want in (([], (30, 30)), (["train.num_epochs=2"], (2, 2)),
                            (["train.head_phase.num_epochs=5"], (30, 5)),
                            (["train.head_phase.num_epochs=5", "train.num_epochs=3"], (3, 5)),
                            (["train.num_epochs=3", "train.head_phase.num_epochs=5"], (3, 5))):
        c = configs.resolve(spec, overrides)
        assert (c.train.num_epochs, c.train.head_phase.num_epochs) == want, overrides
