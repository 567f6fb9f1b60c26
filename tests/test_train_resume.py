"""Killing a run at any point and restarting it reproduces the uninterrupted run.

The run uses the two-phase schedule (head phase of 4 steps, then 8 full steps) so
resuming also crosses the phase boundary; checkpoints every 3 steps plus at every
evaluation (every 4 steps of a phase).
"""
import json
import os
import signal
import subprocess
import sys

import _train_faults
import _train_utils
import jax
import numpy as np
import pytest

from medtransfer_jax.training import loop, sweep
from medtransfer_jax.weights.checkpoint import load_weights

CONFIG = _train_utils.TINY_CONFIG + ":two_phase"


def _config():
    return sweep.load_config(sweep.Run("resume", CONFIG, "/unused"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("ref"))
    return wd, loop.train_and_evaluate(_config(), wd)


def _train_cli(workdir, fault=None, extra=()):
    env = _train_utils.subprocess_env()
    main = ([os.path.join(_train_utils.REPO, "tests", "_train_faults.py"), fault] if fault
            else ["-m", "medtransfer_jax.train"])
    cmd = [sys.executable, *main, f"--config={CONFIG}", f"--workdir={workdir}",
           "--xla_cache_dir=", *extra]
    return subprocess.run(cmd, env=env, cwd=_train_utils.REPO, capture_output=True, text=True,
                          timeout=400)


def _train_log(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [(r["step"], r["split"], r["loss"]) for r in recs if r["split"] in ("train", "val")]


def _assert_same_run(wd, ref_wd, ref_res, res):
    for sub in ("last", "best"):
        a, _ = load_weights(os.path.join(wd, "export", sub))
        b, _ = load_weights(os.path.join(ref_wd, "export", sub))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    assert _train_log(wd) == _train_log(ref_wd)
    for split in ("val", "test"):
        assert res[split] == ref_res[split]
    assert res["best_step"] == ref_res["best_step"]


def test_reference_run_has_two_phases(reference):
    wd, res = reference
    log = _train_log(wd)
    assert [s for s, split, _ in log if split == "train"] == [2, 4, 6, 8, 10, 12]
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        phases = {json.loads(line)["step"]: json.loads(line).get("phase") for line in f
                  if '"train"' in line}
    assert phases[4] == 0 and phases[6] == 1
    assert res["best_step"] in (8, 12)  # best is chosen in the final phase only


@pytest.mark.multiprocess
def test_sigkill_mid_epoch_and_during_save_then_resume(reference, tmp_path):
    ref_wd, ref_res = reference
    wd = str(tmp_path / "run")
    # 1) SIGKILL right after step 7's update: steps 7 is lost (last save at 6).
    p = _train_cli(wd, fault="kill:7")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert not os.path.exists(os.path.join(wd, "results.json"))
    steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
    assert steps[-1] == 6, steps
    # 2) Resume, then SIGKILL right after an async save of step 9 was started.
    p = _train_cli(wd, fault="kill_after_save:9", extra=["--config.checkpoint.async_save=True"])
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert "resumed from" in p.stderr
    # 3) Resume to the end.
    p = _train_cli(wd)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(wd, "results.json")) as f:
        res = json.load(f)
    _assert_same_run(wd, ref_wd, ref_res, res)


def test_sigterm_saves_and_resume_matches(reference, tmp_path):
    ref_wd, ref_res = reference
    wd = str(tmp_path / "run")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(loop.Preempted) as e:
        loop.train_and_evaluate(_config(), wd, hooks=[_train_faults.Fault("term", 5)])
    assert e.value.step == 5
    assert os.path.isdir(os.path.join(wd, "checkpoints", "5"))  # saved on the signal
    assert signal.getsignal(signal.SIGTERM) is before  # the loop's handler is uninstalled
    res = loop.train_and_evaluate(_config(), wd)
    _assert_same_run(wd, ref_wd, ref_res, res)


def test_cloud_tpu_preemption_notice_saves_and_stops(tmp_path, monkeypatch):
    """A preemption sync point (orbax reached_preemption) is handled like SIGTERM."""
    from medtransfer_jax.training import checkpointing
    monkeypatch.setattr(checkpointing.RunCheckpointer, "reached_preemption",
                        lambda self, step: step == 5)
    wd = str(tmp_path / "run")
    with pytest.raises(loop.Preempted, match="preemption notice") as e:
        loop.train_and_evaluate(_config(), wd)
    assert e.value.step == 5 and os.path.isdir(os.path.join(wd, "checkpoints", "5"))
    assert not os.path.exists(os.path.join(wd, "results.json"))


def test_best_step_outside_latest_checkpoints_survives_restarts(tmp_path):
    """The best checkpoint (step 4) must survive a restart followed by later saves (9, 12);
    it used to be deleted by the reopened manager, so the final evaluation failed."""
    cfg = sweep.load_config(sweep.Run("best", _train_utils.TINY_CONFIG + ":best_early", "/x"))
    ref_wd = str(tmp_path / "ref")
    ref = loop.train_and_evaluate(cfg, ref_wd)
    assert ref["best_step"] == 4 and ref["last_step"] == 12
    wd = str(tmp_path / "run")
    with pytest.raises(loop.Preempted):
        loop.train_and_evaluate(cfg, wd, hooks=[_train_faults.Fault("term", 7)])
    res = loop.train_and_evaluate(cfg, wd)  # resumes at 7: saves 8, 9, 12
    assert res["best_step"] == 4
    _assert_same_run(wd, ref_wd, ref, res)
    steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
    assert 4 in steps and steps[-1] == 12, steps


def test_protected_step_survives_a_reopened_manager(tmp_path):
    """Retention on its own: latest 2 + the protected step, across close/reopen."""
    from medtransfer_jax.training import checkpointing
    state = {"w": np.arange(4, dtype=np.float32)}

    def steps():
        return sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())

    ckpt = checkpointing.RunCheckpointer(str(tmp_path), max_to_keep=2, async_save=False)
    for step in range(1, 5):
        ckpt.save(step, state, None, {"step": step}, protect=1)
    ckpt.close()
    assert steps() == [1, 3, 4]
    ckpt = checkpointing.RunCheckpointer(str(tmp_path), max_to_keep=2, async_save=False)
    for step in (5, 6):
        ckpt.save(step, state, None, {"step": step}, protect=1)
    assert steps() == [1, 5, 6]
    ckpt.save(7, state, None, {"step": 7}, protect=7)  # a new best replaces the old one
    ckpt.close()
    assert steps() == [6, 7]


def test_resume_and_finished_runs_refuse_another_config(reference, tmp_path):
    """Resuming with other training settings would finish the run under them while
    config.json claimed them from the start: refused, naming the fields. Where files are
    and how the run is logged may change; a finished run is not silently reported for a
    config it was not trained with."""
    from medtransfer_jax.errors import WorkdirError
    wd = str(tmp_path / "run")
    with pytest.raises(loop.Preempted):
        loop.train_and_evaluate(_config(), wd, hooks=[_train_faults.Fault("term", 5)])
    changed = _config()
    changed.train.lr = 0.5
    changed.data.image_size = 48
    with pytest.raises(WorkdirError, match=r"holds a checkpoint \(step 5\).*"
                                           r"data.image_size: 32 -> 48;.*train.lr: 0.002 -> 0.5"):
        loop.train_and_evaluate(changed, wd)
    relocated = _config()
    relocated.log.every_steps = 1            # logging and layout may change on resume
    relocated.checkpoint.max_to_keep = 5
    res = loop.train_and_evaluate(relocated, wd)
    assert res["status"] == "done"
    with pytest.raises(WorkdirError, match="holds a finished run.*train.lr"):
        loop.train_and_evaluate(changed, wd)
    assert loop.train_and_evaluate(_config(), wd)["status"] == "done"  # same config: its results


def test_config_changes_ignore_paths_and_new_fields():
    from medtransfer_jax.training import run_setup
    c = _config()
    stored = json.loads(json.dumps(c.to_dict(), default=str))
    c.data.root = "/elsewhere"
    assert run_setup.config_changes(stored, c) == []
    del stored["train"]["lr"]                # a field a newer version added
    c.train.lr = 0.1
    assert run_setup.config_changes(stored, c) == []
    c.train.optimizer = "sgd"
    assert run_setup.config_changes(stored, c) == ["train.optimizer: 'adam' -> 'sgd'"]
