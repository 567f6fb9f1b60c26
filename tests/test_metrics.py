"""Metrics against scikit-learn / Keras (independent references) and a float64 NumPy loss."""
import numpy as np
import pytest
from sklearn import metrics as skm

from medtransfer_jax.inference import metrics, predictions


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


def _keras_auc_reference(labels, probs, num_thresholds=200):
    """Keras AUC() (ROC, interpolation 'interpolation' = trapezoid) written out threshold by
    threshold, in float64 loops: thresholds 0-eps, i/(T-1), 1+eps; 'positive' is > t."""
    y = np.eye(probs.shape[1], dtype=bool)[labels].ravel()
    p = probs.astype(np.float32).ravel()
    eps = 1e-7
    thresholds = [0.0 - eps] + [i / (num_thresholds - 1) for i in range(1, num_thresholds - 1)] \
        + [1.0 + eps]
    tpr, fpr = [], []
    for t in np.asarray(thresholds, np.float32):
        pred = p > t
        tpr.append((pred & y).sum() / y.sum())
        fpr.append((pred & ~y).sum() / (~y).sum())
    area = 0.0
    for i in range(num_thresholds - 1):
        area += (fpr[i] - fpr[i + 1]) * (tpr[i] + tpr[i + 1]) / 2.0
    return area


@pytest.mark.parametrize("k", [2, 4])
def test_reported_auc_keras_micro_vs_macro_on_biased_predictions(k):
    """On predictions biased towards one class (a shifted o.o.d. test), the Sep-2023 /
    Source Matters metric (Keras micro) and the sklearn one differ; each matches its own
    reference, and ``reported_auc`` carries the one the protocol names."""
    rng = np.random.default_rng(11)
    n = 300
    labels = rng.integers(0, k, n)
    labels[:k] = np.arange(k)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
    logits[:, 0] += 3.0                       # every example pushed towards class 0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    if k == 2:
        ref_sklearn = skm.roc_auc_score(labels, p[:, 1])
    else:
        ref_sklearn = skm.roc_auc_score(labels, p, multi_class="ovr", average="weighted")
    ref_keras = _keras_auc_reference(labels, p)
    m_keras = metrics.classification_metrics(labels, p, reported_auc="auc_keras")
    m_feb = metrics.classification_metrics(labels, p, reported_auc="auc_ovr_weighted")
    assert m_keras["reported_auc"] == pytest.approx(ref_keras, abs=1e-9)
    assert m_feb["reported_auc"] == pytest.approx(ref_sklearn, abs=1e-12)
    assert abs(ref_keras - ref_sklearn) > 0.03     # the bias separates the two definitions
    ref_macro = skm.roc_auc_score(labels, p[:, 1]) if k == 2 else \
        skm.roc_auc_score(labels, p, multi_class="ovr", average="macro")
    assert m_keras["auc"] == pytest.approx(ref_macro, abs=1e-12)     # the project's default
    assert abs(m_keras["reported_auc"] - m_keras["auc"]) > 0.03
    assert "reported_auc" not in metrics.classification_metrics(labels, p)
    with pytest.raises(ValueError, match="eval.reported_auc"):
        metrics.classification_metrics(labels, p, reported_auc="auc_macro_typo")
