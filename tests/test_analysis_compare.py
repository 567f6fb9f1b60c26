"""Activations, the paper CCA preset and network comparison on a tiny ResNet50 (width 8)."""
import dataclasses

import jax
import numpy as np
import pytest

from medtransfer_jax.inference import activations as act
from medtransfer_jax.analysis import compare
from medtransfer_jax.analysis import similarity as S
from medtransfer_jax.models import resnet
from medtransfer_jax.weights.checkpoint import WeightsMetadata, save_weights

SIZE = 64


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    model = resnet.ResNet(depth=50, width=8, num_classes=None)
    dirs = []
    for i, prep in enumerate(("unit", "caffe")):
        v = resnet.random_variables(model, i)
        d = str(root / f"net{i}")
        save_weights(d, v, WeightsMetadata(source="random", layout="keras_v1", depth=50, width=8,
                                           preprocessing=prep, image_size=SIZE))
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (48, SIZE, SIZE, 3)).astype(np.float32)
    grad = np.linspace(0, 255, SIZE)[None, :, None, None]
    return np.clip(0.6 * base + 0.4 * grad, 0, 255).astype(np.uint8)


def test_paper_preset_defaults():
    p = compare.PaperCCAProtocol()
    assert (p.positions, p.num_channels, p.repeats, p.method, p.epsilon) == (
        10000, 64, 5, "paper_cca", 1e-12)
    assert resnet.stage_output_names(50) == ("conv1_relu", "conv2_block3_out",
                                             "conv3_block4_out", "conv4_block6_out",
                                             "conv5_block3_out")
    # the study's images per layer at 112 px (conv1 56x56 ... conv5 4x4)
    assert [act.images_per_layer(s, s) for s in (56, 28, 14, 7, 4)] == [3, 13, 51, 204, 625]


def test_plan_is_deterministic_and_follows_protocol():
    shapes = {"l1": (16, 16, 8), "l2": (4, 4, 128), "l3": (32,)}
    kw = dict(positions=300, num_channels=64, repeats=3, seed=1)
    plan = compare.make_plan(shapes, 50, **kw)
    again = compare.make_plan(shapes, 50, **kw)
    assert all(np.array_equal(a.images, b.images) for a, b in zip(plan, again))
    by = {(d.layer, d.repeat): d for d in plan}
    assert len(by[("l1", 0)].images) == 1  # round(300 / 256)
    assert len(by[("l2", 0)].images) == 19  # round(300 / 16)
    assert len(by[("l3", 0)].images) == 50  # pooled layer: all images
    assert by[("l1", 0)].channels is None  # 8 < 64 channels: all
    ch = by[("l2", 0)].channels
    assert len(ch) == 64 and len(set(ch)) == 64 and ch.max() < 128
    assert not np.array_equal(by[("l2", 0)].channels, by[("l2", 1)].channels)
    assert not np.array_equal(by[("l2", 0)].images, by[("l2", 1)].images)


def test_run_layers_pads_and_matches_direct(weights, images):
    loaded = act.load_model(weights[0])
    x = act.prepare_images(images[:5], "unit")
    got = act.run_layers(loaded, images[:5], ["conv3_block4_out"], batch_size=16)
    want = resnet.extract_activations(loaded.model, loaded.variables, x, ["conv3_block4_out"])
    assert got["conv3_block4_out"].shape == (5, 8, 8, 64)
    np.testing.assert_allclose(got["conv3_block4_out"], np.asarray(want["conv3_block4_out"]),
                               rtol=1e-5, atol=1e-4)  # jit vs eager op order
    assert act.layer_shapes(loaded, SIZE, ["conv3_block4_out", "avg_pool"]) == {
        "conv3_block4_out": (8, 8, 64), "avg_pool": (256,)}
    with pytest.raises(ValueError, match="unknown layer"):
        act.run_layers(loaded, images[:2], ["conv9_block1_out"])


def test_spatial_helpers():
    a = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    assert act.spatial_datapoints(a, "positions").shape == (32, 3)
    np.testing.assert_allclose(act.spatial_datapoints(a, "pool"), a.mean((1, 2)))
    b = np.ones((2, 2, 2, 5), np.float32)
    pa, pb = act.match_spatial(a, b)
    assert pa.shape == (2, 2, 2, 3) and pb is b
    np.testing.assert_allclose(pa[0, 0, 0], a[0, :2, :2].mean((0, 1)))


def _reference_value(weights, images, draw, layer, preps=("unit", "caffe")):
    """Independent recomputation of one draw from raw extract_activations."""
    vals = []
    for d, prep in zip(weights, preps):
        loaded = act.load_model(d)
        x = act.prepare_images(images[draw.images], prep)
        a = resnet.extract_activations(loaded.model, loaded.variables, x, [layer])[layer]
        a = np.asarray(a)
        a = a.reshape(-1, a.shape[-1])
        vals.append(a if draw.channels is None else a[:, draw.channels])
    return vals


def test_paper_protocol_against_manual_computation(weights, images):
    proto = compare.PaperCCAProtocol(positions=300, repeats=2, batch_size=16, seed=3)
    rows = compare.run_paper_protocol(weights[0], weights[1], images, proto)
    assert [r["layer"] for r in rows] == list(resnet.stage_output_names(50))
    loaded = act.load_model(weights[0])
    shapes = act.layer_shapes(loaded, SIZE, resnet.stage_output_names(50))
    plan = compare.make_plan(shapes, len(images), positions=300, num_channels=64, repeats=2,
                             seed=3)
    for r in rows:
        assert r["repeats"] == 2 and r["method"] == "paper_cca"
        h, w, c = shapes[r["layer"]]
        assert r["channels"] == min(64, c)
        assert r["datapoints"] == min(len(images), act.images_per_layer(h, w, 300)) * h * w
        assert 0.0 < r["value"] < 1.0
    # recompute two layers by hand: as the paper's CCA.py, caffe inputs for BOTH networks
    # although network 0 was trained on 'unit' inputs (RadImageNet-style, issue #12.3)
    for layer in ("conv2_block3_out", "conv5_block3_out"):
        draws = [d for d in plan if d.layer == layer]
        manual = [float(S.svcca_paper_cca(*_reference_value(weights, images, d, layer,
                                                            ("caffe", "caffe"))))
                  for d in draws]
        row = next(r for r in rows if r["layer"] == layer)
        np.testing.assert_allclose(row["values"], manual, atol=1e-5)
        assert row["value"] == pytest.approx(np.mean(manual), abs=1e-5)
    # each model's own preprocessing is a different input, so a different similarity
    mine = compare.run_paper_protocol(
        weights[0], weights[1], images, dataclasses.replace(proto, preprocessing=None))
    by = {r["layer"]: r["value"] for r in mine}
    own_manual = [float(S.svcca_paper_cca(*_reference_value(weights, images, d,
                                                            "conv5_block3_out")))
                  for d in plan if d.layer == "conv5_block3_out"]
    assert by["conv5_block3_out"] == pytest.approx(np.mean(own_manual), abs=1e-5)
    assert abs(by["conv1_relu"] - next(r["value"] for r in rows
                                       if r["layer"] == "conv1_relu")) > 1e-3


def test_paper_protocol_stimuli_preset():
    p = compare.PaperCCAProtocol()
    assert (p.preprocessing, p.stimulus_split, p.image_size) == ("caffe", "val", None)
    sizes = {d: compare.PaperCCAProtocol.for_dataset(d).image_size
             for d in ("breast", "thyroid", "mammograms", "pcam-small", "chest", "knee",
                       "isic")}
    assert sizes == dict(breast=224, thyroid=224, mammograms=224, **{"pcam-small": 96},
                         chest=112, knee=112, isic=112)


def test_paper_protocol_refuses_other_stimulus_size(weights, images):
    proto = compare.PaperCCAProtocol.for_dataset("breast", positions=300, repeats=1)
    with pytest.raises(ValueError, match="224 px stimuli"):
        compare.run_paper_protocol(weights[0], weights[1], images, proto)


def test_identical_networks_are_fully_similar(weights, images):
    rows = compare.compare_networks(weights[0], weights[0], images,
                                    method=["mean_cca", "linear_cka", "procrustes"],
                                    positions=200, num_channels=16, batch_size=16)
    for r in rows:
        want = 0.0 if r["method"] == "procrustes" else 1.0
        assert r["value"] == pytest.approx(want, abs=1e-4), r


def test_pool_and_streaming_modes(weights, images):
    rows = compare.compare_networks(weights[0], weights[1], images, layers=["conv5_block3_out"],
                                    method=["linear_cka", "debiased_cka"], spatial="pool",
                                    batch_size=16)
    assert all(r["datapoints"] == len(images) and r["channels"] == 256 for r in rows)
    # streaming over all positions equals the in-memory kernel on the same positions
    layer = "conv4_block6_out"  # 4x4 at 64 px: 48 images x 16 positions = 768 datapoints
    st = compare.compare_networks(weights[0], weights[1], images, layers=[layer],
                                  method=["mean_cca", "linear_cka"], num_channels=32,
                                  streaming_mode=True, batch_size=16, seed=5)
    rng = np.random.default_rng(5)
    ch = np.sort(rng.choice(128, 32, replace=False))
    A = act.run_layers(act.load_model(weights[0]), images, [layer], batch_size=16)[layer]
    B = act.run_layers(act.load_model(weights[1]), images, [layer], batch_size=16)[layer]
    X, Y = A.reshape(-1, 128)[:, ch], B.reshape(-1, 128)[:, ch]
    by = {r["method"]: r for r in st}
    assert by["mean_cca"]["datapoints"] == 768
    assert by["mean_cca"]["value"] == pytest.approx(float(S.mean_cca(X, Y)), abs=2e-4)
    assert by["linear_cka"]["value"] == pytest.approx(float(S.linear_cka(X, Y)), abs=2e-4)


def test_compare_errors(weights, images):
    with pytest.raises(ValueError, match="Unknown method"):
        compare.compare_networks(weights[0], weights[1], images, method="magic")
    with pytest.raises(ValueError, match="more datapoints than neurons"):
        # pooled conv5 (256 channels) on 48 images cannot do CCA
        compare.compare_networks(weights[0], weights[1], images, layers=["conv5_block3_out"],
                                 method="mean_cca", spatial="pool", batch_size=16)
    with pytest.raises(ValueError, match="spatial"):
        compare.compare_networks(weights[0], weights[1], images, spatial="fourier")


def test_nonfinite_activations_name_the_layer(weights, images):
    """A diverged network (NaN weights) is reported with the layer and the count."""
    loaded = act.load_model(weights[1])
    bad_vars = jax.tree.map(lambda v: v * np.nan, loaded.variables)
    broken = dataclasses.replace(loaded, variables=bad_vars, name="diverged")
    with pytest.raises(S.NonFiniteActivationsError, match=r"Y of conv1_relu: \d+ of"):
        compare.compare_networks(weights[0], broken, images, layers=["conv1_relu"],
                                 positions=200, num_channels=8, batch_size=16)


def test_too_few_datapoints_are_warned_about():
    """2 images at 7x7 give 98 positions for 64 channels: far from the protocol's 10,000
    and under 10 per channel (CCA inflated); a well-fed layer gets no warning."""
    shapes = {"conv5": (7, 7, 64), "conv1": (112, 112, 64)}  # conv1: 1 image suffices
    draws = compare.make_plan(shapes, 2, positions=10000, num_channels=64, repeats=1, seed=0)
    msgs = compare.warn_few_datapoints(draws, shapes, "positions", 10000, ["paper_cca"])
    assert len(msgs) == 1 and msgs[0].startswith("conv5: 98 datapoints from 2 image(s)")
    assert "asks ~10000" in msgs[0] and "biased upward" in msgs[0]
    many = compare.make_plan(shapes, 400, positions=10000, num_channels=64, repeats=1, seed=0)
    assert compare.warn_few_datapoints(many, shapes, "positions", 10000, ["paper_cca"]) == []
    # CKA is not inflated that way: only the shortfall against the protocol is reported
    (cka,) = compare.warn_few_datapoints(draws, shapes, "positions", 10000, ["linear_cka"])
    assert "biased" not in cka
