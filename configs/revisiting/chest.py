"""Revisiting study, target 'chest': `--config=configs/revisiting/chest.py:SOURCE[,fold=K,freeze=true,protocol=feb2023]`.

SOURCE is imagenet | radimagenet | random; fold is 0-based. See
medtransfer_jax.training.presets.revisiting_config for the protocol.
"""
from medtransfer_jax.training import presets


def get_config(arg=None):
    return presets.revisiting_config("chest", arg)
