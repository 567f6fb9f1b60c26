"""Prediction similarity, kappa, AUC and predictions-CSV handling vs independent references."""
import csv

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from medtransfer_jax.analysis import predictions as P

pytestmark = pytest.mark.fast  # pure NumPy/SciPy: no JAX compilation


def _probs(rng, labels, k, skill):
    logits = rng.normal(size=(len(labels), k))
    logits[np.arange(len(labels)), labels] += skill
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_prediction_similarity_hand_example():
    labels = np.array([0, 0, 1, 1, 1, 0, 1, 0, 1, 1])
    # A right on 8 (wrong at 1, 2); B right on 6 (wrong at 2, 3, 4, 9)
    ya = labels.copy(); ya[[1, 2]] = 1 - ya[[1, 2]]
    yb = labels.copy(); yb[[2, 3, 4, 9]] = 1 - yb[[2, 3, 4, 9]]
    pa, pb = np.eye(2)[ya] * 0.8 + 0.1, np.eye(2)[yb] * 0.6 + 0.2
    r = P.prediction_similarity(labels, pa, pb)
    # both right: 0,5,6,7,8 ; both wrong: 2  -> 6 / 10
    assert r["observed"] == pytest.approx(0.6)
    assert (r["acc_a"], r["acc_b"]) == (0.8, 0.6)
    assert r["expected_independent"] == pytest.approx(0.8 * 0.6 + 0.2 * 0.4)
    assert r["expected_independent"] != pytest.approx(0.8 * 0.8 + 0.2 * 0.2)  # script's bug
    assert r["excess"] == pytest.approx(0.6 - 0.56)
    assert r["agreement"] == pytest.approx(np.mean(ya == yb))


def test_measures_match_sklearn_scipy():
    rng = np.random.default_rng(0)
    for k in (2, 4):
        labels = rng.integers(0, k, 300)
        pa, pb = _probs(rng, labels, k, 1.5), _probs(rng, labels, k, 0.8)
        r = P.prediction_similarity(labels, pa, pb)
        assert r["cohen_kappa"] == pytest.approx(cohen_kappa_score(pa.argmax(1), pb.argmax(1)))
        if k == 2:
            assert P.roc_auc(labels, pa) == pytest.approx(roc_auc_score(labels, pa[:, 1]))
            assert r["prob_correlation"] == pytest.approx(np.corrcoef(pa[:, 1], pb[:, 1])[0, 1])
        else:
            assert P.roc_auc(labels, pa) == pytest.approx(
                roc_auc_score(labels, pa, multi_class="ovr", average="macro"))
            want = np.mean([np.corrcoef(pa[:, c], pb[:, c])[0, 1] for c in range(k)])
            assert r["prob_correlation"] == pytest.approx(want)
    # ties in scores are handled like sklearn
    labels = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.2, 0.2, 0.5, 0.5, 0.9, 0.1])
    assert P.roc_auc(labels, s) == pytest.approx(roc_auc_score(labels, s))
    assert P.cohen_kappa([0, 1, 1], [0, 1, 1]) == 1.0


def test_auc_gain_vs_similarity_is_fitted_per_source():
    """One line per source, as the paper's simVSauc_plot.py: here ImageNet's gain rises
    with CCA and RadImageNet's falls, which one pooled line would average away."""
    rng = np.random.default_rng(1)
    recs = []
    for i, c in enumerate(rng.uniform(0.2, 0.9, 12)):
        src = ("imagenet", "radimagenet")[i % 2]
        auc = 0.7 + 0.2 * c if src == "imagenet" else 0.95 - 0.2 * c
        recs.append(dict(auc=auc, auc_random=0.65, source=src,
                         target=("breast", "knee")[i % 3 == 0],
                         similarity={"conv1_relu": c, "conv5_block3_out": rng.uniform()}))
    assert P.relative_auc_gain(0.9, 0.6) == pytest.approx(0.5)
    rows = P.auc_gain_vs_similarity(recs)
    assert [(r["source"], r["layer"]) for r in rows] == [
        ("imagenet", "conv1_relu"), ("imagenet", "conv5_block3_out"),
        ("radimagenet", "conv1_relu"), ("radimagenet", "conv5_block3_out")]
    by = {(r["source"], r["layer"]): r for r in rows}
    for src, sign in (("imagenet", 1.0), ("radimagenet", -1.0)):
        mine = [r for r in recs if r["source"] == src]
        x = np.array([r["similarity"]["conv1_relu"] for r in mine])
        y = np.array([(r["auc"] - 0.65) / 0.65 for r in mine])
        row = by[(src, "conv1_relu")]
        assert row["n"] == 6 and row["pearson_r"] == pytest.approx(sign)
        assert row["slope"] == pytest.approx(np.polyfit(x, y, 1)[0])
        assert row["target"] == [r["target"] for r in mine]   # the plot's colours
        x5 = np.array([r["similarity"]["conv5_block3_out"] for r in mine])
        assert by[(src, "conv5_block3_out")]["spearman_r"] == pytest.approx(
            stats.spearmanr(x5, y)[0])
    # records without a source (the analyze CLI's): one group
    plain = P.auc_gain_vs_similarity([{k: v for k, v in r.items() if k != "source"}
                                      for r in recs])
    assert [(r["source"], r["n"]) for r in plain] == [("", 12), ("", 12)]
    with pytest.raises(ValueError, match="random-init AUC"):
        P.relative_auc_gain(0.8, 0.0)


def _write(path, ids, labels, probs, split="test"):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "group", "split", "label"] + [f"prob_{k}" for k in range(probs.shape[1])])
        for i, l, p in zip(ids, labels, probs):
            w.writerow([i, f"g{i}", split, int(l)] + [f"{v:.8f}" for v in p])


def test_files_are_matched_by_id(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 50)
    ids = [f"img{i}" for i in range(50)]
    pa, pb, pr = (_probs(rng, labels, 3, s) for s in (2.0, 1.0, 0.1))
    _write(tmp_path / "a.csv", ids, labels, pa)
    perm = rng.permutation(50)  # B written in another order
    _write(tmp_path / "b.csv", [ids[i] for i in perm], labels[perm], pb[perm])
    _write(tmp_path / "r.csv", ids, labels, pr)
    out = P.compare_prediction_files(str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
                                     random_path=str(tmp_path / "r.csv"))
    want = P.prediction_similarity(labels, pa, pb)
    for k in want:
        assert out[k] == pytest.approx(want[k], abs=1e-6), k
    assert out["gain_a"] == pytest.approx((out["auc_a"] - out["auc_random"]) / out["auc_random"])
    loaded = P.load_predictions(str(tmp_path / "a.csv"))
    assert loaded["probs"].shape == (50, 3) and loaded["label"].dtype == np.int64


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        P.load_predictions(str(tmp_path / "missing.csv"))
    (tmp_path / "bad.csv").write_text("id,label,prob_0\nx,1,0.5\n")
    with pytest.raises(ValueError, match="header"):
        P.load_predictions(str(tmp_path / "bad.csv"))
    rng = np.random.default_rng(3)
    labels = np.array([0, 1, 1])
    _write(tmp_path / "a.csv", ["a", "b", "c"], labels, _probs(rng, labels, 2, 1))
    _write(tmp_path / "b.csv", ["a", "b", "d"], labels, _probs(rng, labels, 2, 1))
    _write(tmp_path / "c.csv", ["a", "b", "c"], 1 - labels, _probs(rng, labels, 2, 1))
    with pytest.raises(ValueError, match="1 ids only in"):
        P.compare_prediction_files(str(tmp_path / "a.csv"), str(tmp_path / "b.csv"))
    with pytest.raises(ValueError, match="different labels"):
        P.compare_prediction_files(str(tmp_path / "a.csv"), str(tmp_path / "c.csv"))


def test_paper_mode_reproduces_the_published_similarity_table(tmp_path):
    """mode='paper' = Feb-2023 prediction_similarity.py: the val fold, acc_A^2 + (1-acc_A)^2
    as the baseline, sklearn weighted one-vs-rest AUC for the gain; the default keeps the
    corrected baseline and macro AUC on the split asked for."""
    rng = np.random.default_rng(5)
    k, n = 3, 120
    labels = rng.integers(0, k, 2 * n)
    labels[:k] = labels[n:n + k] = np.arange(k)
    labels[n + k:n + 40] = 0                          # an imbalanced val fold: weighted != macro
    pa, pb, pr = (_probs(rng, labels, k, s) for s in (2.0, 0.7, 0.2))
    ids = [f"x{i}" for i in range(2 * n)]
    for name, p in (("a", pa), ("b", pb), ("r", pr)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "group", "split", "label"] + [f"prob_{c}" for c in range(k)])
            for i in range(2 * n):
                w.writerow([ids[i], "g", "test" if i < n else "val", int(labels[i])] +
                           [repr(float(v)) for v in p[i]])
    files = [str(tmp_path / f"{x}.csv") for x in ("a", "b")]
    paper = P.compare_prediction_files(*files, random_path=str(tmp_path / "r.csv"), mode="paper")
    val = slice(n, 2 * n)
    ya, yb, yv = pa[val].argmax(1), pb[val].argmax(1), labels[val]
    acc_a, acc_b = np.mean(ya == yv), np.mean(yb == yv)
    assert paper["n"] == n
    assert paper["observed"] == pytest.approx(np.mean((ya == yv) == (yb == yv)))
    assert paper["expected_independent"] == pytest.approx(acc_a ** 2 + (1 - acc_a) ** 2)
    assert acc_a != pytest.approx(acc_b)
    auc = {x: roc_auc_score(yv, p[val], multi_class="ovr", average="weighted")
           for x, p in (("a", pa), ("b", pb), ("r", pr))}
    assert paper["auc_a"] == pytest.approx(auc["a"]) and paper["auc_random"] == pytest.approx(auc["r"])
    assert paper["gain_b"] == pytest.approx((auc["b"] - auc["r"]) / auc["r"])
    # The default: corrected baseline and macro AUC, on the split asked for.
    fixed = P.compare_prediction_files(*files, split="val")
    assert fixed["expected_independent"] == pytest.approx(acc_a * acc_b + (1 - acc_a) * (1 - acc_b))
    macro = roc_auc_score(yv, pa[val], multi_class="ovr", average="macro")
    assert fixed["auc_a"] == pytest.approx(macro) and abs(macro - auc["a"]) > 1e-4
    with pytest.raises(ValueError, match="not one of"):
        P.compare_prediction_files(*files, mode="published")


def test_val_and_test_rows_are_not_pooled_by_default(tmp_path):
    """A training run's predictions.csv holds val and test rows; the comparison defaults to
    the test rows (val picked the model), and says which split it used."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 30)
    pa, pb = (_probs(rng, labels, 2, s) for s in (2.0, 1.0))
    for name, p in (("a", pa), ("b", pb)):
        _write(tmp_path / f"{name}_val.csv", [f"v{i}" for i in range(10)], labels[:10], p[:10],
               split="val")
        _write(tmp_path / f"{name}_test.csv", [f"t{i}" for i in range(20)], labels[10:],
               p[10:], split="test")
        rows = [(tmp_path / f"{name}_{s}.csv").read_text().splitlines() for s in ("val", "test")]
        (tmp_path / f"{name}.csv").write_text("\n".join(rows[0] + rows[1][1:]) + "\n")
    out = P.compare_prediction_files(str(tmp_path / "a.csv"), str(tmp_path / "b.csv"))
    want = P.prediction_similarity(labels[10:], pa[10:], pb[10:])
    assert out["split"] == "test" and out["n"] == 20
    assert out["observed"] == pytest.approx(want["observed"])
    pooled = P.compare_prediction_files(str(tmp_path / "a_test.csv"), str(tmp_path / "b_test.csv"))
    assert pooled["split"] == "all" and pooled["n"] == 20   # one split: all its rows
