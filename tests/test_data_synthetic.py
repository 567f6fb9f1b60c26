"""Synthetic tasks: deterministic from (seed, index), balanced, and learnable by simple features."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from medtransfer_jax import data
from medtransfer_jax.data.synthetic import SyntheticSource, lesion_image

pytestmark = pytest.mark.fast  # pure NumPy/SciPy: no JAX compilation


def _box_blur(x, k=5):
    from numpy.lib.stride_tricks import sliding_window_view
    return sliding_window_view(np.pad(x.astype(np.float64), k // 2, mode="edge"), (k, k)).mean((-1, -2))


def test_pure_function_of_seed_and_index():
    a = SyntheticSource(40, 32, seed=3)
    b = SyntheticSource(40, 32, seed=3)
    c = SyntheticSource(40, 32, seed=4)
    for i in (0, 7, 39):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        assert a[i]["id"] == b[i]["id"]
    assert not np.array_equal(a[5]["image"], c[5]["image"])
    # The image does not depend on what was read before (random access).
    np.testing.assert_array_equal(a[7]["image"], lesion_image(3, 7, int(a.labels[7]), 32))
    assert len(set(a.ids)) == 40


def test_record_format_and_sizes():
    for size in (16, 48, 100):
        s = SyntheticSource(6, size, seed=0)
        r = s[0]
        assert r["image"].dtype == np.uint8 and r["image"].shape == (size, size)
        assert set(r) >= {"image", "label", "id", "group", "sex", "age", "age_bucket"}
    nat = SyntheticSource(6, 24, seed=0, task="natural", num_classes=3)
    assert nat[0]["image"].shape == (24, 24, 3)
    with pytest.raises(data.DataError, match="task"):
        SyntheticSource(4, 16, task="nope")


def test_balanced_labels_and_patient_groups():
    s = SyntheticSource(100, 16, seed=1, num_classes=3, images_per_patient=4)
    counts = np.bincount(s.labels, minlength=3)
    assert counts.max() - counts.min() <= 4  # per-patient balance (patients of 4 images)
    for g in set(s.groups):
        idx = np.flatnonzero(s.groups == g)
        assert len(set(s.labels[idx])) == 1 and len(set(s.meta["sex"][idx])) == 1


def test_lesion_task_is_learnable_by_a_simple_feature():
    s = SyntheticSource(300, 48, seed=0)
    x = np.stack([s[i]["image"] for i in range(len(s))])
    # Feature: brightest smoothed spot above the image median.
    feat = np.array([_box_blur(im).max() - np.median(im) for im in x])
    auc = roc_auc_score(s.labels, feat)
    assert auc > 0.85, auc
    # Sanity: the plain mean is a much weaker cue (the lesion is local, not a global shift).
    assert roc_auc_score(s.labels, x.reshape(len(x), -1).mean(1)) < auc


def test_multiclass_lesion_kinds_are_separable():
    s = SyntheticSource(450, 40, seed=2, num_classes=3)  # normal / bright / dark
    x = np.stack([s[i]["image"] for i in range(len(s))]).astype(np.float64)
    feats = []
    for im in x:
        dog = _box_blur(im, 5) - _box_blur(im, 15)  # local contrast: blob vs its surroundings
        feats.append([dog.max(), -dog.min(), dog.std()])
    feats = np.array(feats)
    feats = (feats - feats.mean(0)) / feats.std(0)
    n = 300
    clf = LogisticRegression(max_iter=1000).fit(feats[:n], s.labels[:n])
    acc = clf.score(feats[n:], s.labels[n:])
    assert acc > 0.6, acc  # chance is 1/3


def test_natural_task_orientation_is_the_label():
    s = SyntheticSource(120, 32, seed=0, task="natural", num_classes=4)
    correct = 0
    for i in range(len(s)):
        im = s[i]["image"].astype(np.float64).mean(-1)
        gy, gx = np.gradient(_box_blur(im, 3))
        # Structure tensor: the dominant gradient direction is the wave vector's direction.
        angle = (0.5 * np.arctan2(2 * (gx * gy).sum(), (gx ** 2 - gy ** 2).sum())) % np.pi
        pred = int(np.round(angle / (np.pi / 4))) % 4
        correct += pred == s.labels[i]
    assert correct / len(s) > 0.8


def test_default_config_gives_synthetic_splits():
    cfg = data.default_data_config()
    cfg.synthetic.num_examples = 100
    sp = data.get_splits(cfg, fold=1)
    assert isinstance(sp, data.DatasetSplits)
    assert sp.name == "synthetic" and sp.num_classes == 2 and len(sp.class_names) == 2
    assert len(sp.train) + len(sp.val) + len(sp.test) == 100
    assert not set(sp.train.ids) & set(sp.test.ids) and not set(sp.val.ids) & set(sp.test.ids)
    assert sp.extra_tests == {}
    rec = sp.train[0]
    assert rec["image"].shape == (64, 64) and isinstance(rec["label"], int)
