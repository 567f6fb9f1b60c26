"""`python -m medtransfer_jax.analyze map`: layer x layer maps from the CLI (tiny ResNet18)."""
import csv
import os

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from medtransfer_jax import analyze
from medtransfer_jax.errors import UserError
from medtransfer_jax.analysis import layer_map
from medtransfer_jax.models import resnet
from medtransfer_jax.weights.checkpoint import WeightsMetadata, save_weights

FLAGS = flags.FLAGS
SIZE = 32


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("map_weights")
    model = resnet.ResNet(depth=18, width=8, num_classes=None)
    out = []
    for i in range(2):
        d = str(root / f"w{i}")
        save_weights(d, resnet.random_variables(model, 20 + i),
                     WeightsMetadata(source="random", layout="keras_v1", depth=18, width=8,
                                     preprocessing="unit", image_size=SIZE))
        out.append(d)
    return out


@pytest.fixture(autouse=True)
def _parsed_flags():
    if not FLAGS.is_parsed():
        FLAGS.mark_as_parsed()
    with flagsaver.flagsaver():
        yield


def _run(**overrides):
    for flag in FLAGS.flags_by_module_dict()[analyze.__name__]:
        flag.unparse()
    for k, v in overrides.items():
        setattr(FLAGS, k, v)
    return analyze.run(["analyze", "map"])


def test_map_command_writes_table_and_heatmaps(weights, tmp_path):
    a, b = weights
    files = _run(output_dir=str(tmp_path), weights_a=a, weights_b=b, images="random",
                 num_images=80, image_size=SIZE, batch_size=16, spatial="pool",
                 methods=["mean_cca", "debiased_cka"])
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
