"""Embedded default: ResNet18 (width 16) on the synthetic lesion task at 64 px.

Finishes in a few minutes on 2 CPU cores and reaches a clearly-above-chance val AUC:
    python -m medtransfer_jax.train --workdir=/tmp/medtransfer_demo
"""
from medtransfer_jax.training import presets


def get_config(arg=None):
    del arg
    return presets.demo_config()
