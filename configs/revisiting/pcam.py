"""Revisiting Transfer (Juodelyte et al.), target 'pcam':
PatchCamelyon 'pcam-small' (10,000 patches), tumour yes / no.

    python -m medtransfer_jax.train --workdir=runs/pcam \\
      --config=configs/revisiting/pcam.py:SOURCE[,fold=K,seed=S,freeze=true,protocol=feb2023]

SOURCE: imagenet | radimagenet | random; the options and the protocol shared by the seven
targets (read from DovileDo/revisiting-transfer) are in
``medtransfer_jax/training/revisiting_protocol.py``. This file holds what is pcam's own.
"""
from medtransfer_jax.training import revisiting_protocol as protocol

TARGET = protocol.Target(
    name="pcam",
    # the paper's 10,000-patch subset (random_state 22); split unit = patch
    # both protocols (AUC.py, base_AUC.py)
    image_size_sep2023=96, image_size_feb2023=96,
    hflip=True,
    cca_image_size=96,  # CCA.py's stimulus size
    split_by_image=True,
    fold_csvs="pcam-small",
)


def get_config(arg=None):
    c = protocol.config(TARGET, arg, where=__file__)
    if c.data.folds != "paper":
        # The paper's PNG export of PCam overwrote files across the h5 splits, so its
        # 10,000-patch subset cannot be rebuilt from the raw files: only its CSVs name it.
        raise ValueError("pcam: only folds=paper reproduces the paper's pcam-small subset "
                         "(its PNG export overwrote files across splits); for another "
                         "subset use --config.data.folds=kfold explicitly")
    return c
