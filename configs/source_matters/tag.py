"""Source Matters, confounder 'tag': `--config=configs/source_matters/tag.py:SOURCE,p=0.5[,fold=K,dataset=...]`.

See medtransfer_jax.training.presets.source_matters_config for the protocol.
"""
from medtransfer_jax.training import presets


def get_config(arg=None):
    return presets.source_matters_config("tag", arg)
