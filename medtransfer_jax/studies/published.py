"""The papers' published numbers (``published.json``, shipped in the package) beside ours.

What is in the file (provenance inside it): Revisiting's AUC mean ± sd per target and
source (imagenet, imagenet_frz, radimagenet, radimagenet_frz, random; 5 folds, from the
repo's ``results/AUC_mean.csv``: the Feb-2023 scripts' val-fold sklearn AUC) and mean
CCA per layer per pair, labelled as this package labels pairs (``imagenet (pre) vs imagenet (fine-tuned)``, ``imagenet vs
radimagenet (pre)``, ``random vs random (pre)``, ...); Source Matters' ImageNet o.o.d. AUC
per confounder and p with their ImageNet-vs-RadImageNet permutation test.

A comparison row says ours, theirs and the difference in units of the fold sd,
``(ours - theirs) / sqrt((sd_ours^2 + sd_theirs^2) / 2)``: |z| < ~1 is within what
another set of folds gives, |z| > ~3 deserves a look (protocol, preprocessing, data).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Dict, List, Sequence

from medtransfer_jax.studies import tables

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "published.json")


@functools.lru_cache(maxsize=1)
def load() -> Dict[str, Any]:
    return tables.read_json(PATH)


def fold_sd_units(ours: float, sd_ours: float, theirs: float, sd_theirs: float) -> float:
    """(ours - theirs) in units of the pooled fold sd; NaN if that sd is 0 or unknown."""
    sds = [s for s in (sd_ours, sd_theirs) if s is not None and math.isfinite(s)]
    pooled = math.sqrt(sum(s * s for s in sds) / len(sds)) if sds else float("nan")
    if not pooled or not math.isfinite(pooled):
        return float("nan")
    return (ours - theirs) / pooled


def _row(kind: str, key: str, ours, sd_ours, n_ours, theirs: Dict[str, Any]) -> Dict[str, Any]:
    return dict(quantity=kind, key=key, ours=ours, ours_sd=sd_ours, ours_n=n_ours,
                theirs=theirs["mean"], theirs_sd=theirs["sd"], theirs_n=theirs["n"],
                diff=ours - theirs["mean"],
                diff_in_fold_sd=fold_sd_units(ours, sd_ours, theirs["mean"], theirs["sd"]))


def compare_revisiting(auc_summary: Sequence[Dict[str, Any]], auc_column: str,
                       cca_summary: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows for every (target, source) AUC and (target, pair, layer) mean CCA that both
    this study and the paper have. ``auc_column`` e.g. ``test.auc_keras``."""
    pub = load()["revisiting"]
    out = []
    for r in auc_summary:
        theirs = pub["auc"].get(r["target"], {}).get(r["source"])
        if theirs and r.get("confounder", "none") in ("none", "") and auc_column in r:
            out.append(_row(f"AUC ({auc_column})", f"{r['target']} / {r['source']}",
                            r[auc_column], r.get(f"{auc_column}_sd"),
                            r.get(f"{auc_column}_n"), theirs))
    for r in cca_summary:
        if r.get("method") != "paper_cca":
            continue
        theirs = pub["cca"].get(r["target"], {}).get(r["pair"], {}).get(r["layer"])
        if theirs:
            out.append(_row("mean CCA", f"{r['target']} / {r['pair']} / {r['layer']}",
                            r["value"], r.get("value_sd"), r.get("value_n"), theirs))
    return out


def compare_source_matters(robustness_summary: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows for ImageNet's o.o.d. AUC per (confounder, p) both have."""
    pub = load()["source_matters"]["confounders"]
    out = []
    for r in robustness_summary:
        if r.get("source") != "imagenet":
            continue
        theirs = pub.get(r["confounder"], {}).get(f"{float(r['p']):.1f}")
        if theirs:
            out.append(_row("o.o.d. AUC", f"{r['target']} / {r['confounder']} / p={r['p']:g}",
                            r["auc_ood"], r.get("auc_ood_sd"), r.get("auc_ood_n"),
                            theirs["imagenet_ood_auc"]))
    return out


def protocol_mismatch(study_kind: str, protocol: str) -> str:
    """Why a study's numbers are not comparable with the published ones ('' if they are):
    Revisiting's published tables were made by its Feb-2023 scripts, so a Sep-2023 study
    (another lr, batch, epochs, test split and AUC) has nothing like-for-like to compare."""
    want = load().get(study_kind, {}).get("study_protocol")
    if not want or not protocol or protocol == want:
        return ""
    return (f"the published {study_kind} numbers come from its {want} protocol ("
            f"{load()[study_kind]['protocol'].split(':')[0]}); this study runs protocol="
            f"{protocol}: run the study with protocol={want} to compare")


def compare(study_kind: str, auc_summary, auc_column, cca_summary, robustness_summary,
            protocol: str = "") -> List[Dict[str, Any]]:
    """The rows for a study that declares ``published=revisiting|source_matters`` and runs
    the protocol the published numbers came from (``protocol``; '' = not said); [] else."""
    if protocol_mismatch(study_kind, protocol):
        return []
    if study_kind == "revisiting":
        return compare_revisiting(auc_summary, auc_column, cca_summary)
    if study_kind == "source_matters":
        return compare_source_matters(robustness_summary)
    return []
