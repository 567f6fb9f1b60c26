"""CBIS-DDSM mammograms, calcification + mass cases, official train + test pooled.

Label rule (Revisiting study): ``pathology`` BENIGN and BENIGN_WITHOUT_CALLBACK -> benign,
MALIGNANT -> malignant. One example per row of the four case-description CSVs (an image
with several abnormalities appears once per abnormality, as in the paper: 3,568 rows);
``id`` = image folder name + abnormality id; split unit: ``patient_id``.
"""
from __future__ import annotations

import os
from typing import List, Optional

from medtransfer_jax import paths
from medtransfer_jax.data.base import DataError
from medtransfer_jax.data.sources import Example
from medtransfer_jax.data.builders._common import find_root, read_csv_rows, require

NAME = "mammograms"
CLASS_NAMES = ("benign", "malignant")
CHANNELS = 1
HOMEPAGE = "https://www.cancerimagingarchive.net/collection/cbis-ddsm/"
CSV_FILES = ("calc_case_description_train_set.csv", "calc_case_description_test_set.csv",
             "mass_case_description_train_set.csv", "mass_case_description_test_set.csv")
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download CBIS-DDSM from The Cancer Imaging Archive
(https://www.cancerimagingarchive.net/collection/cbis-ddsm/): the four case-description
CSVs and the full-mammogram DICOMs (NBIA Data Retriever). Convert each full mammogram
DICOM to an 8- or 16-bit PNG named after the first component of the CSV's
'image file path' (e.g. 'Calc-Training_P_00005_RIGHT_CC'), as the paper did, so that:

    <root>/calc_case_description_train_set.csv
    <root>/calc_case_description_test_set.csv
    <root>/mass_case_description_train_set.csv
    <root>/mass_case_description_test_set.csv
    <root>/images/Calc-Training_P_00005_RIGHT_CC.png
    <root>/images/Mass-Test_P_00016_LEFT_CC.png ...

(e.g. with pydicom: `Image.fromarray(pydicom.dcmread(f).pixel_array).save(png)`; 16-bit
PNGs are min-max scaled to 8 bit when read.)
"""
PATHOLOGY = {"BENIGN": 0, "BENIGN_WITHOUT_CALLBACK": 0, "MALIGNANT": 1}


def _col(row, *names):
    for n in names:
        if n in row and row[n] is not None:
            return row[n].strip()
    raise DataError(f"{NAME}: none of the columns {names} in CSV row with columns {list(row)}")


def examples(root: str, cfg=None, listing: Optional[paths.Listings] = None) -> List[Example]:
    ls = listing or paths.Listings()
    root = find_root(root, lambda d: ls.isfile(os.path.join(d, CSV_FILES[0])),
                     ("CBIS-DDSM", "mammograms"), NAME, MANUAL_DOWNLOAD_INSTRUCTIONS, ls)
    out = []
    for csv_name in CSV_FILES:
        path = os.path.join(root, csv_name)
        for line, row in enumerate(read_csv_rows(path, NAME, MANUAL_DOWNLOAD_INSTRUCTIONS), start=2):
            pathology = _col(row, "pathology").upper()
            if pathology not in PATHOLOGY:
                raise DataError(f"{path} line {line}: unknown pathology {pathology!r}")
            image_key = _col(row, "image file path").replace("\\", "/").split("/")[0]
            rel = os.path.join("images", image_key + ".png")
            abn = _col(row, "abnormality id")
            meta = {"abnormality": _col(row, "abnormality type"), "pathology": pathology,
                    "view": _col(row, "image view"), "density": _col(row, "breast_density", "breast density")}
            out.append(Example(os.path.join(root, rel), PATHOLOGY[pathology], f"{image_key}#{abn}",
                               _col(row, "patient_id"), meta, relpath=rel))
    require(bool(out), f"{NAME}: the case-description CSVs in {root} have no rows")
    return out
