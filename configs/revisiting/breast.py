"""Revisiting Transfer (Juodelyte et al.), target 'breast':
BUSI breast ultrasound, malignant vs rest (normal counts as benign).

    python -m medtransfer_jax.train --workdir=runs/breast \\
      --config=configs/revisiting/breast.py:SOURCE[,fold=K,seed=S,freeze=true,protocol=feb2023]

SOURCE: imagenet | radimagenet | random; the options and the protocol shared by the seven
targets (read from DovileDo/revisiting-transfer) are in
``medtransfer_jax/training/revisiting_protocol.py``. This file holds what is breast's own.
"""
from medtransfer_jax.training import revisiting_protocol as protocol

TARGET = protocol.Target(
    name="breast",
    # BUSI (780 images); split unit = image
    # Sep-2023: AUC.py evaluates at 256; Feb-2023: base_AUC.py at 224.
    image_size_sep2023=256, image_size_feb2023=224,
    hflip=True,
    cca_image_size=224,  # CCA.py's stimulus size
    split_by_image=True,
)


def get_config(arg=None):
    return protocol.config(TARGET, arg, where=__file__)
