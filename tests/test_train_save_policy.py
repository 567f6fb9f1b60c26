"""When a run saves (training/save_policy.py): fewer saves, the same checkpoints, the same run.

The old policy saved at every evaluation (``checkpoint.every_secs=0`` keeps it). The new
default saves at evaluations only every ``every_secs``; a new best in between waits on
the device and is written first by the next save. These tests compare the two policies
on the same tiny run: the same results and exports, and the best's checkpoint identical
bit for bit (state, loop state, data position) to the one the old policy wrote.
"""
import json
import os

import _train_utils  # noqa: F401  (persistent XLA cache)
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medtransfer_jax.configs import validation
from medtransfer_jax.errors import ConfigError
from medtransfer_jax.training import loop, presets
from medtransfer_jax.weights.checkpoint import load_weights


def _config(every_secs, cache="device", **kw):
    fields = {"sharding.num_devices": 1, "data.cache": cache, "train.num_steps": 12,
              "eval.every_steps": 2, "eval.monitor": "loss", "checkpoint.every_steps": 0,
              "checkpoint.max_to_keep": 10, "checkpoint.every_secs": every_secs,
              "checkpoint.keep_when_done": True, **kw}   # compared after the run
    return presets.tiny_config([f"{k}={v}" for k, v in fields.items()])


def _steps(wd):
    return sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())


def _read(wd, step):
    d = os.path.join(wd, "checkpoints", str(step))
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(d, "state"))
    with open(os.path.join(d, "meta", "metadata")) as f:
        meta = json.load(f)
    it = [open(os.path.join(d, "data_iter", n)).read() for n in
          sorted(os.listdir(os.path.join(d, "data_iter"))) if n.startswith("process_")]
    assert it
    return state, meta, [json.loads(s) for s in it]


def _same_tree(a, b):
    import jax
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("cache,min_delta", [("device", 0.0), ("none", 1e9)])
def test_fewer_saves_same_run_same_best_checkpoint(tmp_path, cache, min_delta):
    """Both data paths (their data positions are saved differently); the best is a middle
    step (8) on one, the first evaluation (min_delta: nothing improves after it) on the
    other."""
    old_wd, new_wd = str(tmp_path / "old"), str(tmp_path / "new")
    kw = {"eval.min_delta": min_delta}
    old = loop.train_and_evaluate(_config(0.0, cache, **kw), old_wd)
    new = loop.train_and_evaluate(_config(3600.0, cache, **kw), new_wd)
    assert _steps(old_wd) == [2, 4, 6, 8, 10, 12]     # every evaluation
    best = new["best_step"]
    assert best == old["best_step"]
    # The new policy saved only the phase end, plus the best waiting on the device.
    assert _steps(new_wd) == sorted({best, 12})
    for key in ("val", "test", "last_step", "best_monitor_value"):
        assert new[key] == old[key], key
    for sub in ("best", "last"):
        _same_tree(load_weights(os.path.join(old_wd, "export", sub))[0],
                   load_weights(os.path.join(new_wd, "export", sub))[0])
    assert best != 12   # the snapshot written later equals the checkpoint written then
    s_old, m_old, it_old = _read(old_wd, best)
    s_new, m_new, it_new = _read(new_wd, best)
    _same_tree(s_old, s_new)
    assert m_old == m_new and it_old == it_new
    t = new["timing"]
    assert set(t) == {"integrity_s", "model_init_s", "data_s", "restore_s", "train_s",
                      "eval_s", "checkpoint_s", "finalize_s"}
    assert all(v >= 0 for v in t.values()) and t["train_s"] > 0 and t["eval_s"] > 0
    assert sum(t.values()) <= new["wall_time_s"] + 1e-3


def test_a_run_resumed_from_a_written_snapshot_finishes_identically(tmp_path):
    """Save every 5 steps: the best (an early step) is written before step 5 or 10; the
    run resumed from that checkpoint alone ends like the uninterrupted one."""
    ref_wd, wd = str(tmp_path / "ref"), str(tmp_path / "cut")
    cfg = _config(3600.0, **{"checkpoint.every_steps": 5, "eval.min_delta": 1e9})
    ref = loop.train_and_evaluate(cfg, ref_wd)
    assert ref["best_step"] == 2 and _steps(ref_wd) == [2, 5, 10, 12]
    loop.train_and_evaluate(cfg, wd)
    for name in os.listdir(os.path.join(wd, "checkpoints")):
        if name.isdigit() and int(name) != 2:
            import shutil
            shutil.rmtree(os.path.join(wd, "checkpoints", name))
    os.remove(os.path.join(wd, "results.json"))
    again = loop.train_and_evaluate(cfg, wd)
    for key in ("val", "test", "best_step", "last_step"):
        assert again[key] == ref[key], key


def test_every_secs_must_not_be_negative():
    with pytest.raises(ConfigError, match=r"--config.checkpoint.every_secs=-1.*>= 0"):
        validation.validate(_config(-1))
