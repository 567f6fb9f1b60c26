"""Source Matters (Juodelyte et al.), confounder 'tag':
a white 'R' on a fraction p of the positive training images.

    python -m medtransfer_jax.train --workdir=runs/tag \\
      --config=configs/source_matters/tag.py:SOURCE,p=0.5[,fold=K,seed=S]

SOURCE: imagenet | radimagenet | random; ``p``: the fraction of positive training images
with the tag. The other options and the protocol shared by the four confounders are in
``medtransfer_jax/training/source_matters_protocol.py``; this file holds what is tag's
own, read from DovileDo/source-matters ``include_tag.py``.
"""
from medtransfer_jax.training import source_matters_protocol as protocol


def get_config(arg=None):
    c = protocol.config("tag", arg, where=__file__)
    # A white 'R' (DejaVu Sans), font size 64 with its corner at (200, 200) on the
    # 1024-px originals, as fractions of the image side.
    c.data.confounder.tag_text = "R"
    c.data.confounder.tag_size = 64 / 1024
    c.data.confounder.tag_x = c.data.confounder.tag_y = 200 / 1024
    c.data.confounder.tag_value = 255
    # include_tag.py: FontProperties(family='sans-serif', weight='light') -> findfont (the
    # file is this machine's; the run's log names it)
    c.data.confounder.tag_font = "light"
    return c
