"""Shared defaults of every run (medtransfer_jax.training.presets.base_config).

Usable as a config itself: ``--config=configs/common.py --config.data.name=...``.
"""
from medtransfer_jax.training import presets


def get_config(arg=None):
    del arg
    return presets.base_config()
