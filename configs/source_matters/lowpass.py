"""Source Matters (Juodelyte et al.), confounder 'lowpass':
an ideal FFT low-pass filter on a fraction p of the positives.

    python -m medtransfer_jax.train --workdir=runs/lowpass \\
      --config=configs/source_matters/lowpass.py:SOURCE,p=0.5[,fold=K,seed=S]

SOURCE: imagenet | radimagenet | random; ``p``: the fraction of positive training images
filtered. The other options and the protocol shared by the four confounders are in
``medtransfer_jax/training/source_matters_protocol.py``; this file holds what is lowpass's
own, read from DovileDo/source-matters ``include_lowpass.py``.
"""
from medtransfer_jax.training import source_matters_protocol as protocol


def get_config(arg=None):
    c = protocol.config("lowpass", arg, where=__file__)
    # Ideal circular mask of diameter 500 px on the 1024-px originals, clip to [0, 255].
    c.data.confounder.lowpass_diameter = 500 / 1024
    return c
