"""Weights directories (orbax + metadata.json), merge_into errors, and the convert CLI."""
import functools
import json
import os
import re
import subprocess
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medtransfer_jax.weights import conversion as convert
from medtransfer_jax.models import resnet
from medtransfer_jax.weights import (CheckpointError, WeightsMetadata, load_metadata, load_weights, merge_into, save_weights)


def _random_variables(model, seed=0):
    """Random {'params', 'batch_stats'} of the model's shapes (no init compile)."""
    tree = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(seed)
    return {k: jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32) + (
        1.0 if k == "batch_stats" else 0.0), tree[k]) for k in ("params", "batch_stats")}


def _equal(a, b):
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b))))


@pytest.fixture(scope="module")
def r18():
    model = resnet.ResNet(depth=18, layout="torchvision_v15", num_classes=4, width=8)
    return model, _random_variables(model)


def test_save_load_roundtrip(r18, tmp_path):
    model, variables = r18
    meta = WeightsMetadata(source="imagenet", layout="torchvision_v15", depth=18, width=8,
                           num_classes=4, preprocessing="torch", image_size=64,
                           converted_from="/x/resnet18.pth", format="torchvision",
                           extra={"note": "test"})
    save_weights(str(tmp_path / "w"), variables, meta)
    loaded, meta2 = load_weights(str(tmp_path / "w"))
    assert _equal(jax.tree.map(np.asarray, loaded), variables)
    assert meta2 == meta
    rebuilt = meta2.model_spec().build()
    assert (rebuilt.depth, rebuilt.layout, rebuilt.num_classes, rebuilt.width) == (18, "torchvision_v15", 4, 8)
    assert json.load(open(tmp_path / "w" / "metadata.json"))["preprocessing"] == "torch"


def test_merge_into_copies_backbone_and_replaces_head(r18):
    model, variables = r18
    target = _random_variables(model.clone(num_classes=2), seed=1)
    merged = merge_into(target, variables)
    assert merged["params"]["predictions"]["kernel"].shape == (64, 2)
    np.testing.assert_array_equal(merged["params"]["predictions"]["kernel"],
                                  target["params"]["predictions"]["kernel"])
    np.testing.assert_array_equal(merged["params"]["conv4_block2_1_conv"]["kernel"],
                                  variables["params"]["conv4_block2_1_conv"]["kernel"])
    np.testing.assert_array_equal(merged["batch_stats"]["conv1_bn"]["var"],
                                  variables["batch_stats"]["conv1_bn"]["var"])
    same = merge_into(_random_variables(model, seed=2), variables)
    np.testing.assert_array_equal(same["params"]["predictions"]["kernel"],
                                  variables["params"]["predictions"]["kernel"])
    skipped = merge_into(target := _random_variables(model, seed=3), variables, skip_head=True)
    np.testing.assert_array_equal(skipped["params"]["predictions"]["bias"],
                                  target["params"]["predictions"]["bias"])


def test_merge_into_errors_name_layer_and_shapes(r18):
    model, variables = r18
    target = _random_variables(model.clone(width=16), seed=1)
    with pytest.raises(CheckpointError) as e:
        merge_into(target, variables, source_name="weights/r18")
    msg = str(e.value)
    assert "weights/r18" in msg
    m = re.search(r"layer '(conv1_bn|conv1_conv)/(\w+)' .*has shape (\([\d, ]+\)) but the model "
                  r"expects (\([\d, ]+\))", msg)
    assert m, msg
    assert {m[3], m[4]} in ({"(8,)", "(16,)"}, {"(7, 7, 3, 8)", "(7, 7, 3, 16)"})
    missing = jax.tree.map(np.copy, variables)
    del missing["params"]["conv3_block1_0_conv"]
    with pytest.raises(CheckpointError, match="conv3_block1_0_conv.*missing"):
        merge_into(_random_variables(model), missing)


def test_missing_and_broken_directories(r18, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*medtransfer_jax.convert"):
        load_weights(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no metadata.json"):
        load_weights(str(tmp_path / "empty"))
    # a training run's directory names its exported weights
    run = tmp_path / "run"
    (run / "export" / "best").mkdir(parents=True)
    (run / "export" / "best" / "metadata.json").write_text(
        WeightsMetadata(source="x", layout="keras_v1").to_json())
    with pytest.raises(CheckpointError, match=f"exported weights are in '{run}/export/best'"):
        load_metadata(str(run))
    d = tmp_path / "nometa_vars"
    d.mkdir()
    (d / "metadata.json").write_text(WeightsMetadata(source="x", layout="keras_v1").to_json())
    with pytest.raises(CheckpointError, match="no variables"):
        load_weights(str(d))
    (d / "metadata.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="Cannot read"):
        load_metadata(str(d))


# ---------------------------------------------------------------------- convert CLI

def _write_keras_full_model_h5(path, variables):
    """A Keras-2 ``model.save`` file (model_weights/<layer>/<layer>/<w>:0) from variables."""
    names = {("params", "kernel"): "kernel", ("params", "scale"): "gamma",
             ("batch_stats", "mean"): "moving_mean", ("batch_stats", "var"): "moving_variance"}
    layers = sorted(set(variables["params"]) | set(variables["batch_stats"]))
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.6.0"
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = b'{"class_name": "Functional"}'
        g = f.create_group("model_weights")
        g.attrs["layer_names"] = [l.encode() for l in layers + ["avg_pool"]]
        g.create_group("avg_pool").attrs["weight_names"] = []
        for layer in layers:
            lg = g.create_group(layer)
            wnames = []
            for coll in ("params", "batch_stats"):
                for leaf, value in variables[coll].get(layer, {}).items():
                    w = names.get((coll, leaf)) or ("beta" if layer.endswith("_bn") else "bias")
                    lg.create_dataset(f"{layer}/{w}:0", data=value)
                    wnames.append(f"{layer}/{w}:0".encode())
            lg.attrs["weight_names"] = wnames


def _run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device is enough
    return subprocess.run([sys.executable, "-m", "medtransfer_jax.convert", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_keras_radimagenet_notop_end_to_end(tmp_path):
    model = resnet.ResNet(depth=50, layout="keras_v1", num_classes=None, width=8)
    variables = _random_variables(model, seed=4)
    src = str(tmp_path / "RadImageNet-ResNet50_notop.h5")
    _write_keras_full_model_h5(src, variables)
    out = str(tmp_path / "radimagenet_r50")
    r = _run_cli("--format=keras_h5", f"--input={src}", f"--output={out}", "--num_classes=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "head: none in the file" in r.stdout and "self-check: reloaded" in r.stdout
    assert "preprocessing: radimagenet" in r.stdout and out in r.stdout
    loaded, meta = load_weights(out)
    assert (meta.source, meta.preprocessing, meta.layout, meta.depth, meta.width) == (
        "radimagenet", "radimagenet", "keras_v1", 50, 8)
    assert meta.num_classes is None and meta.format == "keras_h5"
    assert meta.extra["container"] == "model.save" and len(meta.extra["sha256"]) == 64
    assert _equal(jax.tree.map(np.asarray, loaded), variables)


def test_cli_torchvision_drops_mismatched_head(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    src = str(tmp_path / "resnet18.pth")
    torch.save({"state_dict": torchvision.models.resnet18().state_dict()}, src)
    out = str(tmp_path / "tv_r18")
    r = _run_cli("--format=torchvision", f"--input={src}", f"--output={out}", "--num_classes=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "head: dropped (1000 classes in the file, --num_classes=2)" in r.stdout
    assert "Dropping the source head" in r.stderr  # the log line
    loaded, meta = load_weights(out)
    assert (meta.source, meta.preprocessing, meta.layout, meta.depth) == (
        "imagenet", "torch", "torchvision_v15", 18)
    assert meta.num_classes is None and "predictions" not in loaded["params"]
    from medtransfer_jax.weights import load_torchvision
    direct, _ = load_torchvision(src)
    direct["params"].pop("predictions")
    assert _equal(jax.tree.map(np.asarray, loaded), direct)
    # A second run into the same directory needs --overwrite.
    r = _run_cli("--format=torchvision", f"--input={src}", f"--output={out}")
    assert r.returncode != 0 and "--overwrite" in r.stderr


def test_cli_flag_and_file_errors(tmp_path):
    r = _run_cli("--format=keras_h5", f"--output={tmp_path / 'o'}")
    assert r.returncode != 0 and "--input is required" in r.stderr
    h5 = tmp_path / "weights.h5"
    with h5py.File(h5, "w") as f:
        f["x"] = np.zeros(2)
    r = _run_cli(f"--input={h5}", f"--output={tmp_path / 'o'}")
    assert r.returncode != 0 and "--format is required" in r.stderr and "--format=keras_h5" in r.stderr
    bad = tmp_path / "broken.h5"
    bad.write_text("not really hdf5")
    r = _run_cli("--format=keras_h5", f"--input={bad}", f"--output={tmp_path / 'o'}")
    assert r.returncode != 0 and "Cannot convert" in r.stderr and str(bad) in r.stderr
    assert "not an HDF5 file" in r.stderr
    assert not os.path.exists(tmp_path / "o" / "metadata.json")


def test_convert_function_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="--format"):
        convert.convert("onnx", "x", str(tmp_path))
    with pytest.raises(ValueError, match="--num_classes"):
        convert.convert("keras_h5", "x", str(tmp_path), num_classes=0)
    with pytest.raises(ValueError, match="--preprocessing"):
        convert.convert("keras_h5", "x", str(tmp_path), preprocessing="imagenet")


def test_self_check_detects_a_changed_tree(r18, tmp_path):
    model, variables = r18
    meta = WeightsMetadata(source="s", layout="torchvision_v15", depth=18, width=8, num_classes=4,
                           preprocessing="torch")
    save_weights(str(tmp_path / "w"), variables, meta)
    changed = jax.tree.map(np.copy, variables)
    changed["params"]["conv2_block1_1_conv"]["kernel"][0, 0, 0, 0] += 1.0
    with pytest.raises(CheckpointError, match="conv2_block1_1_conv"):
        convert.check_weights_dir(str(tmp_path / "w"), changed)
    assert "finite" in convert.check_weights_dir(str(tmp_path / "w"), variables, image_size=32)
