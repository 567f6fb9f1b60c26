"""data.cache in the training loop: 'host' is the grain path bit for bit, 'device' learns,
evaluates every example and resumes bit-exactly after a SIGTERM."""
import _train_faults
import _train_utils
import numpy as np
import pytest

from medtransfer_jax.data import device_cache
from medtransfer_jax.data.base import DataError
from medtransfer_jax.training import loop, sweep

from test_train_resume import _assert_same_run  # noqa: E402  (same comparison as resume)


def _config(cache):
    cfg = sweep.load_config(sweep.Run("cache", _train_utils.TINY_CONFIG + ":two_phase", "/x"))
    cfg.data.cache = cache
    return cfg


def _count_decodes(monkeypatch):
    """Spy on decode_split: proves a cache mode really took the cached path."""
    calls = []
    real = device_cache.decode_split
    monkeypatch.setattr(device_cache, "decode_split",
                        lambda src, *a, **k: calls.append(len(src)) or real(src, *a, **k))
    return calls


@pytest.fixture(scope="module")
def device_reference(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("device_ref"))
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_decodes(mp)
        res = loop.train_and_evaluate(_config("device"), wd)
    assert len(calls) == 3  # train, val and test decoded once each, nothing per epoch
    return wd, res


def test_host_cache_equals_the_file_pipeline(tmp_path, monkeypatch):
    a = loop.train_and_evaluate(_config("none"), str(tmp_path / "none"))
    calls = _count_decodes(monkeypatch)
    b = loop.train_and_evaluate(_config("host"), str(tmp_path / "host"))
    assert len(calls) == 3 and sum(calls) == a["num_train"] + a["num_val"] + a["num_test"]
    _assert_same_run(str(tmp_path / "host"), str(tmp_path / "none"), a, b)


def test_device_cache_trains_and_evaluates_every_example(device_reference):
    _, res = device_reference
    assert res["status"] == "done"
    assert res["test"]["num_examples"] == res["num_test"]
    assert res["val"]["num_examples"] == res["num_val"]
    assert np.isfinite(res["val"]["loss"]) and 0.0 <= res["test"]["auc"] <= 1.0


def test_device_cache_resumes_bit_exactly(device_reference, tmp_path):
    ref_wd, ref_res = device_reference
    wd = str(tmp_path / "run")
    with pytest.raises(loop.Preempted):
        loop.train_and_evaluate(_config("device"), wd, hooks=[_train_faults.Fault("term", 6)])
    res = loop.train_and_evaluate(_config("device"), wd)
    _assert_same_run(wd, ref_wd, ref_res, res)


def test_unknown_cache_mode_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="--config.data.cache=gpu is not one of"):
        loop.train_and_evaluate(_config("gpu"), str(tmp_path / "x"))
