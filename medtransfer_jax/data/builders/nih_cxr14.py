"""NIH ChestX-ray14 (Wang et al. 2017) with patient sex / age (Source Matters).

Label rule: a binary task between two findings of ``data.nih_labels`` = (negative,
positive), default ('No Finding', 'Atelectasis'): images whose 'Finding Labels' contain the
positive finding -> 'yes', images labelled exactly the negative finding -> 'no', all other
images dropped; only the views in ``data.nih_views`` (default PA). Metadata: ``sex``
('M'/'F'), ``age`` (years), ``age_bucket`` ('<60' / '>=60'). Split unit: Patient ID.

When the paper's fold CSVs pick the images and give their labels (``data.folds='paper'``
with ``data.fold_csv_labels='csv'``: Source Matters' artefact CSVs, whose YES/NO came from
an unpublished rule and include images with other findings), every row is kept: the CSVs
select, the rule above only labels the rows it covers (others 0 until the CSV relabels).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from medtransfer_jax import paths
from medtransfer_jax.data.base import DataError
from medtransfer_jax.data.sources import Example
from medtransfer_jax.data.builders._common import find_root, read_csv_rows, require

NAME = "nih_cxr14"
CLASS_NAMES = ("no", "yes")
CHANNELS = 1
HOMEPAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download NIH ChestX-ray14 from https://nihcc.app.box.com/v/ChestXray-NIHCC (the 12
images_*.tar.gz archives and Data_Entry_2017.csv; or Kaggle 'nih-chest-xrays/data').
Extract into data.root so that

    <root>/Data_Entry_2017.csv            (or Data_Entry_2017_v2020.csv)
    <root>/images/00000001_000.png ...    (or the Kaggle layout <root>/images_001/images/*.png)

The CSV columns used: 'Image Index', 'Finding Labels', 'Patient ID', 'Patient Age',
'Patient Gender', 'View Position'.
"""


def _index_images(root: str, listing: paths.Listings) -> Dict[str, str]:
    """File name -> path of every PNG under ``root`` (one listing per folder)."""
    found = {}
    for dirpath, dirnames, filenames in listing.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if f.endswith(".png"):
                found.setdefault(f, os.path.join(dirpath, f))
    return found


def _age(v: str) -> int:
    v = (v or "").strip().upper().rstrip("Y")   # older releases wrote '058Y'
    try:
        return int(float(v))
    except ValueError:
        return -1


def examples(root: str, cfg=None, listing: Optional[paths.Listings] = None) -> List[Example]:
    ls = listing or paths.Listings()
    root = find_root(root, lambda d: any(ls.isfile(os.path.join(d, c)) for c in CSV_NAMES),
                     ("ChestX-ray14", "NIH", "nih_cxr14"), NAME, MANUAL_DOWNLOAD_INSTRUCTIONS, ls)
    csv_path = next(os.path.join(root, c) for c in CSV_NAMES if ls.isfile(os.path.join(root, c)))
    negative, positive = tuple(cfg.get("nih_labels", ("No Finding", "Atelectasis"))) if cfg is not None \
        else ("No Finding", "Atelectasis")
    views = set(cfg.get("nih_views", ("PA",))) if cfg is not None else {"PA"}
    csv_decides = (cfg is not None and cfg.get("folds") == "paper"
                   and cfg.get("fold_csv_labels") == "csv")
    images = _index_images(root, ls)
    require(bool(images), f"{NAME}: no PNG images under {root}", MANUAL_DOWNLOAD_INSTRUCTIONS)
    out = []
    for line, row in enumerate(read_csv_rows(csv_path, NAME), start=2):
        try:
            name, findings = row["Image Index"].strip(), row["Finding Labels"].split("|")
            view, pid = row["View Position"].strip(), row["Patient ID"].strip()
            sex, age = row["Patient Gender"].strip().upper(), _age(row["Patient Age"])
        except KeyError as e:
            raise DataError(f"{csv_path} line {line}: missing column {e}") from None
        if views and view not in views and not csv_decides:
            continue
        findings = [f.strip() for f in findings]
        if positive in findings:
            label = 1
        elif findings == [negative] or csv_decides:
            label = 0
        else:
            continue
        # A row whose image is absent is kept with its expected path, so FileSource
        # reports it (or skips it with data.skip_corrupt=True).
        path = images.get(name, os.path.join(root, "images", name))
        meta = {"sex": sex, "age": age, "age_bucket": ">=60" if age >= 60 else "<60", "view": view}
        out.append(Example(path, label, name, pid.lstrip("0") or "0", meta,
                           relpath=paths.relpath(path, root)))
    require(bool(out), f"{NAME}: no {view_list(views)} rows with {positive!r} or {negative!r} in {csv_path}")
    return out


def view_list(views) -> str:
    return "/".join(sorted(views)) or "any-view"
