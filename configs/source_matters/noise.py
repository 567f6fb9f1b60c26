"""Source Matters (Juodelyte et al.), confounder 'noise':
CT-like Poisson noise, stronger on a fraction p of the positives.

    python -m medtransfer_jax.train --workdir=runs/noise \\
      --config=configs/source_matters/noise.py:SOURCE,p=0.5[,fold=K,seed=S]

SOURCE: imagenet | radimagenet | random; ``p``: the fraction of positive training images
with the stronger noise. The other options and the protocol shared by the four confounders
are in ``medtransfer_jax/training/source_matters_protocol.py``; this file holds what is
noise's own, read from DovileDo/source-matters ``include_noise.py``.
"""
from medtransfer_jax.training import source_matters_protocol as protocol


def get_config(arg=None):
    c = protocol.config("noise", arg, where=__file__)
    # Every image resized to 512 px and noised at 2e7 photons, the confounded ones at
    # 1.5e7; the clean test and the p = 0 baseline are the original images.
    c.data.confounder.noise_photons_clean = 2e7
    c.data.confounder.noise_photons_confounded = 1.5e7
    c.data.confounder.noise_all = True
    c.data.confounder.noise_resize = 512
    c.data.confounder.clean_test_originals = True
    c.data.confounder.p0_originals = True
    return c
