"""MRNet knee MRI (Bien et al. 2018): sagittal 2-D slices, 3 classes normal / ACL / meniscus.

Two accepted layouts:

* the official release (``MRNet-v1.0``): ``{train,valid}/sagittal/<case>.npy`` volumes
  (slices, 256, 256) and ``{train,valid}-{abnormal,acl,meniscus}.csv`` label files; the
  central ``data.knee_num_slices`` sagittal slices of every case are used (0 = all);
* the paper's pre-extracted PNGs: ``images/{acl,meniscus}/<case>_sagittal_<s>.000000.png``
  next to the same CSVs.

Label rule ``data.knee_label_rule``:
  'paper' (default, the Revisiting study): every case is used twice, once in an ACL
  view (ACL tear -> 'acl', else 'normal') and once in a meniscus view (tear -> 'meniscus',
  else 'normal'). (The paper read the *valid* meniscus labels from valid-abnormal.csv;
  here valid-meniscus.csv is used.)
  'exclusive': each case once: ACL tear -> 'acl', else meniscus tear -> 'meniscus', else
  'normal'.
Split unit: the case (patient); both views of a case stay together.

``data.knee_layout='png'`` (the Revisiting protocol) requires the PNG layout: the paper
trained on RadImageNet's hand-picked slices (580 cases, 5,222 slices), which cannot be
derived from the volumes (the .npy mode takes central slices of all 1,250 cases).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Tuple

from medtransfer_jax import paths
from medtransfer_jax.data.base import DataError
from medtransfer_jax.data.sources import Example, NpySliceLoader, list_images, npy_shape
from medtransfer_jax.data.builders._common import find_root, read_csv_rows, require

NAME = "knee"
CLASS_NAMES = ("normal", "acl", "meniscus")
CHANNELS = 1
HOMEPAGE = "https://stanfordmlgroup.github.io/competitions/mrnet/"
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request and download MRNet-v1.0 from https://stanfordmlgroup.github.io/competitions/mrnet/
and unzip it; data.root is the folder holding

    <root>/train/sagittal/0000.npy ... 1129.npy
    <root>/valid/sagittal/1130.npy ... 1249.npy
    <root>/train-abnormal.csv  train-acl.csv  train-meniscus.csv      (rows: '0000,0')
    <root>/valid-abnormal.csv  valid-acl.csv  valid-meniscus.csv

(the coronal/ and axial/ folders are not used). Alternatively the paper's extracted PNG
slices: <root>/images/acl/<case>_sagittal_<slice>.000000.png and
<root>/images/meniscus/<case>_sagittal_<slice>.000000.png next to the same CSVs.
"""
_PNG = re.compile(r"^(\d+)_sagittal_(\d+)(?:\.\d+)?\.png$")


def _labels(root: str, task: str) -> Dict[str, int]:
    out = {}
    for subset in ("train", "valid"):
        path = os.path.join(root, f"{subset}-{task}.csv")
        for row in read_csv_rows(path, NAME, MANUAL_DOWNLOAD_INSTRUCTIONS, header=False):
            out[row[0].strip().zfill(4)] = int(float(row[1]))
    return out


def _central(depth: int, n: int) -> List[int]:
    if n <= 0 or n >= depth:
        return list(range(depth))
    start = depth // 2 - n // 2
    return list(range(start, start + n))


def _views(rule: str, acl: int, men: int) -> List[Tuple[str, int]]:
    if rule == "paper":
        return [("acl", 1 if acl else 0), ("meniscus", 2 if men else 0)]
    if rule == "exclusive":
        return [("case", 1 if acl else (2 if men else 0))]
    raise DataError(f"{NAME}: unknown data.knee_label_rule {rule!r}; use 'paper' or 'exclusive'")


def examples(root: str, cfg=None, listing: Optional[paths.Listings] = None) -> List[Example]:
    ls = listing or paths.Listings()
    root = find_root(root, lambda d: ls.isfile(os.path.join(d, "train-acl.csv")),
                     ("MRNet-v1.0", "knee"), NAME, MANUAL_DOWNLOAD_INSTRUCTIONS, ls)
    rule = cfg.get("knee_label_rule", "paper") if cfg is not None else "paper"
    n_slices = int(cfg.get("knee_num_slices", 3)) if cfg is not None else 3
    layout = cfg.get("knee_layout", "any") if cfg is not None else "any"
    if layout not in ("any", "png"):
        raise DataError(f"{NAME}: data.knee_layout={layout!r}; choose 'png' or 'any'")
    has_png = ls.isdir(os.path.join(root, "images"))
    if layout == "png" and not has_png:
        raise DataError(
            f"{NAME}: data.knee_layout='png' but {os.path.join(root, 'images')} does not exist. "
            "The paper used RadImageNet's hand-picked MRNet slices (580 cases, 5,222 PNGs in "
            "images/acl and images/meniscus), which the .npy volumes cannot reproduce (they "
            "give central slices of all 1,250 cases); put that folder under data.root, or "
            "accept other data with --config.data.knee_layout=any.")
    acl, men = _labels(root, "acl"), _labels(root, "meniscus")
    out = []
    if has_png:
        # The paper's PNG layout: the folder says which view; the CSVs give the label.
        for view, cls in (("acl", 1), ("meniscus", 2)):
            table = acl if view == "acl" else men
            folder = os.path.join(root, "images", view)
            if not ls.isdir(folder):
                continue
            for p in list_images(folder, (".png",), recursive=False, listing=ls):
                m = _PNG.match(os.path.basename(p))
                require(m is not None, f"{NAME}: unexpected file name {p} (want <case>_sagittal_<s>.png)")
                case = m.group(1).zfill(4)
                require(case in table, f"{NAME}: case {case} of {p} is not in the {view} label CSVs")
                rel = paths.relpath(p, root)
                out.append(Example(p, cls if table[case] else 0, rel, case,
                                   {"view": view, "slice": int(m.group(2))}, relpath=rel))
        require(bool(out), f"{NAME}: no PNG slices under {os.path.join(root, 'images')}")
        return out
    for subset in ("train", "valid"):
        folder = os.path.join(root, subset, "sagittal")
        require(ls.isdir(folder), f"{NAME}: folder not found: {folder}", MANUAL_DOWNLOAD_INSTRUCTIONS)
        for f in ls.listing(folder)[1]:
            if not f.endswith(".npy"):
                continue
            case = os.path.splitext(f)[0].zfill(4)
            path = os.path.join(folder, f)
            if case not in acl or case not in men:
                raise DataError(f"{NAME}: case {case} ({path}) has no row in {subset}-acl.csv / "
                                f"{subset}-meniscus.csv")
            try:
                depth = npy_shape(path)[0]
            except (OSError, ValueError) as e:
                raise DataError(f"{NAME}: cannot read volume {path}: {e}") from None
            for view, label in _views(rule, acl[case], men[case]):
                for s in _central(depth, n_slices):
                    ex_id = f"{view}/{case}_sagittal_{s}"
                    out.append(Example(path, label, ex_id, case, {"view": view, "slice": s,
                                                                  "original_split": subset},
                                       loader=NpySliceLoader(s), relpath=os.path.join(subset, "sagittal", f)))
    require(bool(out), f"{NAME}: no volumes found under {root}", MANUAL_DOWNLOAD_INSTRUCTIONS)
    return out
