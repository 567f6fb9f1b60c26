"""Two local processes as two JAX hosts (1 CPU device each) train like one process."""
import json
import os
import subprocess
import sys

import _train_utils
import jax
import numpy as np
import pytest

from medtransfer_jax.training import loop, sweep
from medtransfer_jax.weights.checkpoint import load_weights

CONFIG = _train_utils.TINY_CONFIG + ":multihost"


@pytest.mark.multiprocess
def test_two_hosts_match_single_process(tmp_path):
    if jax.device_count() < 2:
        pytest.skip("needs 2 local devices for the single-process reference")
    wd = str(tmp_path / "mh")
    port = _train_utils.free_port()
    env = _train_utils.subprocess_env()
    env.pop("XLA_FLAGS", None)  # each process: exactly one CPU device
    procs = [subprocess.Popen(
        [sys.executable, "-m", "medtransfer_jax.train", f"--config={CONFIG}", f"--workdir={wd}",
         f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
         "--num_cpu_devices=1", "--xla_cache_dir="],
        env=env, cwd=_train_utils.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "mesh {'data': 2}" in outs[0]
    with open(os.path.join(wd, "results.json")) as f:
        res = json.load(f)
    assert res["num_processes"] == 2 and res["num_devices"] == 2
    # Each host saved its own data-iterator position.
    it_dir = os.path.join(wd, "checkpoints", "6", "data_iter")
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(it_dir))

    # Reference: one process, a 2-device mesh, the same global batches.
    ref_wd = str(tmp_path / "ref")
    cfg = sweep.load_config(sweep.Run("ref", CONFIG, ref_wd, ["sharding.num_devices=2"]))
    ref = loop.train_and_evaluate(cfg, ref_wd)
    for split in ("val", "test"):
        assert res[split]["num_examples"] == ref[split]["num_examples"]
        assert res[split]["loss"] == pytest.approx(ref[split]["loss"], rel=1e-4)
        assert res[split]["auc"] == pytest.approx(ref[split]["auc"], abs=1e-3)

    def train_losses(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]

    got, want = train_losses(wd), train_losses(ref_wd)
    assert [s for s, _ in got] == [s for s, _ in want] == [2, 4, 6]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-4)
    a, _ = load_weights(os.path.join(wd, "export", "last"))
    b, _ = load_weights(os.path.join(ref_wd, "export", "last"))
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, atol=2e-4, rtol=1e-3)
