"""Revisiting Transfer (Juodelyte et al.), target 'knee':
MRNet sagittal slices, normal / ACL / meniscus.

    python -m medtransfer_jax.train --workdir=runs/knee \\
      --config=configs/revisiting/knee.py:SOURCE[,fold=K,seed=S,freeze=true,protocol=feb2023]

SOURCE: imagenet | radimagenet | random; the options and the protocol shared by the seven
targets (read from DovileDo/revisiting-transfer) are in
``medtransfer_jax/training/revisiting_protocol.py``. This file holds what is knee's own.
"""
from medtransfer_jax.training import revisiting_protocol as protocol

TARGET = protocol.Target(
    name="knee",
    # RadImageNet's MRNet slices (580 cases, 5,222 PNGs); split unit = patient
    # both protocols (AUC.py, base_AUC.py)
    image_size_sep2023=112, image_size_feb2023=112,
    hflip=True,
    cca_image_size=112,  # CCA.py's stimulus size
)


def get_config(arg=None):
    c = protocol.config(TARGET, arg, where=__file__)
    # The paper's slices are RadImageNet's hand-picked PNGs (images/acl, images/meniscus);
    # the .npy volumes give other slices of other cases, so they are refused.
    c.data.knee_layout = "png"
    c.data.knee_label_rule = "paper"    # each case once per view (ACL view, meniscus view)
    return c
