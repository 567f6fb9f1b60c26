"""Embedded default: ResNet18 (width 16) on the synthetic lesion task at 64 px.

Finishes in a few minutes on 2 CPU cores and reaches a clearly-above-chance val AUC:
    python -m medtransfer_jax.train --workdir=/tmp/medtransfer_demo
"""
from medtransfer_jax.configs import base


def get_config(arg=None):
    if arg:  # a misspelled argument must not silently give the default
        raise ValueError(f"demo.py takes no argument, got {arg!r}; override fields with "
                         "--config.FIELD=VALUE instead")
    return base.demo_config()
