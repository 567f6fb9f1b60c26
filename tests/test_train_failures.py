"""Runs that go wrong: divergence, non-finite validation metrics, a full disk."""
import errno
import glob
import json
import math
import os

import _train_utils  # noqa: F401  (persistent XLA cache)
import orbax.checkpoint as ocp
import pytest

from medtransfer_jax.training import loop, presets
from medtransfer_jax.training.loop_state import LoopState, improved
from medtransfer_jax.weights.checkpoint import CheckpointError


def _tiny(**kw):
    c = presets.tiny_config()
    c.sharding.num_devices = 1
    c.train.num_steps = 8
    c.eval.every_steps = 4
    for k, v in kw.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def test_exploding_loss_stops_within_one_log_interval(tmp_path):
    wd = str(tmp_path / "run")
    cfg = _tiny(**{"train.lr": 1e3, "log.every_steps": 2})
    with pytest.raises(loop.Diverged) as e:
        loop.train_and_evaluate(cfg, wd)
    msg = str(e.value)
    assert e.value.step == 2  # the first log interval already shows it
    assert "diverged at step 2" in msg and "lr 1e+03" in msg and "lower" in msg
    with open(os.path.join(wd, "results.json")) as f:
        res = json.load(f)
    assert res["status"] == "diverged" and res["step"] == 2 and res["lr"] == 1e3
    assert not math.isfinite(res["loss"]) or res["loss"] > 100 * math.log(2)
    assert not os.path.exists(os.path.join(wd, "export"))
    # A re-run does not train the diverged run again.
    with pytest.raises(loop.Diverged, match="diverged before"):
        loop.train_and_evaluate(cfg, wd)


def test_non_finite_validation_metric_is_never_best():
    assert not improved(float("nan"), None, "min", 0.0)
    assert not improved(float("inf"), 1.0, "max", 0.0)
    assert not improved(float("-inf"), 1.0, "min", 0.0)
    assert improved(0.5, 1.0, "min", 0.0) and not improved(1.0, 0.5, "min", 0.0)
    ls = LoopState()
    assert not ls.record_eval(4, {"loss": float("nan")}, "loss", "min", 0.0, True)
    assert ls.best.step is None and ls.es.wait == 1
    assert ls.record_eval(8, {"loss": 0.7}, "loss", "min", 0.0, True)
    assert not ls.record_eval(12, {"loss": float("nan")}, "loss", "min", 0.0, True)
    assert (ls.best.step, ls.best.value, ls.es.wait) == (8, 0.7, 1)
    again = LoopState.from_json(json.loads(json.dumps(ls.to_json())), "x")
    assert json.dumps(again.to_json()) == json.dumps(ls.to_json())  # NaN != NaN
    assert again.best == ls.best and again.es == ls.es
    # The dict of dicts saved by the previous version still resumes.
    v1 = {"version": 1, "phase": 1, "phase_start": 4, "phase_done": False,
          "es": {"best": 0.5, "best_step": 8, "wait": 1},
          "best": {"value": 0.5, "step": 8, "rank": 2, "metric": "loss", "metrics": {"loss": 0.5}},
          "stopped_early": False, "last_val": {"loss": 0.6, "step": 12}, "pending_train": []}
    old = LoopState.from_json(v1, "x")
    assert (old.phase, old.best.step, old.es.wait, old.last_val["step"]) == (1, 8, 1, 12)
    with pytest.raises(ValueError, match="x: loop state version 7"):
        LoopState.from_json(dict(v1, version=7), "x")


def test_disk_full_during_save_is_one_clear_error(tmp_path, monkeypatch):
    """ENOSPC while writing checkpoint 4: one CheckpointError naming the step directory and
    the fix; no half-written *.orbax-checkpoint-tmp* folder is left; the re-run resumes."""
    wd = str(tmp_path / "run")
    real_save = ocp.JsonCheckpointHandler.async_save
    calls = {"n": 0}

    async def full_disk(self, directory, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save (step 4), after a good one at step 3
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await real_save(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", full_disk)
    cfg = _tiny(**{"checkpoint.every_steps": 3})
    with pytest.raises(CheckpointError) as e:
        loop.train_and_evaluate(cfg, wd)
    msg = str(e.value)
    assert "checkpoints/4" in msg and "No space left on device" in msg and "ENOSPC" in msg
    assert "free disk space" in msg and "\n" not in msg
    assert not glob.glob(os.path.join(wd, "checkpoints", "*orbax-checkpoint-tmp*"))
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3"]
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", real_save)
    res = loop.train_and_evaluate(cfg, wd)
    assert res["status"] == "done" and res["last_step"] == 8


def test_tensorstore_disk_full_error_is_recognised():
    """Array writes fail inside tensorstore with a ValueError, not an OSError (seen on a
    600 KiB tmpfs: 'RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']')."""
    from medtransfer_jax.training import checkpointing
    ts = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x/_sharding\": Failed to "
                    "write 32923 bytes to file 14: No space left on device [os_error_code='28']")
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = ts
    err = checkpointing._os_error(wrapped)
    assert err is not None and err.errno == errno.ENOSPC
    assert checkpointing._os_error(ValueError("shape mismatch")) is None
