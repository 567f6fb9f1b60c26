"""Bad input to the command-line mains ends in a message naming the problem, not a traceback."""
import subprocess
import sys

import pytest
from _train_utils import REPO, subprocess_env


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra, expect", [
    (["--config.data.root=/no/such/busi"], "data.root folder not found: /no/such/busi"),
    ([], "data.root is not set"),
])
def test_train_missing_dataset_folder(tmp_path, extra, expect):
    p = _run("medtransfer_jax.train", f"--workdir={tmp_path}", "--config.data.name=breast",
             *extra)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "train: error:" in p.stderr and expect in p.stderr
    assert "Expected layout" in p.stderr  # the manual-download instructions follow
    assert "Traceback" not in p.stderr


def test_train_bad_override_names_the_flag(tmp_path):
    p = _run("medtransfer_jax.train", f"--workdir={tmp_path}", "--config.train.lr=abc")
    assert p.returncode != 0
    assert "--config.train.lr=abc" in p.stderr and "Traceback" not in p.stderr


def test_evaluate_missing_checkpoint(tmp_path):
    p = _run("medtransfer_jax.evaluate", f"--checkpoint={tmp_path}/nothing")
    assert p.returncode == 2
    assert f"{tmp_path}/nothing" in p.stderr and "metadata.json" in p.stderr
    assert "Traceback" not in p.stderr
