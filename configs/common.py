"""Shared defaults of every run (medtransfer_jax.configs.base.base_config).

Usable as a config itself: ``--config=configs/common.py --config.data.name=...``.
"""
from medtransfer_jax.configs import base


def get_config(arg=None):
    del arg
    return base.base_config()
