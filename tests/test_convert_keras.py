"""Keras .h5 -> Flax conversion: parity with Keras itself, every container layout, errors.

The source is a randomly initialised ``keras.applications.ResNet50`` whose BatchNorm
statistics/affine parameters and biases are randomised too (a fresh BN is the
identity and would hide a swapped mean/var or gamma/beta). Keras (JAX backend, float32)
is the reference. Tolerance: max |flax - keras| <= 1e-4 * max(1, max |keras|) per
layer (activations here are O(1-10); measured differences are ~1e-6).
"""
import shutil
import zipfile

import h5py
import jax
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from medtransfer_jax import preprocessing  # noqa: E402
from medtransfer_jax.weights import conversion as convert  # noqa: E402
from medtransfer_jax.models import resnet  # noqa: E402
from medtransfer_jax.weights import CheckpointError, load_keras_h5  # noqa: E402

SIZE = 64
STAGES = list(resnet.stage_output_names(50))  # conv1_relu, conv2_block3_out, ..., conv5_block3_out
COMPARED = STAGES + ["pool1_pool", "avg_pool"]


def _tol(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def _randomise(model, seed=0):
    """Random BN gamma/beta/mean/var and conv/dense biases (kernels keep Keras' init)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c),
                               rng.normal(0, 0.2, c), rng.uniform(0.5, 2.0, c)])
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.05, bias.shape)])


def _write_keras2_weights(path, model, rename=lambda n: n, keras1_names=False):
    """Writes a Keras-2 ``save_weights('x.h5')`` file (the keras-applications layout).

    ``keras1_names`` writes 2016-style dataset names (``conv1_W:0``, ``bn_conv1_running_std:0``)
    directly under the layer group; combined with ``rename`` this mimics the caffe-era
    fchollet/deep-learning-models files.
    """
    k1 = {"kernel": "W", "bias": "b", "gamma": "gamma", "beta": "beta",
          "moving_mean": "running_mean", "moving_variance": "running_std"}
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [rename(l.name).encode() for l in model.layers]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in model.layers:
            name = rename(layer.name)
            g = f.create_group(name)
            names = []
            for w in layer.weights:
                short = w.name.split("/")[-1]
                wn = f"{name}_{k1[short]}:0" if keras1_names else f"{name}/{short}:0"
                g.create_dataset(wn, data=np.asarray(w))
                names.append(wn.encode())
            g.attrs["weight_names"] = names


def _caffe_name(name):
    """conv2_block1_0_conv -> res2a_branch1 (independent of the converter's regex)."""
    simple = {"conv1_conv": "conv1", "conv1_bn": "bn_conv1", "predictions": "fc1000"}
    if name in simple:
        return simple[name]
    parts = name.split("_")
    if len(parts) == 4 and parts[1].startswith("block") and parts[3] in ("conv", "bn"):
        stage, block, part, kind = parts[0][4:], int(parts[1][5:]), parts[2], parts[3]
        branch = {"0": "1", "1": "2a", "2": "2b", "3": "2c"}[part]
        return f"{'res' if kind == 'conv' else 'bn'}{stage}{'abcdefg'[block - 1]}_branch{branch}"
    return name


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """One randomised Keras ResNet50 (64 px, with head), its files and its outputs."""
    d = tmp_path_factory.mktemp("keras_src")
    model = keras.applications.ResNet50(weights=None, include_top=True,
                                        input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    _randomise(model)
    notop = keras.Model(model.input, model.get_layer("avg_pool").output, name="resnet50")
    files = {
        "model.save": str(d / "resnet50_full.h5"),
        "keras3_weights": str(d / "resnet50.weights.h5"),
        "keras3_legacy_save_weights": str(d / "resnet50_legacy_weights.h5"),
        "keras2_save_weights": str(d / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"),
        "keras3_archive": str(d / "resnet50.keras"),
        "notop": str(d / "RadImageNet-ResNet50_notop.h5"),
    }
    model.save(files["model.save"])
    model.save_weights(files["keras3_weights"])
    model.save(files["keras3_archive"])
    from keras.src.legacy.saving import legacy_h5_format
    with h5py.File(files["keras3_legacy_save_weights"], "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    _write_keras2_weights(files["keras2_save_weights"], model)
    notop.save(files["notop"])

    x = np.random.default_rng(1).normal(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    names = COMPARED + ["predictions"]
    outs = keras.Model(model.input, [model.get_layer(n).output for n in names])(x)
    ref = {n: np.asarray(o) for n, o in zip(names, outs)}
    ref["notop"] = np.asarray(notop(x))
    return dict(model=model, notop=notop, files=files, x=x, ref=ref, dir=d)


@pytest.fixture(scope="module")
def converted(source):
    return load_keras_h5(source["files"]["model.save"])


def _flax_outputs(variables, x, num_classes):
    model = resnet.ResNet(depth=50, layout="keras_v1", num_classes=num_classes)
    names = COMPARED + (["logits"] if num_classes else [])
    return jax.tree.map(np.asarray, resnet.extract_activations(model, variables, x, names))


def test_parity_full_model_save(source, converted):
    variables, info = converted
    assert info["h5_layout"] == "model.save"
    assert (info["depth"], info["width"], info["num_classes"], info["has_head"]) == (50, 64, 1000, True)
    assert info["num_layers"] == 53 + 53 + 1
    out = _flax_outputs(variables, source["x"], 1000)
    for name in COMPARED:
        ref = source["ref"][name]
        assert out[name].shape == ref.shape, name
        err = np.abs(out[name] - ref).max()
        assert err <= _tol(ref), f"{name}: max abs diff {err:.3g} > {_tol(ref):.3g}"
    ref = source["ref"]["predictions"]
    assert np.abs(out["logits"] - ref).max() <= _tol(ref)


def test_parity_detects_swapped_batchnorm_parameters(source, converted):
    """The parity check has power: swapping one BN's gamma/beta breaks it."""
    variables = jax.tree.map(np.copy, converted[0])
    p = variables["params"]["conv3_block2_2_bn"]
    p["scale"], p["bias"] = p["bias"].copy(), p["scale"].copy()
    out = _flax_outputs(variables, source["x"], 1000)
    ref = source["ref"]["conv5_block3_out"]
    assert np.abs(out["conv5_block3_out"] - ref).max() > 100 * _tol(ref)


@pytest.mark.parametrize("layout", ["keras3_weights", "keras3_legacy_save_weights",
                                    "keras2_save_weights", "keras3_archive"])
def test_other_layouts_give_identical_variables(source, converted, layout):
    variables, info = load_keras_h5(source["files"][layout])
    expected_layout = {"keras3_legacy_save_weights": "save_weights",
                       "keras2_save_weights": "save_weights"}.get(layout, layout)
    assert info["h5_layout"] == expected_layout
    assert info["num_classes"] == 1000
    assert jax.tree.structure(variables) == jax.tree.structure(converted[0])
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, variables, converted[0])))


def test_param_counts_match_keras_include_top_false(source):
    """Flax ResNet50 (no head) has exactly Keras' trainable / non-trainable counts.

    ``source['notop']`` is the graph of ``ResNet50(include_top=False, pooling='avg')``
    (same weighted layers), cut from the full model so Keras is built only once.
    """
    km = source["notop"]
    tree = jax.eval_shape(lambda: resnet.ResNet(depth=50, num_classes=None).init(
        jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
    count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))  # noqa: E731
    assert count(tree["params"]) == sum(int(np.prod(w.shape)) for w in km.trainable_weights)
    assert count(tree["batch_stats"]) == sum(int(np.prod(w.shape)) for w in km.non_trainable_weights)
    assert {l.name for l in km.layers if l.weights} == set(tree["params"])


def test_notop_file_parity(source, converted):
    variables, info = load_keras_h5(source["files"]["notop"])
    assert not info["has_head"] and info["num_classes"] is None
    assert "predictions" not in variables["params"]
    out = _flax_outputs(variables, source["x"], None)
    model = resnet.ResNet(depth=50, layout="keras_v1", num_classes=None)
    pooled = np.asarray(model.apply(variables, source["x"]))
    ref = source["ref"]["notop"]
    assert pooled.shape == ref.shape == (2, 2048)
    assert np.abs(pooled - ref).max() <= _tol(ref)
    ref = source["ref"]["conv4_block6_out"]
    assert np.abs(out["conv4_block6_out"] - ref).max() <= _tol(ref)


def test_nested_model_with_extra_head(source, converted):
    """A fine-tuned study model: ResNet50 notop nested in a Sequential + Dropout + Dense."""
    wrapper = keras.Sequential([source["notop"], keras.layers.Dropout(0.5),
                                keras.layers.Dense(2, name="dense")])
    wrapper.build((None, SIZE, SIZE, 3))
    path = str(source["dir"] / "finetuned_nested.h5")
    wrapper.save(path)
    variables, info = load_keras_h5(path)
    assert not info["has_head"] and "dense" in info["ignored"]
    notop_expected = {k: v for k, v in converted[0]["params"].items() if k != "predictions"}
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, variables["params"], notop_expected)))


def test_keras3_weights_without_name_attributes_map_by_order(source, converted, tmp_path):
    path = str(tmp_path / "noname.weights.h5")
    shutil.copy(source["files"]["keras3_weights"], path)
    with h5py.File(path, "r+") as f:
        groups = []
        f.visititems(lambda n, o: groups.append(o) if isinstance(o, h5py.Group) and "name" in o.attrs else None)
        for g in groups:
            del g.attrs["name"]
    variables, _ = load_keras_h5(path)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, variables, converted[0])))


def test_caffe_era_names(source, converted, tmp_path):
    path = str(tmp_path / "resnet50_caffe_names.h5")
    _write_keras2_weights(path, source["model"], rename=_caffe_name, keras1_names=True)
    with h5py.File(path) as f:
        assert "res3b_branch2c" in f and "bn_conv1" in f and "fc1000" in f
    variables, _ = load_keras_h5(path)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, variables, converted[0])))


# ----------------------------------------------------------------------------- errors

def test_missing_layer_is_named(source, tmp_path):
    path = str(tmp_path / "missing.h5")
    shutil.copy(source["files"]["model.save"], path)
    with h5py.File(path, "r+") as f:
        del f["model_weights/conv3_block2_2_bn"]
    with pytest.raises(CheckpointError, match="conv3_block2_2_bn") as e:
        load_keras_h5(path)
    assert path in str(e.value) and "missing" in str(e.value)


def test_missing_layer_in_keras3_weights_file(source, tmp_path):
    path = str(tmp_path / "missing.weights.h5")
    shutil.copy(source["files"]["keras3_weights"], path)
    with h5py.File(path, "r+") as f:
        victims = []
        f.visititems(lambda n, o: victims.append(n.rsplit("/", 1)[0])
                     if isinstance(o, h5py.Group) and o.attrs.get("name") == "conv4_block3_1_conv" else None)
        assert victims
        del f[victims[0]]
    with pytest.raises(CheckpointError, match="conv4_block3_1_conv"):
        load_keras_h5(path)


def test_shape_mismatch_names_layer_and_both_shapes(source, tmp_path):
    path = str(tmp_path / "bad_shape.h5")
    shutil.copy(source["files"]["model.save"], path)
    ds = "model_weights/conv2_block1_1_conv/conv2_block1_1_conv/kernel"
    with h5py.File(path, "r+") as f:
        del f[ds]
        f.create_dataset(ds, data=np.zeros((1, 1, 64, 32), np.float32))
    with pytest.raises(CheckpointError) as e:
        load_keras_h5(path)
    msg = str(e.value)
    assert "conv2_block1_1_conv" in msg and "(1, 1, 64, 32)" in msg and "(1, 1, 64, 64)" in msg
    assert path in msg


def test_not_hdf5_file(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(CheckpointError, match="not an HDF5 file") as e:
        load_keras_h5(str(path))
    assert str(path) in str(e.value)


def test_torch_file_given_as_keras_suggests_torchvision(tmp_path):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "model.pth")
    torch.save({"conv1.weight": torch.zeros(2, 3, 7, 7)}, path)
    with pytest.raises(CheckpointError, match="torchvision"):
        load_keras_h5(path)


def test_truncated_file(source, tmp_path):
    path = str(tmp_path / "truncated.h5")
    with open(source["files"]["model.save"], "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_keras_h5(path)
    assert path in str(e.value)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_keras_h5(str(empty))
    with pytest.raises(CheckpointError, match="no such file"):
        load_keras_h5(str(tmp_path / "nope.h5"))


def test_wrong_requested_depth(source):
    with pytest.raises(CheckpointError, match="ResNet50.*depth 101"):
        load_keras_h5(source["files"]["model.save"], depth=101)


def test_damaged_keras_archive(tmp_path):
    path = str(tmp_path / "model.keras")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", "{}")
    with pytest.raises(CheckpointError, match="model.weights.h5"):
        load_keras_h5(path)


# ----------------------------------------------------------------------- preprocessing

def test_preprocessing_matches_keras(source):
    """caffe == keras preprocess_input; radimagenet == preprocess_input then /255."""
    from keras.applications import resnet50 as keras_resnet50
    images = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3)).astype(np.float32)
    caffe_ref = np.asarray(keras_resnet50.preprocess_input(images.copy()), np.float64)
    np.testing.assert_allclose(preprocessing.normalize(images, "caffe"), caffe_ref, atol=1e-4)
    np.testing.assert_allclose(preprocessing.normalize(images, "radimagenet"), caffe_ref / 255.0,
                               atol=1e-6)
    grey = images[..., 0].astype(np.uint8)
    three = np.stack([preprocessing.to_three_channels(g) for g in grey])
    assert three.shape == (2, 8, 8, 3) and np.array_equal(three[..., 2], grey)
    ref = np.asarray(keras_resnet50.preprocess_input(np.repeat(grey[..., None], 3, -1).astype(np.float32)))
    np.testing.assert_allclose(preprocessing.normalize(three, "caffe"), ref, atol=1e-4)


@pytest.mark.parametrize("name,expected", [("RadImageNet-ResNet50_notop.h5", ("radimagenet", "radimagenet")),
                                           ("resnet50_weights_tf_dim_ordering_tf_kernels.h5", ("imagenet", "caffe"))])
def test_preprocessing_default_follows_source(source, tmp_path, name, expected):
    """The metadata records the source's preprocessing; the head follows --num_classes."""
    from medtransfer_jax.weights import load_metadata
    path = str(tmp_path / name)
    shutil.copy(source["files"]["notop" if "notop" in name else "keras2_save_weights"], path)
    out = str(tmp_path / "out")
    summary = convert.convert("keras_h5", path, out, num_classes=2, self_check=False)
    meta = load_metadata(out)
    assert (meta.source, meta.preprocessing) == expected
    assert meta.layout == "keras_v1" and meta.depth == 50 and meta.num_classes is None
    assert summary["head"].startswith("dropped" if "notop" not in name else "none")


@pytest.mark.slow
def test_parity_224_with_head(tmp_path):
    """Full-size check at the ImageNet resolution (keras default input shape)."""
    model = keras.applications.ResNet50(weights=None, include_top=True, classifier_activation=None)
    _randomise(model, seed=3)
    path = str(tmp_path / "resnet50_224.h5")
    model.save(path)
    x = np.random.default_rng(4).normal(0, 1, (2, 224, 224, 3)).astype(np.float32)
    names = ["conv3_block4_out", "avg_pool", "predictions"]
    ref = [np.asarray(o) for o in keras.Model(model.input, [model.get_layer(n).output for n in names])(x)]
    variables, info = load_keras_h5(path)
    out = _flax_outputs(variables, x, info["num_classes"])
    for name, r in zip(["conv3_block4_out", "avg_pool", "logits"], ref):
        assert out[name].shape == r.shape
        assert np.abs(out[name] - r).max() <= _tol(r), name


def test_resnet_v2_and_foreign_files_are_explained(tmp_path):
    path = str(tmp_path / "resnet50v2.h5")
    with h5py.File(path, "w") as f:
        for layer in ("conv1_conv", "conv2_block1_preact_bn"):
            f.create_dataset(f"model_weights/{layer}/{layer}/bias:0", data=np.zeros(4))
    with pytest.raises(CheckpointError, match="ResNetV2"):
        load_keras_h5(path)
    path = str(tmp_path / "vgg16.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("block1_conv1/block1_conv1/kernel:0", data=np.zeros((3, 3, 3, 4)))
    with pytest.raises(CheckpointError, match="no Keras ResNet layers.*block1_conv1"):
        load_keras_h5(path)
