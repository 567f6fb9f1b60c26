"""Chaos: one small run interrupted at six different points, then finished by re-running
the same command, ends bit-identical to the uninterrupted run (exported weights,
predictions CSV, results metrics, train log).

The run (tests/_train_tiny_config.py:best_early, async saves) saves at steps 3, 4, 6, 8,
9, 12 and its best step is 4, so the best checkpoint must survive every restart while
the latest ones move on.
"""
import glob
import json
import os
import signal
import subprocess
import sys

import _train_utils
import jax
import numpy as np
import pytest

from medtransfer_jax.training import loop, sweep
from medtransfer_jax.weights.checkpoint import load_weights

CONFIG = _train_utils.TINY_CONFIG + ":best_early"
FLAGS = ["--config.checkpoint.async_save=True", "--xla_cache_dir="]


def _cmd(wd, fault=None):
    main = ([os.path.join(_train_utils.REPO, "tests", "_train_faults.py"), fault] if fault
            else ["-m", "medtransfer_jax.train"])
    return [sys.executable, *main, f"--config={CONFIG}", f"--workdir={wd}", *FLAGS]


def _run(wd, fault=None):
    return subprocess.run(_cmd(wd, fault), env=_train_utils.subprocess_env(),
                          cwd=_train_utils.REPO, capture_output=True, text=True, timeout=300)


def _kill_during_setup(wd):
    """SIGKILL as soon as setup has logged the model (compilation starts next)."""
    p = subprocess.Popen(_cmd(wd), env=_train_utils.subprocess_env(), cwd=_train_utils.REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "model ResNet" in line:
            p.send_signal(signal.SIGKILL)
            break
    p.communicate(timeout=60)
    return p.returncode


def _steps(wd):
    return sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())


def _damage_latest(wd):
    """Garbles the latest checkpoint's arrays and leaves a half-written tmp folder."""
    latest = _steps(wd)[-1]
    for path in glob.glob(os.path.join(wd, "checkpoints", str(latest), "state", "**", "*"),
                          recursive=True):
        if os.path.isfile(path):
            with open(path, "wb") as f:
                f.write(b"\x00garbage")
    os.makedirs(os.path.join(wd, "checkpoints", f"{latest + 1}.orbax-checkpoint-tmp"),
                exist_ok=True)  # (the kill may already have left one)
    return latest


def _train_log(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        return [(r["step"], r["split"], r["loss"]) for r in map(json.loads, f)
                if r["split"] in ("train", "val")]


@pytest.mark.multiprocess
def test_six_interruptions_then_identical_results(tmp_path):
    ref_wd = str(tmp_path / "ref")
    cfg = sweep.load_config(sweep.Run("ref", CONFIG, ref_wd))
    cfg.checkpoint.async_save = True
    ref = loop.train_and_evaluate(cfg, ref_wd)
    assert ref["best_step"] == 4 and ref["last_step"] == 12

    wd = str(tmp_path / "run")
    assert _kill_during_setup(wd) == -signal.SIGKILL
    assert not _steps(wd)
    for fault in ("kill:5", "kill_after_save:6"):  # mid-epoch; right after an async save
        p = _run(wd, fault)
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    p = _run(wd, "term:7")                           # SIGTERM: saves step 7, exit 143
    assert p.returncode == 143, p.stderr[-2000:]
    assert 7 in _steps(wd)
    p = _run(wd, "kill:10")
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    damaged = _damage_latest(wd)                     # a damaged latest checkpoint
    p = _run(wd)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"checkpoints/{damaged} " in p.stderr and "previous good checkpoint" in p.stderr

    with open(os.path.join(wd, "results.json")) as f:
        res = json.load(f)
    for key in ("best_step", "last_step", "val", "test", "extra_tests", "best_monitor_value"):
        assert res[key] == ref[key], key
    for sub in ("best", "last"):
        a, _ = load_weights(os.path.join(wd, "export", sub))
        b, _ = load_weights(os.path.join(ref_wd, "export", sub))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
    for name in ("predictions.csv", "predictions/test.csv"):
        with open(os.path.join(wd, name), "rb") as f, open(os.path.join(ref_wd, name), "rb") as g:
            assert f.read() == g.read(), name
    assert _train_log(wd) == _train_log(ref_wd)
    assert 4 in _steps(wd)  # the best checkpoint survived five restarts
