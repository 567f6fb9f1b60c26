"""study --dry_run: the pre-flight only; prints the grid, lists what is missing, creates nothing."""
import os
import subprocess
import sys

import _train_utils


def _study(*args, cwd="/"):
    return subprocess.run([sys.executable, "-m", "medtransfer_jax.study", *args],
                          env=_train_utils.subprocess_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_dry_run_of_the_demo_prints_the_grid_and_creates_nothing(tmp_path):
    wd = tmp_path / "study"
    out = _study(f"--workdir={wd}", "--dry_run")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[study] pre-flight: 18 fine-tuning runs" in out.stdout
    assert "[study] pre-flight: ok" in out.stdout
    assert not wd.exists()


def test_dry_run_lists_everything_missing_in_one_line(tmp_path):
    cfg = os.path.join(_train_utils.REPO, "configs", "study_revisiting.py")
    wd = tmp_path / "rt"
    out = _study(f"--workdir={wd}", "--dry_run",
                 f"--config={cfg}:targets=breast,folds=0,data={tmp_path}/d,"
                 f"imagenet={tmp_path}/in.h5,radimagenet={tmp_path}/rad.h5")
    assert out.returncode == 2, out.stderr[-2000:]
    err = [line for line in out.stderr.splitlines() if line.startswith("study: error:")]
    assert len(err) == 1 and "in.h5" in err[0] and "rad.h5" in err[0]
    assert "Traceback" not in out.stderr
    assert out.stdout.count("[study] MISSING:") >= 3   # two .h5 files, the data root, ...
    assert not wd.exists()
