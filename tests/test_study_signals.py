"""Chaos test of the study (#10.2, #10.4): SIGTERM a tiny study mid-finetune and again
mid-analysis; each stop exits 143 with the resume command; the resumed study's tables
are identical to those of an uninterrupted study.

Minutes, not seconds (two tiny studies); marked ``chaos`` so it can be deselected
locally, and CI runs it once.
"""
import csv
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
from _train_utils import REPO, subprocess_env

CONFIG = os.path.join(REPO, "tests", "_study_tiny_config.py")
PATH_COLUMNS = ("workdir",)


def _start(workdir):
    return subprocess.Popen(
        [sys.executable, "-m", "medtransfer_jax.study", f"--config={CONFIG}",
         f"--workdir={workdir}"], cwd=REPO, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop_when(p, ready, what, timeout=600):
    """SIGTERMs ``p`` once ``ready()``; returns (returncode, stderr)."""
    deadline = time.time() + timeout
    while not ready():
        assert p.poll() is None, f"study ended before {what}: {p.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def _tables(workdir):
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "tables", "*.csv"))):
        with open(path) as f:
            rows = [{k: v for k, v in r.items() if k not in PATH_COLUMNS}
                    for r in csv.DictReader(f)]
        out[os.path.basename(path)] = rows
    return out


@pytest.mark.chaos
def test_study_killed_mid_finetune_and_mid_analysis_resumes_to_identical_tables(tmp_path):
    ref = tmp_path / "ref"
    p = _start(ref)
    out, err = p.communicate(timeout=1800)
    assert p.returncode == 0, err[-3000:]

    wd = tmp_path / "chaos"
    # 1) mid-finetune: as soon as the first fine-tuning run has a checkpoint.
    rc, out, err = _stop_when(
        _start(wd), lambda: glob.glob(str(wd / "finetune" / "*" / "*" / "*" / "checkpoints" / "*"))
        or glob.glob(str(wd / "finetune" / "*" / "*" / "*" / "*" / "checkpoints" / "*")),
        "a fine-tuning checkpoint")
    assert rc == 143, err[-3000:]
    assert "study: stopped" in err and "Resume with the same command" in err
    assert "Traceback" not in err
    assert not os.path.exists(wd / "stages" / "finetune.done")

    # 2) mid-analysis: when the representations stage starts.
    p = _start(wd)
    started = []

    def analysing():
        line = p.stdout.readline()
        started.append(line)
        return "representations: running" in line
    rc, out, err = _stop_when(p, analysing, "the representations stage")
    assert rc == 143, err[-3000:]
    assert "finetune.done" in os.listdir(wd / "stages")
    assert not os.path.exists(wd / "stages" / "report.done")

    # 3) the rerun finishes, and every table equals the uninterrupted study's.
    p = _start(wd)
    out, err = p.communicate(timeout=1800)
    assert p.returncode == 0, err[-3000:]
    want, got = _tables(ref), _tables(wd)
    assert len(want) >= 5 and sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name


def test_train_ctrl_c_saves_a_checkpoint_and_exits_143(tmp_path):
    """Ctrl-C (SIGINT) to the train main stops like SIGTERM: checkpoint, 143, resume line."""
    wd = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "medtransfer_jax.train",
         f"--config={os.path.join(REPO, 'tests', '_train_tiny_config.py')}",
         f"--workdir={wd}", "--config.train.num_steps=400", "--xla_cache_dir="],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    deadline = time.time() + 300
    while not glob.glob(str(wd / "checkpoints" / "[0-9]*")):
        assert p.poll() is None and time.time() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-3000:]
    assert "train: stopped" in err and "Resume with the same command" in err
    assert "KeyboardInterrupt" not in err and "Traceback" not in err
    steps = [int(os.path.basename(d)) for d in glob.glob(str(wd / "checkpoints" / "[0-9]*"))]
    assert steps and max(steps) < 400  # it saved where it stopped, long before the end


TINY_DEMO = ["--override=data.image_size=32", "--override=data.synthetic.image_size=32",
             "--override=data.synthetic.num_examples=160", "--override=model.width=8",
             "--override=train.batch_size=16", "--override=eval.batch_size=32",
             "--override=train.num_epochs=1", "--override=train.num_steps=12",
             "--override=train.warmup_steps=0", "--override=eval.every_steps=4",
             "--override=checkpoint.every_steps=3", "--override=sharding.num_devices=1"]


def _sweep(root):
    return subprocess.Popen(
        [sys.executable, "-m", "medtransfer_jax.sweep", "--study=demo", "--folds=0,1",
         f"--output_dir={root}", *TINY_DEMO], cwd=REPO, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results_table(root):
    with open(os.path.join(root, "results.csv")) as f:
        return [{k: v for k, v in r.items() if k not in PATH_COLUMNS} for r in csv.DictReader(f)]


@pytest.mark.chaos
def test_sweep_sigterm_mid_run_then_rerun_gives_the_same_table(tmp_path):
    ref = _sweep(tmp_path / "ref")
    out, err = ref.communicate(timeout=900)
    assert ref.returncode == 0, err[-3000:]
    assert "run 2/2 demo/fold1/seed0: test AUC " in out and ", ETA 0 s" in out, out
    root = tmp_path / "chaos"
    rc, out, err = _stop_when(
        _sweep(root), lambda: glob.glob(str(root / "demo" / "fold0" / "seed0" / "checkpoints"
                                            / "[0-9]*")), "the first run's checkpoint")
    assert rc == 143, err[-3000:]
    assert "sweep: stopped (1 run(s) saved and stopped; 1 run(s) not started)" in err, err
    assert "Resume with the same command" in err
    assert not os.path.exists(root / "demo" / "fold1")  # the second run never started
    again = _sweep(root)
    out, err = again.communicate(timeout=900)
    assert again.returncode == 0, err[-3000:]
    want = _results_table(tmp_path / "ref")
    assert [r["status"] for r in want] == ["done", "done"]
    assert _results_table(root) == want
