"""Per-layer weight change vs direct NumPy formulas."""
import numpy as np
import pytest

from medtransfer_jax.analysis import weight_change as W

pytestmark = pytest.mark.fast  # pure NumPy/SciPy: no JAX compilation


def _tree(rng):
    return {
        "params": {
            "conv1_conv": {"kernel": rng.normal(size=(7, 7, 3, 4)), "bias": rng.normal(size=4)},
            "conv1_bn": {"scale": rng.normal(size=4), "bias": rng.normal(size=4)},
            "conv2_block1_0_conv": {"kernel": rng.normal(size=(1, 1, 4, 8))},
            "conv2_block1_1_conv": {"kernel": rng.normal(size=(1, 1, 4, 2))},
            "predictions": {"kernel": rng.normal(size=(8, 10)), "bias": rng.normal(size=10)},
        },
        "batch_stats": {"conv1_bn": {"mean": rng.normal(size=4), "var": rng.uniform(size=4)}},
    }


def test_relative_l2_and_cosine():
    rng = np.random.default_rng(0)
    a = _tree(rng)
    b = {"params": {k: {n: v + 0.1 * rng.normal(size=np.shape(v)) for n, v in d.items()}
                    for k, d in a["params"].items()},
         "batch_stats": a["batch_stats"]}
    b["params"]["predictions"] = {"kernel": rng.normal(size=(8, 2)), "bias": np.zeros(2)}
    rows = {r["layer"]: r for r in W.weight_change(a, b)}
    va = np.r_[a["params"]["conv1_conv"]["bias"], a["params"]["conv1_conv"]["kernel"].ravel()]
    vb = np.r_[b["params"]["conv1_conv"]["bias"], b["params"]["conv1_conv"]["kernel"].ravel()]
    r = rows["conv1_conv"]
    assert r["rel_l2"] == pytest.approx(np.linalg.norm(vb - va) / np.linalg.norm(va))
    assert r["cosine"] == pytest.approx(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))
    assert r["num_params"] == va.size and r["kind"] == "conv"
    assert rows["conv1_bn"]["kind"] == "batchnorm"
    assert rows["predictions"]["status"] == "shape_mismatch"  # new 2-class head
    order = [r["layer"] for r in W.weight_change(a, b)]
    assert order == ["conv1_conv", "conv1_bn", "conv2_block1_1_conv", "conv2_block1_0_conv",
                     "predictions"]
    # identical trees: zero change, cosine 1
    same = {r["layer"]: r for r in W.weight_change(a, a)}
    assert all(r["rel_l2"] == 0 and r["cosine"] == pytest.approx(1.0) for r in same.values())


def test_batch_stats_and_missing_layers():
    rng = np.random.default_rng(1)
    a, b = _tree(rng), _tree(rng)
    del b["params"]["conv2_block1_0_conv"]
    rows = {r["layer"]: r for r in W.weight_change(a, b, include_batch_stats=True)}
    assert rows["conv2_block1_0_conv"]["status"] == "only_in_a"
    assert rows["conv1_bn"]["num_params"] == 16  # scale, bias, mean, var
