"""Freezing policies, schedules, label smoothing and mixed precision of the train step."""
import _train_utils  # also: persistent XLA cache
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from medtransfer_jax.training import optim, state as state_lib, step as step_lib
from medtransfer_jax import sharding

K = 2


@pytest.fixture(scope="module")
def setup():
    return _train_utils.tiny_resnet_and_batches(K, batch_size=8, num_batches=2)


def _run(model, variables, batches, policy, bn_train, dtype=None, lr=1e-2):
    cfg = ml_collections.ConfigDict(dict(optimizer="adam", lr=lr))
    if dtype is not None:
        model = model.clone(dtype=dtype)
    mesh = sharding.make_mesh(1)
    tx = optim.make_optimizer(cfg, variables["params"], policy, total_steps=10)
    st, sh = state_lib.create_sharded_state(variables, tx, jax.random.PRNGKey(1),
                                            lambda a: sharding.state_shardings(mesh, a))
    frozen = optim.frozen_mask(variables["params"], policy) if policy != "none" else None
    ts = step_lib.make_train_step(model, tx, mesh, sh, num_classes=K, batch_norm_train=bn_train,
                                  frozen_layers=frozen)
    losses = []
    for b in batches:
        st, m = ts(st, sharding.make_global_batch(mesh, b))
        losses.append(float(m["loss"]))
    m = dict(jax.device_get(m), losses=losses)
    return jax.device_get(st), m


def _changed(a, b):
    return not np.array_equal(np.asarray(a), np.asarray(b))


def test_freeze_up_to_stage(setup):
    model, v, batches = setup
    st, _ = _run(model, v, batches, "stage:3", bn_train=True)
    for layer in v["params"]:
        stage = optim.layer_stage(layer)
        for leaf in v["params"][layer]:
            moved = _changed(v["params"][layer][leaf], st.params[layer][leaf])
            assert moved == (stage > 3), (layer, leaf, moved)
    for layer in v["batch_stats"]:
        moved = _changed(v["batch_stats"][layer]["mean"], st.batch_stats[layer]["mean"])
        assert moved == (optim.layer_stage(layer) > 3), layer
    # Frozen layers carry no Adam moments (masked state).
    flat = jax.tree_util.tree_leaves_with_path(st.opt_state)
    assert not any("conv2_block1_1_conv" in jax.tree_util.keystr(p) and np.size(x) > 1
                   and np.any(np.asarray(x) != 0) for p, x in flat)


def test_linear_probe_keeps_base_and_bn_stats(setup):
    """The studies' head phase: only `predictions` trains, BatchNorm in inference mode."""
    model, v, batches = setup
    assert not optim.default_batch_norm_train("linear_probe")
    st, m = _run(model, v, batches, "linear_probe", bn_train=False)
    for layer in v["params"]:
        moved = _changed(v["params"][layer]["kernel" if "kernel" in v["params"][layer]
                                            else "scale"], st.params[layer].get(
            "kernel", st.params[layer].get("scale")))
        assert moved == (layer == "predictions"), layer
    for layer in v["batch_stats"]:
        np.testing.assert_array_equal(v["batch_stats"][layer]["var"],
                                      st.batch_stats[layer]["var"])
    assert np.isfinite(m["loss"])


def test_full_finetune_moves_everything_and_mixed_precision(setup):
    model, v, batches = setup
    st, m = _run(model, v, batches, "none", bn_train=True, dtype=jnp.bfloat16)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(st.params))  # fp32 master weights
    assert _changed(v["params"]["conv1_conv"]["kernel"], st.params["conv1_conv"]["kernel"])
    assert _changed(v["batch_stats"]["conv1_bn"]["mean"], st.batch_stats["conv1_bn"]["mean"])
    assert np.isfinite(m["loss"])
    st32, m32 = _run(model, v, batches, "none", bn_train=True)
    # Before any update the bf16 forward pass tracks fp32 to bf16 precision.
    assert m["losses"][0] != m32["losses"][0]  # really computed in another precision
    assert abs(m["losses"][0] - m32["losses"][0]) < 0.05 * abs(m32["losses"][0])


def test_policies_parse():
    assert optim.phase_policies("two_phase") == ("linear_probe", "none")
    assert optim.parse_freeze("stage:2") == ("stage", 2)
    with pytest.raises(ValueError, match="stage:k"):
        optim.parse_freeze("stage:9")
    assert optim.layer_stage("conv4_block6_3_bn") == 4
    assert optim.layer_stage("predictions") == 6
    with pytest.raises(ValueError, match="not a Keras ResNet layer name"):
        optim.layer_stage("dense_1")


def test_schedule_warmup_cosine():
    lr, total, warm = 0.1, 100, 10
    sched = optim.make_schedule(lr, total, "cosine", warmup_steps=warm, end_lr_factor=0.1)
    for t in [0, 5, 10, 40, 99, 100]:
        if t < warm:
            ref = lr * t / warm
        else:
            frac = min(1.0, (t - warm) / (total - warm))
            ref = lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac)))
        assert float(sched(t)) == pytest.approx(ref, rel=1e-5, abs=1e-8), t
    const = optim.make_schedule(lr, total, "constant")
    assert float(const(57)) == pytest.approx(lr)


def test_logged_lr_is_the_schedule_compiled_once():
    """The log line's lr equals the optimizer's schedule, from one cached program."""
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(schedule="cosine", warmup_steps=10,
                                         end_lr_factor=0.1))
    sched = optim.make_schedule(0.1, 100, "cosine", warmup_steps=10, end_lr_factor=0.1)
    optim._jitted_schedule.cache_clear()
    for t in [0, 5, 10, 40, 99, 100]:
        assert optim.lr_at(cfg, 0.1, 100, t) == pytest.approx(float(sched(t)), rel=1e-6), t
    assert optim._jitted_schedule.cache_info().misses == 1


def test_weight_decay_only_on_kernels():
    params = {"conv1_conv": {"kernel": jnp.ones((3,)), "bias": jnp.ones((3,))}}
    tx = optim.make_base_optimizer("sgd", optax.constant_schedule(1.0), momentum=0.0,
                                   weight_decay=0.5)
    zero = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(upd["conv1_conv"]["kernel"], -0.5)
    np.testing.assert_allclose(upd["conv1_conv"]["bias"], 0.0)


def test_label_smoothing_and_weighted_loss_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 2, 1, 0])
    w = np.array([1, 1, 0, 1, 0.5, 1], np.float32)
    loss = step_lib._weighted_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w),
                                   3, 0.1)
    lg = logits.astype(np.float64)
    logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
    target = np.eye(3)[labels] * 0.9 + 0.1 / 3
    ref = np.sum(-(target * logp).sum(1) * w) / w.sum()
    assert float(loss) == pytest.approx(ref, rel=1e-5)
