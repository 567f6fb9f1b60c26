"""Revisiting Transfer (Juodelyte et al.), target 'mammograms':
CBIS-DDSM calc + mass, benign vs malignant.

    python -m medtransfer_jax.train --workdir=runs/mammograms \\
      --config=configs/revisiting/mammograms.py:SOURCE[,fold=K,seed=S,freeze=true,protocol=feb2023]

SOURCE: imagenet | radimagenet | random; the options and the protocol shared by the seven
targets (read from DovileDo/revisiting-transfer) are in
``medtransfer_jax/training/revisiting_protocol.py``. This file holds what is mammograms's own.
"""
from medtransfer_jax.training import revisiting_protocol as protocol

TARGET = protocol.Target(
    name="mammograms",
    # CBIS-DDSM train + test (3,568), BENIGN_WITHOUT_CALLBACK -> benign;
    # split unit = patient
    # Sep-2023: AUC.py evaluates at 224; Feb-2023: base_AUC.py at 112.
    image_size_sep2023=224, image_size_feb2023=112,
    hflip=True,
    cca_image_size=224,  # CCA.py's stimulus size
)


def get_config(arg=None):
    return protocol.config(TARGET, arg, where=__file__)
