"""torchvision state dict -> Flax conversion: parity with torch (ResNet18 and 50), errors.

Sources are randomly initialised ``torchvision.models.resnet{18,50}()`` with
randomised BatchNorm affine parameters/running statistics and head, run in eval mode
in float32 on NCHW inputs; the same images go NHWC into the Flax model
(``layout='torchvision_v15'``). Stage outputs are taken with forward hooks.
Tolerance: max |flax - torch| <= 1e-4 * max(1, max |torch|) per layer.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jax  # noqa: E402

from medtransfer_jax import preprocessing  # noqa: E402
from medtransfer_jax.weights import conversion as convert  # noqa: E402
from medtransfer_jax.models import resnet  # noqa: E402
from medtransfer_jax.weights import CheckpointError, load_metadata, load_torchvision  # noqa: E402

SIZE = 64
HOOKS = {"relu": "conv1_relu", "maxpool": "pool1_pool", "avgpool": "avg_pool", "fc": "logits"}


def _tol(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def _random_model(depth, seed):
    torch.manual_seed(seed)
    model = getattr(torchvision.models, f"resnet{depth}")()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        model.fc.bias.normal_(0, 0.05)
    return model.eval()


def _torch_outputs(model, depth, x_nhwc):
    names = dict(HOOKS)
    for i, name in enumerate(resnet.stage_output_names(depth)[1:]):
        names[f"layer{i + 1}"] = name
    outs = {}
    handles = [getattr(model, mod).register_forward_hook(
        lambda m, i, o, name=name: outs.__setitem__(name, o.detach().numpy()))
        for mod, name in names.items()]
    with torch.no_grad():
        model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
    for h in handles:
        h.remove()
    return {k: (v.transpose(0, 2, 3, 1) if v.ndim == 4 and k != "avg_pool" else v.reshape(v.shape[0], -1))
            for k, v in outs.items()}


@pytest.fixture(scope="module", params=[18, 50])
def source(request, tmp_path_factory):
    depth = request.param
    d = tmp_path_factory.mktemp(f"tv{depth}")
    model = _random_model(depth, seed=depth)
    path = str(d / f"resnet{depth}.pth")
    torch.save(model.state_dict(), path)
    x = np.random.default_rng(depth).normal(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    return dict(depth=depth, model=model, path=path, x=x, ref=_torch_outputs(model, depth, x), dir=d)


@pytest.fixture(scope="module")
def converted(source):
    return load_torchvision(source["path"])


def _flax(variables, depth, x, num_classes=1000):
    model = resnet.ResNet(depth=depth, layout="torchvision_v15", num_classes=num_classes)
    names = list(resnet.stage_output_names(depth)) + ["pool1_pool", "avg_pool"] + (
        ["logits"] if num_classes else [])
    return jax.tree.map(np.asarray, resnet.extract_activations(model, variables, x, names))


def test_parity(source, converted):
    variables, info = converted
    depth = source["depth"]
    assert (info["depth"], info["width"], info["num_classes"]) == (depth, 64, 1000)
    assert info["layout"] == "torchvision_v15" and info["ignored"] == []
    out = _flax(variables, depth, source["x"])
    assert set(source["ref"]) == set(out)
    for name, ref in source["ref"].items():
        assert out[name].shape == ref.shape, name
        err = np.abs(out[name] - ref).max()
        assert err <= _tol(ref), f"ResNet{depth} {name}: max abs diff {err:.3g} > {_tol(ref):.3g}"


def test_parity_detects_untransposed_kernel(source, converted):
    """Power check: the 7x7 stem kernel with H and W swapped must break parity."""
    variables = jax.tree.map(np.copy, converted[0])
    k = variables["params"]["conv1_conv"]["kernel"]
    variables["params"]["conv1_conv"]["kernel"] = k.transpose(1, 0, 2, 3).copy()
    out = _flax(variables, source["depth"], source["x"])
    ref = source["ref"]["conv1_relu"]
    assert np.abs(out["conv1_relu"] - ref).max() > 100 * _tol(ref)


def test_wrappers_and_prefixes_give_identical_variables(source, converted, tmp_path):
    sd = source["model"].state_dict()
    variants = {
        "state_dict": {"state_dict": sd, "epoch": 3, "arch": "resnet"},
        "module": {f"module.{k}": v for k, v in sd.items()},
        "model+module": {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
    }
    for name, obj in variants.items():
        path = str(tmp_path / f"{name}.pt")
        torch.save(obj, path)
        variables, info = load_torchvision(path)
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, variables, converted[0]))), name
        if name == "module":
            assert info["prefix"] == "module."
        if name == "model+module":
            assert info["wrapper"] == "model" and info["prefix"] == "module."


def test_headless_state_dict(source, converted, tmp_path):
    sd = {k: v for k, v in source["model"].state_dict().items() if not k.startswith("fc.")}
    path = str(tmp_path / "nohead.pth")
    torch.save(sd, path)
    variables, info = load_torchvision(path)
    assert not info["has_head"] and "predictions" not in variables["params"]
    model = resnet.ResNet(depth=source["depth"], layout="torchvision_v15", num_classes=None)
    pooled = np.asarray(model.apply(variables, source["x"]))
    ref = source["ref"]["avg_pool"]
    assert np.abs(pooled - ref).max() <= _tol(ref)


def test_param_and_stat_counts_match_torch(source, converted):
    variables, _ = converted
    n_params = sum(p.numel() for p in source["model"].parameters())
    n_stats = sum(b.numel() for n, b in source["model"].named_buffers()
                  if not n.endswith("num_batches_tracked"))
    assert sum(np.size(v) for v in jax.tree.leaves(variables["params"])) == n_params
    assert sum(np.size(v) for v in jax.tree.leaves(variables["batch_stats"])) == n_stats


# ----------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def r18_state():
    return _random_model(18, seed=7).state_dict()


def test_missing_key_is_named(r18_state, tmp_path):
    sd = dict(r18_state)
    del sd["layer2.1.bn2.running_var"]
    path = str(tmp_path / "missing.pth")
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_torchvision(path)
    msg = str(e.value)
    assert "conv3_block2_2_bn" in msg and "layer2.1.bn2.running_var" in msg and path in msg


def test_shape_mismatch_names_key_and_both_shapes(r18_state, tmp_path):
    sd = dict(r18_state)
    sd["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    path = str(tmp_path / "bad_shape.pth")
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_torchvision(path)
    msg = str(e.value)
    assert "layer1.0.conv1.weight" in msg and "conv2_block1_1_conv" in msg
    assert "(32, 64, 3, 3)" in msg and "(64, 64, 3, 3)" in msg


def test_conv_bias_is_unexpected(r18_state, tmp_path):
    sd = dict(r18_state)
    sd["conv1.bias"] = torch.zeros(64)
    path = str(tmp_path / "bias.pth")
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="unexpected.*conv1.bias"):
        load_torchvision(path)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "resnet50.pth"
    path.write_text("<html>403 Forbidden</html>")
    with pytest.raises(CheckpointError, match="not a PyTorch file") as e:
        load_torchvision(str(path))
    assert str(path) in str(e.value)


def test_truncated_file(r18_state, tmp_path):
    path = str(tmp_path / "full.pth")
    torch.save(r18_state, path)
    data = open(path, "rb").read()
    cut = str(tmp_path / "truncated.pth")
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_torchvision(cut)
    assert cut in str(e.value)


def test_hdf5_file_suggests_keras(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = str(tmp_path / "weights.h5")
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CheckpointError, match="keras_h5"):
        load_torchvision(path)


def test_pickled_module_is_refused_with_fix(tmp_path):
    path = str(tmp_path / "module.pt")
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError, match="state_dict"):
        load_torchvision(path)


def test_not_a_resnet_and_wrong_depth(r18_state, tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match="no torchvision ResNet keys"):
        load_torchvision(path)
    path = str(tmp_path / "r18.pth")
    torch.save(r18_state, path)
    with pytest.raises(CheckpointError, match="ResNet18.*depth 34"):
        load_torchvision(path, depth=34)


# ----------------------------------------------------------------------- preprocessing

def test_torch_preprocessing_matches_torchvision_weights_transform():
    tf = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    ref = torchvision.transforms.functional.normalize(
        torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0, tf.mean, tf.std)
    got = preprocessing.normalize(images, "torch")
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_convert_defaults_for_torchvision(r18_state, tmp_path):
    path = str(tmp_path / "resnet18-f37072fd.pth")
    torch.save(r18_state, path)
    out = str(tmp_path / "out")
    summary = convert.convert("torchvision", path, out, num_classes=1000, self_check=False)
    meta = load_metadata(out)
    assert (meta.source, meta.preprocessing, meta.layout) == ("imagenet", "torch", "torchvision_v15")
    assert meta.depth == 18 and meta.num_classes == 1000 and summary["head"].startswith("kept")
