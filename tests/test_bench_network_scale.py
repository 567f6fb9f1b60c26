"""bench network_scale (#15.4) scaled down so it runs on a CPU: every part, real rows."""
import math
import subprocess
import sys

import pytest

from _train_utils import REPO, subprocess_env
from medtransfer_jax.bench import network_scale as NS

TINY = NS.Sizes(neurons=16, datapoints=400, methods=("mean_cca", "linear_cka"), depth=18,
                width=8, image_size=64, protocol_images=48, positions=256, map_images=80,
                map_methods=("mean_cca", "debiased_cka"), batch_size=8, repeats=1)


def test_all_parts_scaled_down():
    rows = NS.run(TINY)
    by_part = {}
    for r in rows:
        by_part.setdefault(r["part"], []).append(r)
    assert set(by_part) == {"kernels", "protocol", "map"}
    for r in by_part["kernels"]:
        assert r["seconds"] > 0 and r["speedup"] > 0 and r["abs_diff"] < 1e-5, r
    ends = [r for r in by_part["protocol"] if r["what"].startswith("end to end")]
    assert len(ends) == 2 and all(r["seconds"] > 0 for r in ends)
    maps = {r["what"]: r for r in by_part["map"]}
    assert maps["9x9 blocks, float32 forward"]["seconds"] > 0
    assert maps["9x9 blocks, bfloat16 forward"]["seconds"] > 0
    # the split of each map's seconds: its parts are measured and add up to the total
    for dtype in ("float32", "bfloat16"):
        parts = [maps[f"  {dtype}: {p}"]["seconds"] for p in
                 ("first batch (compile)", "the other batches", "per-pair finish on the host",
                  "other")]
        assert all(p > 0 for p in parts[:3]) and parts[3] >= -1e-6, parts
        assert sum(parts) == pytest.approx(maps[f"9x9 blocks, {dtype} forward"]["seconds"])
        # compiling makes the first of the 10 batches the slowest part of the stream
        assert parts[0] > parts[1] / 9
    eff = maps["bf16 effect on mean_cca"]
    # bf16 changes the activations a little: a measurable but small effect on CCA
    assert 0 < eff["abs_diff"] < 0.2 and 0 < eff["value"] <= eff["abs_diff"]
    assert 0 < maps["mean_cca mean over the map"]["value"] < 1
    with pytest.raises(ValueError, match="unknown part"):
        NS.run(NS.Sizes(parts=("gpu",)))


def test_cli_runs_one_part():
    cmd = [sys.executable, "-m", "medtransfer_jax.bench", "network_scale", "--parts=kernels",
           "--neurons=8", "--datapoints=300", "--methods=mean_cca", "--repeats=1"]
    out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "## Similarity at network scale" in out.stdout
    line = next(l for l in out.stdout.splitlines() if l.startswith("| kernels"))
    speedup = float(line.split("|")[4])
    assert math.isfinite(speedup) and speedup > 0
