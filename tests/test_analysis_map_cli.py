"""`python -m medtransfer_jax.analyze map`: layer x layer maps from the CLI (tiny ResNet18)."""
import csv
import os
import re

import _analyze_utils
import numpy as np
import pytest
from absl import flags

from medtransfer_jax import analyze, ticker
from medtransfer_jax.errors import UserError
from medtransfer_jax.analysis import layer_map

FLAGS = flags.FLAGS
SIZE = 32


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return _analyze_utils.random_weights_dirs(tmp_path_factory.mktemp("map_weights"), depth=18,
                                              width=8, image_size=SIZE, seeds=(20, 21))


_parsed_flags = _analyze_utils.parsed_flags


def _run(**overrides):
    for flag in FLAGS.flags_by_module_dict()[analyze.__name__]:
        flag.unparse()
    for k, v in overrides.items():
        setattr(FLAGS, k, v)
    return analyze.run(["analyze", "map"])


def test_map_command_writes_table_and_heatmaps(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ticker, "INTERVAL_S", 0.0)   # every throttled line
    a, b = weights
    files = _run(output_dir=str(tmp_path), weights_a=a, weights_b=b, images="random",
                 num_images=80, image_size=SIZE, batch_size=16, spatial="pool",
                 methods=["mean_cca", "debiased_cka"])
    # progress: the streamed pass batch by batch, one line per method, then where the
    # map's time went
    lines = [l for l in capsys.readouterr().out.splitlines()
             if l.startswith(f"map {a} vs {b}: ")]
    head = len(f"map {a} vs {b}: ")
    assert [l[head:].split(", ")[0] for l in lines[:-1]] == [
        "16/80 images", "32/80 images", "48/80 images", "64/80 images", "80/80 images",
        "mean_cca 9x9 (1/2 methods)", "debiased_cka 9x9 (2/2 methods)"], lines
    assert lines[4].endswith(", ETA 0 s")
    assert re.fullmatch(r"map done in .+: first batch .+ \(compilation\), the other "
                        r"batches .+, per-pair finish .+", lines[-1][head:]), lines[-1]
    with open(files["csv"]) as f:
        rows = list(csv.DictReader(f))
    blocks = layer_map.all_blocks(18)
    assert len(rows) == 2 * len(blocks) ** 2
    assert {r["layer_a"] for r in rows} == set(blocks)
    vals = np.array([float(r["value"]) for r in rows if r["method"] == "mean_cca"])
    assert np.all((vals > 0) & (vals <= 1)) and vals.std() > 0.01
    assert rows[0]["spatial"].startswith("pool") and rows[0]["datapoints"] == "80"
    for m in ("mean_cca", "debiased_cka"):
        assert os.path.getsize(files[f"png_{m}"]) > 5000
    # one network against itself: the diagonal is exactly similar
    files = _run(output_dir=str(tmp_path / "self"), weights_a=a, images="random",
                 num_images=80, image_size=SIZE, batch_size=16, spatial="pool",
                 methods=["linear_cka"], layers=["conv1_relu", "conv3_block2_out"])
    with open(files["csv"]) as f:
        rows = {(r["layer_a"], r["layer_b"]): float(r["value"]) for r in csv.DictReader(f)}
    assert rows[("conv3_block2_out", "conv3_block2_out")] == pytest.approx(1.0, abs=1e-6)


def test_map_command_errors(weights, tmp_path):
    with pytest.raises(UserError, match="needs --weights_a"):
        _run(output_dir=str(tmp_path))
    with pytest.raises(UserError, match="cannot be mapped"):
        _run(output_dir=str(tmp_path), weights_a=weights[0], methods=["rbf_cka"])
    with pytest.raises(UserError, match="more datapoints than channels"):
        _run(output_dir=str(tmp_path), weights_a=weights[0], images="random", num_images=16,
             image_size=SIZE, batch_size=16, spatial="pool", methods=["mean_cca"])
