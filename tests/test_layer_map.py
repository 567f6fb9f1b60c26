"""Layer x layer maps (analysis/layer_map.py) against the in-memory kernels, tiny ResNet18."""
import jax
import numpy as np
import pytest

from medtransfer_jax.inference import activations as act
from medtransfer_jax.analysis import compare, plots
from medtransfer_jax.analysis import layer_map as LM
from medtransfer_jax.analysis import similarity as S
from medtransfer_jax.analysis import streaming as St
from medtransfer_jax.models import resnet
from medtransfer_jax import sharding
from medtransfer_jax.weights.checkpoint import WeightsMetadata

SIZE, N, BATCH = 64, 40, 8


def _net(seed, prep):
    model = resnet.ResNet(depth=18, width=8, num_classes=None)
    meta = WeightsMetadata(source="random", layout="keras_v1", depth=18, width=8,
                           preprocessing=prep, image_size=SIZE)
    return act.LoadedModel(model, resnet.random_variables(model, seed), meta, f"net{seed}")


@pytest.fixture(scope="module")
def nets():
    return _net(0, "unit"), _net(1, "caffe")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (N, SIZE, SIZE, 3)).astype(np.float32)
    grad = np.linspace(0, 255, SIZE)[None, :, None, None]
    return np.clip(0.6 * base + 0.4 * grad, 0, 255).astype(np.uint8)


def _features(net, images, layers, grid):
    acts = act.run_layers(net, images, layers, batch_size=BATCH)
    out = {}
    for l, a in acts.items():
        a = act._to_grid(a, *grid) if grid else a.mean(axis=(1, 2))
        out[l] = a.reshape(-1, a.shape[-1]).astype(np.float32)
    return out


def test_all_blocks_names():
    assert len(LM.all_blocks(50)) == 17 and len(LM.all_blocks(18)) == 9
    assert LM.all_blocks(18)[:2] == ("conv1_relu", "conv2_block1_out")


def test_map_matches_in_memory_kernels(nets, images):
    a, b = nets
    layers = ("conv1_relu", "conv2_block2_out", "conv4_block1_out", "conv5_block2_out")
    m = LM.layer_map(a, b, images, layers=layers, spatial="grid", batch_size=BATCH,
                     methods=("mean_cca", "svcca", "pwcca", "linear_cka", "debiased_cka"))
    assert m.layers_a == layers and m.layers_b == layers  # (all_blocks: test_analysis_map_cli)
    assert m.spatial.startswith("grid 2x2") and m.datapoints == N * 4
    fa, fb = _features(a, images, layers, (2, 2)), _features(b, images, layers, (2, 2))
    for i, la in enumerate(layers):
        for j, lb in enumerate(layers):
            for meth in ("mean_cca", "svcca", "pwcca", "linear_cka"):
                want = float(S.similarity(fa[la], fb[lb], meth, route="qr",
                                          rtol=St.DEFAULT_STREAMING_RTOL))
                assert m.values[meth][i, j] == pytest.approx(want, abs=2e-4), (meth, la, lb)
            # minibatch CKA: the same batches through the per-pair streaming estimator
            st = St.init_minibatch_cka()
            rows = BATCH * 4
            for s in range(0, N * 4, rows):
                st = St.update_minibatch_cka(st, fa[la][s:s + rows], fb[lb][s:s + rows])
            assert m.values["debiased_cka"][i, j] == pytest.approx(
                St.finish_minibatch_cka(st), abs=1e-4), (la, lb)
    vals = m.values["mean_cca"]
    assert np.all((vals > 0) & (vals <= 1)) and vals.std() > 0.01


def test_self_map_pool_and_rows(nets, images, tmp_path):
    a, _ = nets
    layers = ("conv1_relu", "conv2_block2_out", "conv3_block2_out")
    m = LM.layer_map(a, None, images, layers=layers, spatial="pool", batch_size=BATCH,
                     methods=("mean_cca", "debiased_cka", "linear_cka"))
    assert m.spatial.startswith("pool") and m.datapoints == N
    np.testing.assert_allclose(np.diag(m.values["mean_cca"]), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.diag(m.values["linear_cka"]), 1.0, atol=1e-6)
    np.testing.assert_allclose(m.values["linear_cka"], m.values["linear_cka"].T, atol=1e-9)
    fa = _features(a, images, layers, None)
    assert m.values["linear_cka"][0, 2] == pytest.approx(
        float(S.linear_cka(fa[layers[0]], fa[layers[2]])), abs=1e-5)
    rows = compare.compare_networks(a, a, images, layers=layers, pairs="all",
                                    method=["mean_cca"], spatial="pool", batch_size=BATCH)
    assert len(rows) == 9 and {r["layer_a"] for r in rows} == set(layers)
    png = plots.plot_layer_map(m, "mean_cca", str(tmp_path / "map.png"))
    assert (tmp_path / "map.png").stat().st_size > 5000 and png.endswith("map.png")


def test_channel_cap_scale_and_errors(nets, images):
    a, b = nets
    layers = ("conv4_block2_out", "conv5_block2_out")  # 32 and 64 channels
    m = LM.layer_map(a, b, images, layers=layers, spatial="grid", batch_size=BATCH,
                     max_channels=16, methods=("mean_cca",))
    assert m.channels_a == (16, 16) and m.channels_b == (16, 16)
    # D = 64 + 2 x cap; 3 D^2 float32 <= 1 MiB holds for cap = 64 (442 KiB), not 128 (1.2 MB)
    assert LM._auto_cap([64, 2048, 2048], budget_mb=1.0) == 64
    assert LM._auto_cap([8, 16], budget_mb=1.0) is None
    with pytest.raises(ValueError, match="more datapoints than channels"):
        LM.layer_map(a, b, images, layers=layers, spatial="pool", batch_size=BATCH)
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        LM.layer_map(a, b, images, layers=layers, batch_size=BATCH + 1,
                     mesh=sharding.make_mesh(8))
    # without a mesh, the largest device count dividing the batch is used
    assert act.forward_mesh(BATCH + 1).size == 3 and act.forward_mesh(16).size == 8
    with pytest.raises(ValueError, match="spatial="):
        LM.layer_map(a, b, images, layers=layers, spatial="positions")


SHARDED_SCRIPT = r"""
import json, sys
import numpy as np
import jax
sys.path.insert(0, sys.argv[1])
from test_layer_map import _net, SIZE
from medtransfer_jax.analysis import compare, layer_map as LM
from medtransfer_jax import sharding
assert jax.device_count() == 8, jax.devices()
rng = np.random.default_rng(1)
images = rng.integers(0, 256, (44, SIZE, SIZE, 3)).astype(np.uint8)
a, b = _net(0, "unit"), _net(1, "caffe")
out = {}
for n in (1, 8):
    mesh = sharding.make_mesh(n)
    m = LM.layer_map(a, b, images, layers=("conv1_relu", "conv3_block2_out",
                                             "conv5_block2_out"), spatial="grid",
                     batch_size=16, mesh=mesh,
                     methods=("mean_cca", "pwcca", "linear_cka", "debiased_cka"))
    rows = compare.compare_networks(a, b, images, method=["paper_cca", "linear_cka"],
                                    positions=200, num_channels=8, batch_size=16, mesh=mesh)
    out[n] = dict(map={k: v.tolist() for k, v in m.values.items()},
                  rows=[r["value"] for r in rows])
print("RESULT" + json.dumps(out))
"""


def test_eight_devices_give_the_same_similarities_as_one(tmp_path):
    """#15.3: forward passes and streaming statistics split over 8 (fake CPU) devices
    reproduce the 1-device values (layer map and the paper-style protocol)."""
    import json
    import os
    import subprocess
    import sys
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, str(script), tests_dir], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.split("RESULT", 1)[1])
    one, eight = res["1"], res["8"]
    for k in one["map"]:
        np.testing.assert_allclose(eight["map"][k], one["map"][k], atol=2e-5, err_msg=k)
    np.testing.assert_allclose(eight["rows"], one["rows"], atol=2e-5)
    assert np.std(one["map"]["mean_cca"]) > 0.01


def test_accumulating_collectives_start_on_computed_inputs(nets, images, monkeypatch):
    """On several CPU devices the all-reduce programs that accumulate statistics get inputs
    that are already computed (sharding.settled): launched behind queued forward passes,
    XLA:CPU's devices could wait on each other until the process aborted (CI, 2026-11-26)."""
    a, b = nets
    seen = []

    def recording(name, real):
        def call(*args, **kw):
            leaves = [x for x in jax.tree_util.tree_leaves(args[1])
                      if isinstance(x, jax.Array)]
            seen.append((name, all(x.is_ready() for x in leaves),
                         max(len(x.sharding.device_set) for x in leaves)))
            return real(*args, **kw)
        return call

    monkeypatch.setattr(St, "update_joint", recording("map", St.update_joint))
    monkeypatch.setattr(St, "update_covariance_many",
                        recording("protocol", St.update_covariance_many))
    mesh = sharding.make_mesh(8)
    LM.layer_map(a, b, images, layers=("conv1_relu", "conv5_block2_out"), spatial="grid",
                 batch_size=BATCH, mesh=mesh, methods=("mean_cca",))
    compare.compare_networks(a, b, images, method=["mean_cca"], layers=["conv1_relu"],
                             streaming_mode=True, batch_size=BATCH, mesh=mesh)
    assert {name for name, _, _ in seen} == {"map", "protocol"}
    assert all(devices == 8 for _, _, devices in seen), seen
    assert all(ready for _, ready, _ in seen), seen


def test_settled_waits_only_for_arrays_on_several_cpu_devices():
    import jax.numpy as jnp
    one = jnp.arange(4.0)
    assert sharding.settled(one) is one
    spread = jax.device_put(np.arange(16.0), sharding.batch_sharding(sharding.make_mesh(8)))
    tree = {"x": jax.jit(lambda v: v * 2)(spread), "n": 3}
    out = sharding.settled(tree)
    assert out["n"] == 3 and out["x"].is_ready()
