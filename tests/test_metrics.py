"""Metrics against scikit-learn / Keras (independent references) and a float64 NumPy loss."""
import numpy as np
import pytest
from sklearn import metrics as skm

from medtransfer_jax.training import metrics, predictions


def _probs(rng, n, k, ties=False):
    logits = rng.normal(size=(n, k))
    if ties:  # coarse values: many exact ties within and across classes
        logits = np.round(logits * 2) / 2
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("ties", [False, True])
def test_binary_auc_matches_sklearn(ties):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y * 0.7
    if ties:
        s = np.round(s)
    assert metrics.binary_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_binary_auc_weighted_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # ties
    w = rng.uniform(0, 3, 300)
    assert metrics.binary_auc(y, s, sample_weight=w) == pytest.approx(
        skm.roc_auc_score(y, s, sample_weight=w), abs=1e-12)


@pytest.mark.parametrize("k,ties", [(2, False), (3, True), (7, False)])
def test_ovr_and_micro_match_sklearn(k, ties):
    rng = np.random.default_rng(k)
    n = 400
    labels = rng.integers(0, k, n)
    labels[:k] = np.arange(k)  # every class present
    p = _probs(rng, n, k, ties)
    p[np.arange(n), labels] += 0.3  # some signal
    p /= p.sum(1, keepdims=True)
    if k == 2:
        ref_macro = ref_weighted = skm.roc_auc_score(labels, p[:, 1])
    else:
        ref_macro = skm.roc_auc_score(labels, p, multi_class="ovr", average="macro")
        ref_weighted = skm.roc_auc_score(labels, p, multi_class="ovr", average="weighted")
    onehot = np.eye(k)[labels]
    ref_micro = skm.roc_auc_score(onehot.ravel(), p.ravel())
    assert metrics.auc_ovr(labels, p, "macro") == pytest.approx(ref_macro, abs=1e-12)
    assert metrics.auc_ovr(labels, p, "weighted") == pytest.approx(ref_weighted, abs=1e-12)
    assert metrics.auc_micro(labels, p) == pytest.approx(ref_micro, abs=1e-12)
    m = metrics.classification_metrics(labels, p)
    assert m["auc"] == pytest.approx(ref_macro, abs=1e-12)
    assert m["auc_ovr_weighted"] == pytest.approx(ref_weighted, abs=1e-12)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, p.argmax(1)))
    assert m["loss"] == pytest.approx(skm.log_loss(labels, p, labels=list(range(k))), rel=1e-9)


def test_keras_auc_matches_keras_metric():
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(3)
    k, n = 3, 120
    labels = rng.integers(0, k, n)
    p = _probs(rng, n, k).astype(np.float32)
    m = keras.metrics.AUC(num_thresholds=200)
    m.update_state(np.eye(k, dtype=np.float32)[labels], p)
    ref = float(np.asarray(m.result()))
    assert metrics.auc_keras(labels, p) == pytest.approx(ref, abs=1e-5)
    # The binned AUC approximates the exact micro AUC.
    assert abs(metrics.auc_keras(labels, p) - metrics.auc_micro(labels, p)) < 0.02


def test_undefined_auc_is_nan_and_bad_input_raises():
    p = np.array([[0.2, 0.8], [0.6, 0.4]])
    assert np.isnan(metrics.auc_ovr(np.array([1, 1]), p))
    assert np.isnan(metrics.binary_auc([0, 0, 0], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="labels must lie in"):
        metrics.auc_ovr(np.array([0, 2]), p)
    with pytest.raises(ValueError, match=r"probs must be \(N, K\)"):
        metrics.accuracy(np.array([0, 1]), np.array([0.1, 0.2]))


def test_predictions_roundtrip(tmp_path):
    rng = np.random.default_rng(4)
    p = _probs(rng, 5, 3)
    path = predictions.write_predictions(str(tmp_path / "p.csv"), [f"i{i}" for i in range(5)],
                                         ["g0", "g0", "g1", "g2", "g2"], "test",
                                         np.array([0, 1, 2, 1, 0]), p)
    out = predictions.read_predictions(path)
    assert list(out["id"]) == [f"i{i}" for i in range(5)]
    assert list(out["split"]) == ["test"] * 5
    np.testing.assert_array_equal(out["label"], [0, 1, 2, 1, 0])
    np.testing.assert_array_equal(out["probs"], p)  # repr() round-trips float64 exactly
    with open(path) as f:
        assert f.readline().strip() == "id,group,split,label,prob_0,prob_1,prob_2"
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not 'id,group,split,label"):
        predictions.read_predictions(str(bad))
