"""The embedded default (`python -m medtransfer_jax.train --workdir=DIR`, configs/demo.py)
learns the synthetic task within a few minutes on a small CPU."""
import json
import os
import subprocess
import sys
import time

import _train_utils
import pytest


@pytest.mark.slow
def test_demo_default_config_learns(tmp_path):
    wd = str(tmp_path / "demo")
    env = _train_utils.subprocess_env()
    env.pop("XLA_FLAGS", None)  # as a user runs it: the machine's real devices
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "medtransfer_jax.train", f"--workdir={wd}"],
                       env=env, cwd=_train_utils.REPO, capture_output=True, text=True,
                       timeout=600)
    elapsed = time.time() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    assert "done: best step" in p.stdout
    with open(os.path.join(wd, "results.json")) as f:
        res = json.load(f)
    print(f"demo: {elapsed:.0f} s, val auc {res['val']['auc']:.4f}, test auc "
          f"{res['test']['auc']:.4f}")
    assert res["config"]["data"]["name"] == "synthetic"
    assert res["val"]["auc"] > 0.8 and res["test"]["auc"] > 0.8
    assert res["test"]["accuracy"] > 0.7
    assert 0 < res["wall_time_s"] <= elapsed  # the run's own clock is inside ours
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        speeds = [r["img_per_s"] for r in map(json.loads, f) if r["split"] == "train"]
    assert speeds and all(s > 0 for s in speeds[1:])  # throughput logged (not NaN)
