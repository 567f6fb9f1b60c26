"""Pediatric pneumonia chest X-ray (Kermany et al.; Kaggle 'chest-xray-pneumonia').

Label rule (Revisiting study): the original train/val/test folders are pooled; class =
folder name (NORMAL / PNEUMONIA). Patient id parsed from the file name as in the
paper's ``import_chest``: ``IM-0761-0001.jpeg`` and ``NORMAL2-IM-0761-0001.jpeg`` -> ``0761``,
``person1_bacteria_1.jpeg`` -> ``person1``. Split unit: patient. 5,856 images.
"""
from __future__ import annotations

import os
from typing import List, Optional

from medtransfer_jax import paths
from medtransfer_jax.data.sources import Example, list_images
from medtransfer_jax.data.builders._common import find_root, require

NAME = "chest"
CLASS_NAMES = ("normal", "pneumonia")
CHANNELS = 1
HOMEPAGE = "https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia"
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download 'Chest X-Ray Images (Pneumonia)' from Kaggle
(https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia, or
`kaggle datasets download -d paultimothymooney/chest-xray-pneumonia`), also published as
Mendeley Data doi:10.17632/rscbjbr9sj.2. Unzip so that data.root is the folder holding

    <root>/train/NORMAL/*.jpeg        <root>/train/PNEUMONIA/*.jpeg
    <root>/val/NORMAL/*.jpeg          <root>/val/PNEUMONIA/*.jpeg
    <root>/test/NORMAL/*.jpeg         <root>/test/PNEUMONIA/*.jpeg

(the zip's top folder `chest_xray/` may be data.root or its parent; the duplicate
`chest_xray/chest_xray/` and `__MACOSX/` copies in some versions are ignored).
"""
SUBSETS = ("train", "val", "test")


def patient_id(filename: str) -> str:
    """The paper's rule: strip the NORMAL2-/IM- prefixes, '_' -> '-', first '-' field."""
    name = filename.lstrip("IMNORMAL2").lstrip("-IM").replace("_", "-")
    return name.split("-")[0]


def examples(root: str, cfg=None, listing: Optional[paths.Listings] = None) -> List[Example]:
    ls = listing or paths.Listings()
    root = find_root(root, lambda d: all(ls.isdir(os.path.join(d, s)) for s in ("train", "test")),
                     ("chest_xray",), NAME, MANUAL_DOWNLOAD_INSTRUCTIONS, ls)
    out = []
    for subset in SUBSETS:
        for label, folder in enumerate(("NORMAL", "PNEUMONIA")):
            d = os.path.join(root, subset, folder)
            if not ls.isdir(d):
                if subset == "val":
                    continue
                require(False, f"{NAME}: folder not found: {d}", MANUAL_DOWNLOAD_INSTRUCTIONS)
            for p in list_images(d, (".jpeg", ".jpg", ".png"), recursive=False, listing=ls):
                rel = paths.relpath(p, root)
                out.append(Example(p, label, rel, patient_id(os.path.basename(p)),
                                   {"original_split": subset}, relpath=rel))
    return out
