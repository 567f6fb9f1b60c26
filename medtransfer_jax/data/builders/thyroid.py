"""DDTI thyroid ultrasound (Pedraza et al. 2015, Universidad Nacional de Colombia).

Label rule (Revisiting study): each case's XML gives a TI-RADS category ('2', '3', '4a',
'4b', '4c', '5'); TI-RADS >= 4 -> malignant, lower or missing -> benign. Images are
``<case>_<k>.jpg``; the case number is the patient (split unit). Images whose case has no
XML are dropped (as the paper's inner join did), counted in the log. 480 images.
"""
from __future__ import annotations

import logging
import os
import re
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

from medtransfer_jax import paths
from medtransfer_jax.data.base import DataError
from medtransfer_jax.data.sources import Example, list_images
from medtransfer_jax.data.builders._common import find_root, require

log = logging.getLogger(__name__)

NAME = "thyroid"
CLASS_NAMES = ("benign", "malignant")
CHANNELS = 1
HOMEPAGE = "http://cimalab.unal.edu.co/?lang=en&mod=program&id=5"
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the DDTI 'Digital Database of Thyroid Ultrasound Images' (Pedraza et al., SPIE
2015) from http://cimalab.unal.edu.co/?lang=en&mod=program&id=5 (also mirrored on Kaggle
as 'ddti-thyroid-ultrasound-images'). Put all files in one folder, data.root:

    <root>/1.xml   <root>/1_1.jpg   <root>/2.xml   <root>/2_1.jpg   <root>/2_2.jpg ...

Each <case>.xml has <number>case</number> and <tirads>4a</tirads> (maybe empty), plus
<age> and <sex>, which are kept as metadata.
"""


def parse_case_xml(path: str) -> Dict[str, Optional[str]]:
    """{'number', 'tirads', 'age', 'sex'} from one DDTI case XML (missing tags -> None)."""
    try:
        with paths.open(path, "rb") as f:
            tree = ET.parse(f)
    except (ET.ParseError, OSError) as e:
        raise DataError(f"{NAME}: cannot parse {path}: {e}") from None
    node = tree.getroot()

    def text(tag):
        el = node.find(f".//{tag}")
        return el.text.strip() if el is not None and el.text and el.text.strip() else None

    number = text("number") or os.path.splitext(os.path.basename(path))[0]
    return {"number": str(int(float(number))), "tirads": text("tirads"), "age": text("age"),
            "sex": text("sex")}


def tirads_label(tirads: Optional[str]) -> int:
    """1 (malignant) for TI-RADS >= 4 ('4a', '4b', '4c', '5'), else 0; missing -> 0."""
    if not tirads:
        return 0
    m = re.match(r"\s*(\d+)", tirads)
    return int(m is not None and int(m.group(1)) >= 4)


def examples(root: str, cfg=None, listing: Optional[paths.Listings] = None) -> List[Example]:
    ls = listing or paths.Listings()
    root = find_root(root, lambda d: any(f.endswith(".xml") for f in ls.names(d)),
                     ("DDTI", "thyroid"), NAME, MANUAL_DOWNLOAD_INSTRUCTIONS, ls)
    cases = {}
    for f in ls.names(root):
        if f.endswith(".xml") and not f.startswith("."):
            info = parse_case_xml(os.path.join(root, f))
            cases[info["number"]] = info
    images = list_images(root, (".jpg", ".jpeg", ".png"), recursive=False, listing=ls)
    require(bool(images), f"{NAME}: no <case>_<k>.jpg images in {root}", MANUAL_DOWNLOAD_INSTRUCTIONS)
    out, orphans = [], []
    for p in images:
        case = os.path.basename(p).split("_")[0].split(".")[0]
        info = cases.get(case)
        if info is None:
            orphans.append(p)
            continue
        rel = paths.relpath(p, root)
        meta = {"tirads": info["tirads"] or "", "sex": info["sex"] or "", "age": info["age"] or ""}
        out.append(Example(p, tirads_label(info["tirads"]), rel, case, meta, relpath=rel))
    if orphans:
        log.warning("%s: %d images have no <case>.xml and were dropped (first: %s)", NAME,
                    len(orphans), orphans[0])
    return out
