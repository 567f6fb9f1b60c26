"""Data-parallel training on 8 (fake CPU) devices equals 1-device training.

BatchNorm statistics must be global-batch in both (a per-device BN would give other
losses and running stats), and FSDP-sharded parameters must not change the math.
"""
import _train_utils  # also: persistent XLA cache
import jax
import ml_collections
import numpy as np
import pytest

from medtransfer_jax.training import optim, state as state_lib, step as step_lib
from medtransfer_jax import sharding

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def setup():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    return _train_utils.tiny_resnet_and_batches(NUM_CLASSES, batch_size=16, num_batches=3)


def _train(model, variables, batches, num_devices, fsdp=False):
    cfg = ml_collections.ConfigDict(dict(optimizer="sgd", lr=0.05, momentum=0.9))
    mesh = sharding.make_mesh(num_devices)
    tx = optim.make_optimizer(cfg, variables["params"], "none", total_steps=10)
    st, sh = state_lib.create_sharded_state(
        variables, tx, jax.random.PRNGKey(1),
        lambda a: sharding.state_shardings(mesh, a, fsdp=fsdp, min_fsdp_size=256))
    train_step = step_lib.make_train_step(model, tx, mesh, sh, num_classes=NUM_CLASSES)
    losses = []
    for b in batches:
        st, m = train_step(st, sharding.make_global_batch(mesh, b))
        losses.append(float(m["loss"]))
    return jax.device_get(st), losses, st


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y)))), a, b)))


def test_eight_devices_equal_one_device(setup):
    model, variables, batches = setup
    s1, l1, _ = _train(model, variables, batches, 1)
    s8, l8, live8 = _train(model, variables, batches, 8)
    # The batch really was split: each of 8 devices holds 2 of the 16 examples.
    mesh8 = sharding.make_mesh(8)
    gb = sharding.make_global_batch(mesh8, batches[0])
    assert {tuple(s.data.shape) for s in gb["image"].addressable_shards} == {(2, 32, 32, 3)}
    assert len(live8.params["conv1_conv"]["kernel"].sharding.device_set) == 8
    # Float32 sums in another order: agreement to ~1e-5 relative after 3 steps.
    np.testing.assert_allclose(l8, l1, rtol=1e-4)
    assert l1[0] != l1[2]  # training moved
    assert _max_diff(s1.params, s8.params) < 2e-4, _max_diff(s1.params, s8.params)
    # BN running statistics over the global batch (per-device stats would differ by O(1)).
    assert _max_diff(s1.batch_stats, s8.batch_stats) < 2e-4, _max_diff(s1.batch_stats,
                                                                      s8.batch_stats)
    assert _max_diff(variables["batch_stats"], s1.batch_stats) > 1e-3


def test_fsdp_equals_replicated(setup):
    model, variables, batches = setup
    s1, l1, _ = _train(model, variables, batches, 1)
    sf, lf, live = _train(model, variables, batches, 8, fsdp=True)
    spec = live.params["conv5_block1_1_conv"]["kernel"].sharding.spec
    assert sharding.DATA_AXIS in tuple(spec), spec  # really sharded
    # momentum buffers follow their parameters' sharding
    np.testing.assert_allclose(lf, l1, rtol=1e-4)
    assert _max_diff(s1.params, sf.params) < 2e-4, _max_diff(s1.params, sf.params)


def test_fsdp_spec_rules():
    spec = sharding.fsdp_spec((3, 3, 64, 128), 8, min_size=1)
    assert spec == sharding.P(None, None, None, "data")
    assert sharding.fsdp_spec((10,), 8, min_size=1) == sharding.P()  # not divisible
    assert sharding.fsdp_spec((3, 3, 64, 128), 8, min_size=10 ** 6) == sharding.P()  # small
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        sharding.local_batch_size(12, sharding.make_mesh(8))
