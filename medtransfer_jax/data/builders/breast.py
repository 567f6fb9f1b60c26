"""BUSI breast ultrasound (Al-Dhabyani et al. 2020).

Label rule (Revisiting study): malignant vs rest -- 'normal' images count as benign.
Segmentation masks (``*_mask.png``, ``*_mask_1.png``) are skipped. No patient ids, so
the split unit is the image. 780 images (437 benign + 133 normal, 210 malignant).
"""
from __future__ import annotations

import os
from typing import List, Optional

from medtransfer_jax import paths
from medtransfer_jax.data.sources import Example, list_images
from medtransfer_jax.data.builders._common import find_root, require

NAME = "breast"
CLASS_NAMES = ("benign", "malignant")
CHANNELS = 1
HOMEPAGE = "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset"
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download 'Dataset_BUSI_with_GT' (Breast Ultrasound Images Dataset, Al-Dhabyani et al.,
Data in Brief 2020) from https://scholar.cu.edu.eg/?q=afahmy/pages/dataset or Kaggle
(`kaggle datasets download -d aryashah2k/breast-ultrasound-images-dataset`). data.root is
the folder holding the three class folders (or its parent):

    <root>/benign/benign (1).png, benign (1)_mask.png, ...
    <root>/malignant/malignant (1).png, ...
    <root>/normal/normal (1).png, ...

Files whose name contains '_mask' are segmentation masks and are ignored.
"""
FOLDERS = {"benign": 0, "malignant": 1, "normal": 0}


def examples(root: str, cfg=None, listing: Optional[paths.Listings] = None) -> List[Example]:
    ls = listing or paths.Listings()
    root = find_root(root, lambda d: all(ls.isdir(os.path.join(d, f)) for f in FOLDERS),
                     ("Dataset_BUSI_with_GT",), NAME, MANUAL_DOWNLOAD_INSTRUCTIONS, ls)
    out = []
    for folder, label in FOLDERS.items():
        pngs = list_images(os.path.join(root, folder), (".png",), recursive=False, listing=ls)
        files = [p for p in pngs if "_mask" not in os.path.basename(p)]
        require(bool(files), f"{NAME}: no images in {os.path.join(root, folder)}", MANUAL_DOWNLOAD_INSTRUCTIONS)
        for p in files:
            rel = paths.relpath(p, root)
            out.append(Example(p, label, rel, rel, {"finding": folder}, relpath=rel))
    return out
