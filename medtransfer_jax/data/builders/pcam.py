"""PatchCamelyon (Veeling et al. 2018): 96x96 H&E patches, tumour yes / no.

The Revisiting study's 'pcam-small' samples 10,000 patches with ``random_state=22``.
Here the official HDF5 files are read with h5py (no TensorFlow); the train, valid and
test splits are pooled in that order and ``data.pcam_num_examples`` patches drawn with
``np.random.RandomState(data.pcam_sample_seed)`` (0 = all 327,680). The paper sampled
from a folder listing of exported PNGs, so the exact subset cannot be reproduced; the
paper's PNG layout (``<index>_label=<y>.png``) is also accepted so its fold CSVs match.
Split unit: the patch (no patient ids).

With the paper's fold CSVs (``data.folds='paper'``) the CSVs pick the 10,000 patches, so
nothing is sampled, and the HDF5 files are read as the paper's ``pcam_converter.py``
exported them: train, then valid, then test, each patch written to
``<index>_label=<y>.png`` in one folder, a later split overwriting a name an earlier one
wrote. Each example is that name's last writer, so the CSV rows match the HDF5 download.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import List, Optional

import numpy as np

from medtransfer_jax import paths
from medtransfer_jax.data.base import DataError
from medtransfer_jax.data.sources import Example, list_images
from medtransfer_jax.data.builders._common import find_root, require

NAME = "pcam"
CLASS_NAMES = ("no", "yes")
CHANNELS = 3
HOMEPAGE = "https://github.com/basveeling/pcam"
SPLITS = ("train", "valid", "test")
MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the PatchCamelyon HDF5 files from https://github.com/basveeling/pcam (Zenodo
record 2546921) and gunzip them into data.root:

    <root>/camelyonpatch_level_2_split_train_x.h5   <root>/camelyonpatch_level_2_split_train_y.h5
    <root>/camelyonpatch_level_2_split_valid_x.h5   <root>/camelyonpatch_level_2_split_valid_y.h5
    <root>/camelyonpatch_level_2_split_test_x.h5    <root>/camelyonpatch_level_2_split_test_y.h5

(x: uint8 (N, 96, 96, 3) under key 'x'; y: (N, 1, 1, 1) under key 'y'). Or the paper's
exported PNGs: <root>/<index>_label=<0|1>.png.
"""
_PNG = re.compile(r"_label=([01])\.png$")


def _h5(root: str, split: str, xy: str) -> str:
    return os.path.join(root, f"camelyonpatch_level_2_split_{split}_{xy}.h5")


_HANDLES = {}


@dataclasses.dataclass(frozen=True)
class H5PatchLoader:
    """Picklable loader of patch ``index`` from an HDF5 ``x`` file (handle cached per process;
    a file in a bucket is opened as a seekable stream, so only the patch's chunks are read).
    Frozen, so the decode memo can key a patch by (file, loader)."""

    index: int

    def __call__(self, path: str) -> np.ndarray:
        key = (os.getpid(), path)
        f = _HANDLES.get(key)
        if f is None:
            try:
                f = _HANDLES[key] = _h5_open(path)
            except OSError as e:
                raise DataError(f"{NAME}: cannot open {path}: {e}") from None
        return np.asarray(f["x"][self.index], np.uint8)


def _h5_open(path: str):
    """``h5py.File`` on a local path, or on a file object for a ``gs://`` object."""
    import h5py
    return h5py.File(paths.open(path, "rb") if paths.is_remote(path) else path, "r")


def examples(root: str, cfg=None, listing: Optional[paths.Listings] = None) -> List[Example]:
    ls = listing or paths.Listings()

    def is_root(d):
        return ls.isfile(_h5(d, "train", "y")) or any(_PNG.search(f) for f in ls.names(d)[:1000])

    root = find_root(root, is_root, ("pcam", "PCam", "png_images"), NAME, MANUAL_DOWNLOAD_INSTRUCTIONS, ls)
    n_keep = int(cfg.get("pcam_num_examples", 10000)) if cfg is not None else 10000
    seed = int(cfg.get("pcam_sample_seed", 22)) if cfg is not None else 22
    paper_names = cfg is not None and cfg.get("folds") == "paper"   # the CSVs choose
    out, exported = [], {}
    if ls.isfile(_h5(root, "train", "y")):
        for split in SPLITS:
            ypath, xpath = _h5(root, split, "y"), _h5(root, split, "x")
            if not ls.isfile(ypath):
                require(split != "train", f"{NAME}: missing {ypath}", MANUAL_DOWNLOAD_INSTRUCTIONS)
                continue
            require(ls.isfile(xpath), f"{NAME}: missing {xpath} (next to {ypath})",
                    MANUAL_DOWNLOAD_INSTRUCTIONS)
            try:
                with _h5_open(ypath) as f:
                    y = np.asarray(f["y"]).reshape(-1).astype(np.int64)
                with _h5_open(xpath) as f:
                    nx = f["x"].shape[0]
            except (OSError, KeyError) as e:
                raise DataError(f"{NAME}: cannot read {ypath} / {xpath}: {e}") from None
            require(nx == len(y), f"{NAME}: {xpath} has {nx} patches but {ypath} {len(y)} labels")
            rel = os.path.basename(xpath)
            for i, label in enumerate(y):
                if paper_names:   # the export's file name; a later split overwrites it
                    name = f"{i}_label={int(label)}.png"
                    exported[name] = Example(xpath, int(label), name, name,
                                             {"original_split": split},
                                             loader=H5PatchLoader(i), relpath=name)
                else:
                    out.append(Example(xpath, int(label), f"{split}/{i}", f"{split}/{i}",
                                       {"original_split": split}, loader=H5PatchLoader(i),
                                       relpath=f"{rel}/{i}"))
        out += list(exported.values())
    else:
        for p in list_images(root, (".png",), recursive=False, listing=ls):
            m = _PNG.search(os.path.basename(p))
            if m:
                rel = os.path.basename(p)
                out.append(Example(p, int(m.group(1)), rel, rel, relpath=rel))
    require(bool(out), f"{NAME}: no patches found in {root}", MANUAL_DOWNLOAD_INSTRUCTIONS)
    if 0 < n_keep < len(out) and not paper_names:
        keep = np.sort(np.random.RandomState(seed).choice(len(out), n_keep, replace=False))
        out = [out[i] for i in keep]
    return out
