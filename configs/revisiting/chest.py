"""Revisiting Transfer (Juodelyte et al.), target 'chest':
Kermany paediatric chest X-ray, NORMAL vs PNEUMONIA.

    python -m medtransfer_jax.train --workdir=runs/chest \\
      --config=configs/revisiting/chest.py:SOURCE[,fold=K,seed=S,freeze=true,protocol=feb2023]

SOURCE: imagenet | radimagenet | random; the options and the protocol shared by the seven
targets (read from DovileDo/revisiting-transfer) are in
``medtransfer_jax/training/revisiting_protocol.py``. This file holds what is chest's own.
"""
from medtransfer_jax.training import revisiting_protocol as protocol

TARGET = protocol.Target(
    name="chest",
    # Kermany's train/val/test pooled (5,856); split unit = patient
    # both protocols (AUC.py, base_AUC.py)
    image_size_sep2023=112, image_size_feb2023=112,
    hflip=False,  # chest: no horizontal flip
    cca_image_size=112,  # CCA.py's stimulus size
)


def get_config(arg=None):
    return protocol.config(TARGET, arg, where=__file__)
