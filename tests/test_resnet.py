"""Unit tests of the Flax ResNet: structure, parameter counts vs Keras/torchvision,
mixed precision, head replacement, named activations and BatchNorm mode override.

Numerical parity with the source frameworks is in test_convert_{keras,torchvision}.py;
the parameter count against keras.applications.ResNet50(include_top=False) is checked
in test_convert_keras.py, which already builds that Keras model (building one costs
10-40 s here).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medtransfer_jax.models import resnet
from medtransfer_jax.weights import merge_into


def _shapes(model, size=32):
    """{'params', 'batch_stats'} as ShapeDtypeStructs (tracing only, no compute)."""
    tree = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((2, size, size, 3), jnp.float32))
    return {k: tree[k] for k in ("params", "batch_stats")}


def _count(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _numpy_variables(model, seed=0):
    """Random variables of the right shapes without compiling ``model.init``.

    (Compiling a ResNet's init costs tens of seconds on a busy 2-core machine; these
    tests need realistic values, not Flax's initialisers.) He-normal kernels, small
    biases, BN scale ~1, running variance ~1.
    """
    rng = np.random.default_rng(seed)
    tree = _shapes(model)

    def leaf(path, x):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(x.shape[:-1]))
            return (rng.normal(0, 1, x.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        return rng.normal(0, 0.1, x.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, tree)


@pytest.fixture(scope="module")
def small():
    """ResNet50 (keras_v1) at width 8 with a 10-class head."""
    model = resnet.ResNet(depth=50, layout="keras_v1", num_classes=10, width=8)
    variables = _numpy_variables(model, seed=1)
    x = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
    return model, variables, x


@pytest.mark.parametrize("depth,layout", [(d, "keras_v1") for d in sorted(resnet.DEPTHS)]
                         + [(18, "torchvision_v15"), (50, "torchvision_v15")])
def test_every_depth_and_layout_builds(depth, layout):
    model = resnet.ResNet(depth=depth, layout=layout, num_classes=7, width=8)
    params = _shapes(model)["params"]
    # "Depth" counts the weighted layers on the main path: convs + the head.
    main_convs = [n for n in params if n.endswith("_conv") and "_0_" not in n]
    assert len(main_convs) + 1 == depth
    kind, blocks = resnet.DEPTHS[depth]
    final = 8 * 8 * (4 if kind == "bottleneck" else 1)
    assert params["predictions"]["kernel"].shape == (final, 7)
    assert ("bias" in params["conv1_conv"]) == (layout == "keras_v1")
    shortcuts = [n for n in params if "_0_conv" in n]
    assert len(shortcuts) == (4 if kind == "bottleneck" else 3)
    assert len(resnet.block_output_names(depth)) == sum(blocks) + 3


@pytest.mark.parametrize("layout", resnet.LAYOUTS)
def test_output_shapes_with_and_without_head(layout):
    x = jnp.zeros((2, 64, 64, 3))
    for num_classes, shape in ((7, (2, 7)), (None, (2, 64))):
        model = resnet.ResNet(depth=18, layout=layout, num_classes=num_classes, width=8)
        out = jax.eval_shape(lambda v, x: model.apply(v, x), _shapes(model), x)
        assert out.shape == shape and out.dtype == jnp.float32


def test_invalid_depth_and_layout_are_explained():
    with pytest.raises(ValueError, match="depth=42"):
        _shapes(resnet.ResNet(depth=42))
    with pytest.raises(ValueError, match="layout='caffe'"):
        _shapes(resnet.ResNet(layout="caffe"))


@pytest.mark.parametrize("depth", [18, 50])
def test_param_counts_match_torchvision(depth):
    torchvision = pytest.importorskip("torchvision")
    tm = getattr(torchvision.models, f"resnet{depth}")()
    tree = _shapes(resnet.ResNet(depth=depth, layout="torchvision_v15", num_classes=1000))
    assert _count(tree["params"]) == sum(p.numel() for p in tm.parameters())
    assert _count(tree["batch_stats"]) == sum(
        b.numel() for n, b in tm.named_buffers() if not n.endswith("num_batches_tracked"))


def test_bf16_compute_keeps_float32_params():
    model = resnet.ResNet(depth=18, layout="torchvision_v15", num_classes=3, width=8,
                          dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(_shapes(model))} == {jnp.dtype(jnp.float32)}
    variables = _numpy_variables(model)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    ref = resnet.ResNet(depth=18, layout="torchvision_v15", num_classes=3, width=8)

    @jax.jit
    def both(v, x):
        names = ["conv1_relu", "conv3_block2_out", "avg_pool", "logits"]
        return resnet.extract_activations(model, v, x, names), ref.apply(v, x)

    acts, ref_logits = both(variables, x)
    assert acts["conv1_relu"].dtype == jnp.bfloat16
    assert acts["conv3_block2_out"].dtype == jnp.bfloat16
    assert acts["avg_pool"].dtype == jnp.bfloat16
    assert acts["logits"].dtype == jnp.float32  # head output is cast back for the loss
    ref_logits = np.asarray(ref_logits)
    np.testing.assert_allclose(np.asarray(acts["logits"]), ref_logits,
                               atol=0.05 * np.abs(ref_logits).max())


def test_head_replace(small):
    model, variables, x = small
    new_model = model.clone(num_classes=3)
    target = _numpy_variables(new_model, seed=5)
    merged = merge_into(target, variables)
    assert merged["params"]["predictions"]["kernel"].shape == (256, 3)
    np.testing.assert_array_equal(merged["params"]["predictions"]["kernel"],
                                  target["params"]["predictions"]["kernel"])
    for layer in ("conv1_conv", "conv4_block3_2_conv", "conv5_block3_3_bn"):
        for k, v in variables["params"][layer].items():
            np.testing.assert_array_equal(merged["params"][layer][k], v)
    assert jax.tree.structure(merged) == jax.tree.structure(target)
    out = jax.eval_shape(lambda v, x: new_model.apply(v, x), merged, x)
    assert out.shape == (2, 3)


def test_extract_activations_names_and_shapes(small):
    model, variables, x = small
    names = list(resnet.stage_output_names(50)) + ["pool1_pool", "avg_pool", "logits"]
    assert names[:5] == ["conv1_relu", "conv2_block3_out", "conv3_block4_out",
                         "conv4_block6_out", "conv5_block3_out"]
    acts = resnet.extract_activations(model, variables, x, names)
    expected = {"conv1_relu": (2, 32, 32, 8), "pool1_pool": (2, 16, 16, 8),
                "conv2_block3_out": (2, 16, 16, 32), "conv3_block4_out": (2, 8, 8, 64),
                "conv4_block6_out": (2, 4, 4, 128), "conv5_block3_out": (2, 2, 2, 256),
                "avg_pool": (2, 256), "logits": (2, 10)}
    assert {k: v.shape for k, v in acts.items()} == expected
    # avg_pool really is the spatial mean of the last block; logits the Dense of it.
    np.testing.assert_allclose(acts["avg_pool"], acts["conv5_block3_out"].mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)
    head = variables["params"]["predictions"]
    np.testing.assert_allclose(
        acts["logits"], np.asarray(acts["avg_pool"], np.float64) @ head["kernel"] + head["bias"],
        rtol=1e-4, atol=1e-5)
    every = resnet.extract_activations(model, variables, x, resnet.block_output_names(50))
    assert list(every) == list(resnet.block_output_names(50))


def test_extract_activations_bad_names(small):
    model, variables, x = small
    with pytest.raises(ValueError, match="conv6_block1_out") as e:
        resnet.extract_activations(model, variables, x, ["conv1_relu", "conv6_block1_out"])
    assert "conv5_block3_out" in str(e.value)  # lists the valid names


def _conv_nhwc_f64(x, kernel, bias, stride, pad):
    """Independent float64 reference: zero padding, then strided sliding windows."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    # win: (B, Ho, Wo, Cin, kh, kw)
    return np.einsum("bhwcij,ijco->bhwo", win, np.asarray(kernel, np.float64)) + (
        0.0 if bias is None else np.asarray(bias, np.float64))


@pytest.mark.parametrize("layout,momentum", [("keras_v1", 0.99), ("torchvision_v15", 0.9)])
def test_batch_norm_train_override(layout, momentum):
    model = resnet.ResNet(depth=18, layout=layout, num_classes=4, width=8, dropout_rate=0.0)
    # Non-trivial running statistics so "uses running stats" and "uses batch stats" differ.
    variables = _numpy_variables(model)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    eval_out = model.apply(variables, x, train=False)

    # Frozen-base phase: train=True but BatchNorm in inference mode -> same as eval,
    # and the running statistics are not touched.
    frozen_out, state = model.apply(variables, x, train=True, batch_norm_train=False,
                                    mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
    np.testing.assert_allclose(frozen_out, eval_out, rtol=1e-6, atol=1e-6)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, state["batch_stats"],
                                            variables["batch_stats"])))

    # The opposite override: batch statistics without train -> running stats move by
    # the layout's momentum towards the batch moments of the stem conv's output.
    out, state = model.apply(variables, x, train=False, batch_norm_train=True,
                             mutable=["batch_stats"])
    assert np.abs(np.asarray(out) - np.asarray(eval_out)).max() > 1e-3
    p = variables["params"]["conv1_conv"]
    y = _conv_nhwc_f64(x, p["kernel"], p.get("bias"), stride=2, pad=3)
    old = variables["batch_stats"]["conv1_bn"]
    new = state["batch_stats"]["conv1_bn"]
    np.testing.assert_allclose(new["mean"], momentum * old["mean"] + (1 - momentum) * y.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new["var"], momentum * old["var"] + (1 - momentum) * y.var((0, 1, 2)),
                               rtol=1e-4, atol=1e-5)


def test_dropout_only_in_train(small):
    model, variables, x = small
    model = model.clone(dropout_rate=0.5)
    a = model.apply(variables, x, train=False)
    b = model.apply(variables, x, train=True, batch_norm_train=False,
                    rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(a, model.apply(variables, x, train=False))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


def test_model_spec_roundtrip():
    spec = resnet.ModelSpec(depth=18, layout="torchvision_v15", num_classes=None, width=16)
    model = spec.build(num_classes=5, dtype=jnp.bfloat16)
    assert (model.depth, model.layout, model.num_classes, model.width, model.dtype) == (
        18, "torchvision_v15", 5, 16, jnp.bfloat16)


def test_a_random_init_draws_as_the_layouts_framework_does():
    """The random baseline and every new head start as the papers' frameworks start them:
    Keras layout = glorot_uniform kernels and zero biases (Keras' Conv2D / Dense defaults,
    drawn by Keras itself here); torchvision layout = kaiming_normal(fan_out) convolutions
    and torch.nn.Linear's default head (drawn by torch). Compared by range and sd."""
    import keras
    import torch

    def stats(a):
        a = np.asarray(a, np.float64)
        return np.abs(a).max(), a.std()

    for layout in ("keras_v1", "torchvision_v15"):
        model = resnet.ResNet(depth=18, layout=layout, width=16, num_classes=2)
        params = resnet.init_variables(model, jax.random.key(0), 32)["params"]
        stem = np.asarray(params["conv1_conv"]["kernel"])            # (7, 7, 3, 16)
        head = np.asarray(params["predictions"]["kernel"])           # (128, 2)
        bias = np.asarray(params["predictions"]["bias"])
        if layout == "keras_v1":
            ref_stem = keras.initializers.GlorotUniform(seed=1)(stem.shape)
            ref_head = keras.initializers.GlorotUniform(seed=2)(head.shape)
            assert not bias.any() and not np.asarray(params["conv1_conv"]["bias"]).any()
        else:
            conv = torch.nn.Conv2d(3, 16, 7, bias=False)
            torch.nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            ref_stem = conv.weight.detach().numpy()
            lin = torch.nn.Linear(128, 2)
            ref_head = lin.weight.detach().numpy()
            assert np.abs(bias).max() <= 1 / np.sqrt(128) and bias.any()
        for ours, ref in ((stem, ref_stem), (head, ref_head)):
            (m_ours, sd_ours), (m_ref, sd_ref) = stats(ours), stats(ref)
            assert sd_ours == pytest.approx(sd_ref, rel=0.15), (layout, ours.shape)
            if layout == "keras_v1" or ours is head:       # uniform: the same bound
                assert m_ours <= m_ref * 1.02 + 1e-6 and m_ours >= 0.9 * m_ref


def test_the_sigmoid_head_is_kerass_binary_head():
    """head='sigmoid' (Revisiting Feb-2023: Dense(1, sigmoid) + BinaryCrossentropy): one
    unit; the logits [0, z] give softmax [1 - sigmoid(z), sigmoid(z)] and a softmax
    cross-entropy equal to Keras' binary cross-entropy on sigmoid(z)."""
    import keras
    from medtransfer_jax.inference.predict import cross_entropy
    model = resnet.ResNet(depth=18, width=8, num_classes=2, head="sigmoid")
    variables = resnet.init_variables(model, jax.random.key(0), 32)
    assert variables["params"]["predictions"]["kernel"].shape == (64, 1)
    x = jax.random.normal(jax.random.key(1), (6, 32, 32, 3))
    logits = np.asarray(model.apply(variables, x))
    assert logits.shape == (6, 2) and not logits[:, 0].any()
    z = logits[:, 1].astype(np.float64)
    probs = np.asarray(jax.nn.softmax(logits, -1))
    np.testing.assert_allclose(probs[:, 1], 1 / (1 + np.exp(-z)), rtol=1e-5)
    labels = np.array([0, 1, 1, 0, 1, 0])
    ours = np.asarray(cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 2, 0.0))
    theirs = np.asarray(keras.losses.binary_crossentropy(
        labels[:, None].astype(np.float32), (1 / (1 + np.exp(-z)))[:, None].astype(np.float32)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="sigmoid needs a 2-class task"):
        resnet.ResNet(depth=18, width=8, num_classes=3, head="sigmoid").init(
            jax.random.key(0), x)


@pytest.mark.parametrize("depth, depth_of", [(18, lambda k: (k + 1) / 16),
                                             (50, lambda k: (3 * k + 2) / 48)])
def test_resnet_3x3_depths_are_the_filter_dbs(depth, depth_of):
    """The longest-path graph levels of a ResNet (onnxzoo2filterdb's depth, worked out on
    the network's graph: the 7x7 stem, the 1x1s and the 3x3s each a level, a projection
    shortcut on its block's first level) put the k-th 3x3 layer of ResNet18 at (k+1)/16
    and of ResNet50 at (3k+2)/48."""
    from medtransfer_jax.analysis import filters as F
    params = resnet.init_variables(resnet.ResNet(depth=depth, width=8, num_classes=None),
                                   jax.random.key(0), 32)
    got = [lf.depth for lf in F.extract_filters(params)]
    np.testing.assert_allclose(got, [depth_of(k) for k in range(16)])
