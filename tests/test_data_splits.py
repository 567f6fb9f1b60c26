"""Splits: stratified, patient-grouped, reproducible; the paper's fold CSVs."""
import csv
import os

import numpy as np
import pytest
from sklearn.model_selection import StratifiedGroupKFold

from medtransfer_jax import data
from medtransfer_jax.data import splits

pytestmark = pytest.mark.fast  # pure NumPy/SciPy: no JAX compilation


def _dataset(n_patients=120, seed=0, k=3):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, n_patients)
    groups = np.repeat([f"p{i}" for i in range(n_patients)], sizes)
    # Labels mostly per patient (like a diagnosis), with some mixed patients.
    plabel = rng.integers(0, k, n_patients)
    labels = np.repeat(plabel, sizes)
    flip = rng.random(len(labels)) < 0.1
    labels[flip] = rng.integers(0, k, flip.sum())
    return labels, groups


def _class_fraction_spread(labels, folds, n_splits):
    fr = np.array([np.bincount(labels[folds == f], minlength=labels.max() + 1) / np.bincount(labels)
                   for f in range(n_splits)])
    return fr.std(0).mean()


def test_group_kfold_no_leakage_every_example_once_and_balanced():
    labels, groups = _dataset()
    folds = splits.stratified_group_kfold(labels, groups, 5, seed=2)
    assert folds.shape == labels.shape and set(folds) == set(range(5))
    for g in set(groups):
        assert len(set(folds[groups == g])) == 1, g
    sizes = np.bincount(folds)
    assert sizes.min() > 0.7 * sizes.max()
    # Class balance at least as good as scikit-learn's StratifiedGroupKFold on the same data.
    sk = np.empty(len(labels), int)
    for f, (_, te) in enumerate(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(labels, labels, groups)):
        sk[te] = f
    ours, theirs = _class_fraction_spread(labels, folds, 5), _class_fraction_spread(labels, sk, 5)
    assert ours <= theirs * 1.5 + 1e-3, (ours, theirs)
    assert ours < 0.05


def test_without_groups_matches_stratified_kfold_balance():
    rng = np.random.default_rng(1)
    labels = rng.choice(3, size=503, p=[0.6, 0.3, 0.1])
    folds = splits.stratified_group_kfold(labels, None, 5, seed=2)
    for c in range(3):
        per_fold = np.bincount(folds[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1  # StratifiedKFold's guarantee


def test_reproducible_and_seed_dependent():
    labels, groups = _dataset(seed=3)
    a = splits.stratified_group_kfold(labels, groups, 5, seed=2)
    b = splits.stratified_group_kfold(labels, groups, 5, seed=2)
    c = splits.stratified_group_kfold(labels, groups, 5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_train_val_test_partition_per_fold():
    labels, groups = _dataset(seed=4)
    tests = []
    for fold in range(5):
        tr, va, te = splits.train_val_test_indices(labels, groups, fold, 5, 2, 0.25)
        allidx = np.concatenate([tr, va, te])
        assert sorted(allidx.tolist()) == list(range(len(labels)))
        splits.check_no_leakage(groups, tr, va, te)
        n = len(labels)
        assert 0.02 < len(va) / n < 0.09 and 0.1 < len(te) / n < 0.22
        tests.append(np.concatenate([va, te]))
    # The held-out parts of the 5 folds partition the data.
    assert sorted(np.concatenate(tests).tolist()) == list(range(len(labels)))
    tr, va, te = splits.train_val_test_indices(labels, groups, 0, 5, 2, 1.0)
    np.testing.assert_array_equal(va, te)
    with pytest.raises(ValueError, match="0-based"):
        splits.train_val_test_indices(labels, groups, 5, 5)


def test_leakage_check_catches_shared_patient():
    groups = np.array(["a", "a", "b", "c"], dtype=object)
    with pytest.raises(data.DataError, match="'a'"):
        splits.check_no_leakage(groups, np.array([0, 2]), np.array([1, 3]))


def test_too_few_groups_is_a_clear_error():
    with pytest.raises(data.DataError, match="3 patients"):
        splits.stratified_group_kfold([0, 1, 0, 1], ["a", "a", "b", "c"], 5)


def test_get_splits_groups_synthetic_patients():
    cfg = data.default_data_config()
    cfg.synthetic.num_examples = 150
    cfg.synthetic.images_per_patient = 3
    sp = data.get_splits(cfg, fold=2)
    splits.check_no_leakage(np.concatenate([sp.train.groups, sp.val.groups, sp.test.groups]),
                            np.arange(len(sp.train)),
                            np.arange(len(sp.val)) + len(sp.train),
                            np.arange(len(sp.test)) + len(sp.train) + len(sp.val))
    sp2 = data.get_splits(cfg, fold=2)
    assert list(sp.test.ids) == list(sp2.test.ids)


def _write_fold_csv(path, rows, with_pid=False):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "path", "class"] + (["pid"] if with_pid else []))
        for i, r in enumerate(rows):
            w.writerow([i] + list(r))


def test_read_paper_fold_csvs(tmp_path):
    relpaths = [f"benign/benign ({i}).png" for i in range(6)] + [f"malignant/malignant ({i}).png" for i in range(4)]
    class_names = ("benign", "malignant")
    labels = np.array([0] * 6 + [1] * 4)
    d = tmp_path / "breast"
    d.mkdir()
    p = lambda r: "../../../data/breast/" + os.path.basename(r)  # the paper's flat layout
    _write_fold_csv(d / "train_fold2.csv", [(p(relpaths[i]), class_names[labels[i]]) for i in (0, 1, 2, 6, 7)])
    _write_fold_csv(d / "val_fold2.csv", [(p(relpaths[i]), class_names[labels[i]]) for i in (3, 8)])
    _write_fold_csv(d / "test_fold2.csv", [(p(relpaths[i]), class_names[labels[i]]) for i in (4, 5, 9)])
    idx = splits.read_fold_csvs(str(d), 1, relpaths, class_names, labels)
    assert idx["train"].tolist() == [0, 1, 2, 6, 7]
    assert idx["val"].tolist() == [3, 8] and idx["test"].tolist() == [4, 5, 9]
    # A row naming a file that the dataset does not have.
    _write_fold_csv(d / "val_fold2.csv", [(p(relpaths[3]), "benign"), ("../x/ghost.png", "benign")])
    with pytest.raises(data.DataError, match="ghost.png"):
        splits.read_fold_csvs(str(d), 1, relpaths, class_names, labels)
    # A different label rule.
    _write_fold_csv(d / "val_fold2.csv", [(p(relpaths[3]), "malignant")])
    with pytest.raises(data.DataError, match="disagree"):
        splits.read_fold_csvs(str(d), 1, relpaths, class_names, labels)
    with pytest.raises(data.DataError, match="not found"):
        splits.read_fold_csvs(str(d), 3, relpaths)



def test_paper_csvs_list_an_image_once_per_abnormality(tmp_path):
    """CBIS-DDSM: the dataset holds an image once per abnormality, and so do the paper's
    CSVs (2,854 rows, 2,478 paths in mammograms/train_fold1.csv; some images have a benign
    and a malignant finding). Each row takes its own copy, with its class; it failed
    (an ambiguous match) before."""
    relpaths = ["images/A.png", "images/A.png", "images/B.png", "images/C.png", "images/C.png"]
    class_names = ("benign", "malignant")
    labels = np.array([0, 1, 0, 1, 1])
    d = tmp_path / "mammograms"
    d.mkdir()
    p = lambda r: "../../data/CBIS/" + r   # noqa: E731
    _write_fold_csv(d / "train_fold1.csv", [(p("images/A.png"), "malignant"),
                                            (p("images/A.png"), "benign"),
                                            (p("images/C.png"), "malignant"),
                                            (p("images/C.png"), "malignant")])
    _write_fold_csv(d / "val_fold1.csv", [(p("images/B.png"), "benign")])
    idx = splits.read_fold_csvs(str(d), 0, relpaths, class_names, labels)
    assert idx["train"].tolist() == [0, 1, 3, 4] and idx["val"].tolist() == [2]
    # a class no copy of the file has is still a different label rule
    _write_fold_csv(d / "val_fold1.csv", [(p("images/C.png"), "benign")])
    with pytest.raises(data.DataError, match="disagree"):
        splits.read_fold_csvs(str(d), 0, relpaths, class_names, labels)
    # two different files that fit equally well stay ambiguous (a missing row)
    m = splits.PathMatcher(["a/X.png", "b/X.png", "images/A.png", "images/A.png"])
    assert m.examples_of("X.png") == [] and m.examples_of("c/images/A.png") == [2, 3]

def test_path_matcher_uses_longest_suffix():
    m = splits.PathMatcher(["train/NORMAL/IM-1.jpeg", "test/NORMAL/IM-1.jpeg", "val/PNEUMONIA/x.jpeg"])
    assert m.match("../../../data/chest_xray/test/NORMAL/IM-1.jpeg") == 1
    assert m.match("/a/b/x.jpeg") == 2
    assert m.match("IM-1.jpeg") is None  # ambiguous
    assert m.match("nothing.png") is None
