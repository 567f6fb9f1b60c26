"""LIDC-IDRI lung CT, as pre-extracted 2-D slices (Source Matters target).

Parsing the DICOM series and the readers' XML annotations needs pylidc, which this
package does not depend on; extract the slices once (see the instructions) and this
parser reads the resulting CSV + PNG folder. Split unit: patient.

No LIDC code of the Source Matters paper was published, so the pipeline is a choice:
``data.lidc_label_rule='label'`` takes the CSV's label column as extracted;
``'median_malignancy'`` derives it from the readers' median rating in the ``malignancy``
column (<= 2 benign, >= 4 malignant, 3 dropped), the usual LIDC benchmark rule.
"""
from __future__ import annotations

import os
from typing import List, Optional

from medtransfer_jax import paths
from medtransfer_jax.data.base import DataError
from medtransfer_jax.data.sources import Example
from medtransfer_jax.data.builders._common import find_root, read_csv_rows, require

NAME = "lidc"
CLASS_NAMES = ("benign", "malignant")
CHANNELS = 1
HOMEPAGE = "https://www.cancerimagingarchive.net/collection/lidc-idri/"
CSV_NAME = "lidc_slices.csv"
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download LIDC-IDRI (CT series + XML annotations) from The Cancer Imaging Archive
(https://www.cancerimagingarchive.net/collection/lidc-idri/). Extract one axial slice per
annotated nodule with pylidc (`pip install pylidc`): for each scan, cluster the readers'
annotations (`scan.cluster_annotations()`), take the median malignancy rating of each
nodule (1-5; drop 3 = indeterminate), the slice through the nodule centroid, window it to
[-1200, 800] HU and save it as an 8-bit PNG. Then write the CSV, so that data.root holds:

    <root>/lidc_slices.csv      columns: path,label,patient_id[,malignancy,...]
    <root>/images/LIDC-IDRI-0001_nodule1.png ...

`label` is 'benign' (median rating 1-2) or 'malignant' (4-5), or 0/1; `path` is relative
to <root>. Extra columns become metadata.
"""


def _label(row, rule: str, where: str):
    """0 / 1 / None (dropped) by ``data.lidc_label_rule``."""
    if rule == "median_malignancy":
        try:
            rating = float(row.get("malignancy", ""))
        except ValueError:
            raise DataError(f"{where}: data.lidc_label_rule='median_malignancy' needs a numeric "
                            f"'malignancy' column, got {row.get('malignancy')!r}") from None
        return 0 if rating <= 2 else (1 if rating >= 4 else None)
    if rule != "label":
        raise DataError(f"data.lidc_label_rule={rule!r}; choose 'label' or 'median_malignancy'")
    lab = row["label"].strip().lower()
    lookup = {c: i for i, c in enumerate(CLASS_NAMES)}
    if lab in lookup:
        return lookup[lab]
    if lab in ("0", "1"):
        return int(lab)
    raise DataError(f"{where}: label {row['label']!r} is not benign/malignant/0/1")


def examples(root: str, cfg=None, listing: Optional[paths.Listings] = None) -> List[Example]:
    ls = listing or paths.Listings()
    root = find_root(root, lambda d: ls.isfile(os.path.join(d, CSV_NAME)), ("LIDC-IDRI", "lidc"),
                     NAME, MANUAL_DOWNLOAD_INSTRUCTIONS, ls)
    path = os.path.join(root, CSV_NAME)
    rows = read_csv_rows(path, NAME, MANUAL_DOWNLOAD_INSTRUCTIONS)
    out = []
    rule = cfg.get("lidc_label_rule", "label") if cfg is not None else "label"
    for line, row in enumerate(rows, start=2):
        for col in ("path", "label", "patient_id"):
            if not row.get(col):
                raise DataError(f"{path} line {line}: missing {col!r} (columns: path,label,patient_id)")
        label = _label(row, rule, f"{path} line {line}")
        if label is None:   # median rating 3: indeterminate
            continue
        rel = row["path"].strip()
        meta = {k: v for k, v in row.items() if k not in ("path", "label", "patient_id") and k}
        out.append(Example(os.path.join(root, rel), label, rel, row["patient_id"].strip(), meta, relpath=rel))
    require(bool(out), f"{NAME}: {path} has no rows", MANUAL_DOWNLOAD_INSTRUCTIONS)
    return out
