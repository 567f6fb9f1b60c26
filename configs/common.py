"""Shared defaults of every run (medtransfer_jax.configs.base.base_config).

Usable as a config itself: ``--config=configs/common.py --config.data.name=...``.
"""
from medtransfer_jax.configs import base


def get_config(arg=None):
    if arg:  # a misspelled argument must not silently give the defaults
        raise ValueError(f"common.py takes no argument, got {arg!r}; override fields with "
                         "--config.FIELD=VALUE instead")
    return base.base_config()
