"""ISIC 2018 task 3 (HAM10000) training set: 7 diagnostic classes, 10,015 images.

Label rule: the one-hot ground-truth CSV (MEL, NV, BCC, AKIEC, BKL, DF, VASC). The paper
split by image; if ``ISIC2018_Task3_Training_LesionGroupings.csv`` is present its
``lesion_id`` is used as the group (several images of one lesion stay together) --
remove the file (or set data.group_split=False) to split by image as the paper did.
"""
from __future__ import annotations

import os
from typing import List, Optional

from medtransfer_jax import paths
from medtransfer_jax.data.base import DataError
from medtransfer_jax.data.sources import Example
from medtransfer_jax.data.builders._common import find_root, read_csv_rows, require

NAME = "isic"
CLASS_NAMES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
CHANNELS = 3
HOMEPAGE = "https://challenge.isic-archive.com/data/#2018"
IMAGES = "ISIC2018_Task3_Training_Input"
GT = os.path.join("ISIC2018_Task3_Training_GroundTruth", "ISIC2018_Task3_Training_GroundTruth.csv")
GROUPINGS = "ISIC2018_Task3_Training_LesionGroupings.csv"
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the ISIC 2018 Task 3 training input and ground truth from
https://challenge.isic-archive.com/data/#2018 and unzip both into data.root:

    <root>/ISIC2018_Task3_Training_Input/ISIC_0024306.jpg ...
    <root>/ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv
    <root>/ISIC2018_Task3_Training_LesionGroupings.csv     (optional: lesion ids)

The ground-truth CSV has columns image,MEL,NV,BCC,AKIEC,BKL,DF,VASC (one-hot).
"""


def examples(root: str, cfg=None, listing: Optional[paths.Listings] = None) -> List[Example]:
    ls = listing or paths.Listings()
    root = find_root(root, lambda d: ls.isdir(os.path.join(d, IMAGES)), ("ISIC2018",), NAME,
                     MANUAL_DOWNLOAD_INSTRUCTIONS, ls)
    gt_path = os.path.join(root, GT)
    if not ls.isfile(gt_path) and ls.isfile(os.path.join(root, os.path.basename(GT))):
        gt_path = os.path.join(root, os.path.basename(GT))
    rows = read_csv_rows(gt_path, NAME, MANUAL_DOWNLOAD_INSTRUCTIONS)
    lesion = {}
    gpath = os.path.join(root, GROUPINGS)
    if ls.isfile(gpath):
        lesion = {r["image"]: r["lesion_id"] for r in read_csv_rows(gpath, NAME)}
    out = []
    for line, row in enumerate(rows, start=2):
        try:
            onehot = [float(row[c]) for c in CLASS_NAMES]
        except (KeyError, ValueError) as e:
            raise DataError(f"{gt_path} line {line}: expected one-hot columns {CLASS_NAMES}: {e}") from None
        if sum(v > 0.5 for v in onehot) != 1:
            raise DataError(f"{gt_path} line {line}: row is not one-hot: {onehot}")
        label = int(max(range(len(onehot)), key=lambda k: onehot[k]))
        image = row["image"].strip()
        rel = os.path.join(IMAGES, image + ".jpg")
        out.append(Example(os.path.join(root, rel), label, image, lesion.get(image, image),
                           relpath=rel))
    require(bool(out), f"{NAME}: {gt_path} has no rows")
    return out
