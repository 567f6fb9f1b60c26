"""The training loop's steady state, as an accelerator would see it: no implicit
host-to-device transfer anywhere in a phase (each one is a hidden copy per step), and
one compiled train step per phase however many steps, evaluations and checkpoints.

On a GPU these faults would show as a step that is not compute-bound; here they are
caught on the CPU with jax.transfer_guard and the jitted step's trace cache. (The other
direction, an implicit device-to-host read such as float(loss) per step, is not seen by
the guard on the CPU backend, whose arrays already live in host memory.)
"""
import jax
import numpy as np
import pytest

from medtransfer_jax.training import loop, presets, step as step_lib


@pytest.mark.parametrize("cache,freeze", [("none", "none"), ("device", "two_phase")])
def test_a_phase_has_no_implicit_transfers_and_compiles_its_step_once(
        cache, freeze, tmp_path, monkeypatch):
    c = presets.tiny_config([f"data.cache={cache}", f"train.freeze={freeze}",
                             "train.head_phase.num_steps=6", "train.head_phase.patience=0",
                             "train.num_steps=12", "eval.every_steps=4", "log.every_steps=3",
                             "checkpoint.every_steps=5"])
    c.sharding.num_devices = 2
    steps = []

    def recording(*a, **k):
        steps.append(make(*a, **k))
        return steps[-1]

    make = step_lib.make_train_step
    monkeypatch.setattr(step_lib, "make_train_step", recording)
    run_phase = loop.run_phase

    def guarded(*a, **k):  # training, evaluation, logging and checkpoints of one phase
        with jax.transfer_guard("disallow"):
            return run_phase(*a, **k)

    monkeypatch.setattr(loop, "run_phase", guarded)
    res = loop.train_and_evaluate(c, str(tmp_path))
    assert res["status"] == "done"
    assert len(steps) == (2 if freeze == "two_phase" else 1)
    assert [s._cache_size() for s in steps] == [1] * len(steps)


def test_the_guard_would_catch_an_implicit_upload():
    """What the device cache did per step before: a NumPy scalar handed to a jitted
    function (``jnp.int32(step)``) is an implicit transfer, which the guard refuses."""
    add = jax.jit(lambda a, b: a + b)
    x = jax.device_put(np.int32(1))
    with jax.transfer_guard("disallow"):
        assert int(jax.device_get(add(x, x))) == 2
        with pytest.raises(Exception, match="Disallowed host-to-device"):
            add(x, np.int32(2))
