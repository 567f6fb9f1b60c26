"""Test-sized training config for subprocess tests (ResNet18 width 8, 32 px, batch 16).

``--config=tests/_train_tiny_config.py:two_phase`` selects the two-phase schedule;
``:best_early`` one whose best step (4) lies outside the latest checkpoints;
``:multihost`` a run over all devices without dropout and with SGD (so a 2-process run
can be compared with a 1-process run; their batches hold the same examples in
another order).

Finished runs keep their checkpoints here (``checkpoint.keep_when_done``): the tests
that use this config compare checkpoints after the run. The default, deleting them, is
tested in ``test_train_loop.py``.
"""
from medtransfer_jax.training import presets


def get_config(arg=None):
    c = presets.tiny_config()
    c.sharding.num_devices = 1
    c.train.num_steps = 12
    c.eval.every_steps = 4
    c.checkpoint.every_steps = 3
    c.checkpoint.keep_when_done = True
    if arg == "two_phase":
        c.train.freeze = "two_phase"
        c.train.head_phase.num_steps = 4
        c.train.num_steps = 8
    if arg == "best_early":
        # Only the first evaluation can improve (min_delta is huge): the best step (4) is
        # far from the latest saves (9, 12), so only an explicitly protected best survives.
        c.eval.monitor = "loss"
        c.eval.min_delta = 1e9
    if arg == "multihost":
        c.sharding.num_devices = 0
        c.model.dropout_rate = 0.0
        c.train.optimizer = "sgd"
        # Small lr: with batch-16 BatchNorm on 1x1 maps, rounding differences of the
        # two reduction orders grow ~1000x per step at lr 2e-3 (seen: 1e-7 -> 7% by step 6).
        c.train.lr = 0.0002
        c.train.num_steps = 6
        c.eval.every_steps = 3
    return c
