"""Revisiting Transfer (Juodelyte et al.), target 'isic':
ISIC 2018 task 3 training set, 7 classes.

    python -m medtransfer_jax.train --workdir=runs/isic \\
      --config=configs/revisiting/isic.py:SOURCE[,fold=K,seed=S,freeze=true,protocol=feb2023]

SOURCE: imagenet | radimagenet | random; the options and the protocol shared by the seven
targets (read from DovileDo/revisiting-transfer) are in
``medtransfer_jax/training/revisiting_protocol.py``. This file holds what is isic's own.
"""
from medtransfer_jax.training import revisiting_protocol as protocol

TARGET = protocol.Target(
    name="isic",
    # ISIC 2018 task 3 (10,015); the paper split by image
    # both protocols (AUC.py, base_AUC.py)
    image_size_sep2023=112, image_size_feb2023=112,
    hflip=True,
    cca_image_size=112,  # CCA.py's stimulus size
    split_by_image=True,  # folds=kfold: by image like the paper, not by lesion
)


def get_config(arg=None):
    return protocol.config(TARGET, arg, where=__file__)
