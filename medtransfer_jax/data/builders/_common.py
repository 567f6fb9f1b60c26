"""Helpers shared by the dataset parsers.

A parser's folder questions ("is there a ``train/`` here?", "is ``train-acl.csv``
there?") go through one :class:`medtransfer_jax.paths.Listings` per parse, so a dataset
in a bucket costs one listing per folder instead of one request per question, and the
same code reads local folders and ``gs://`` prefixes.
"""
from __future__ import annotations

import csv
import os
from typing import Callable, Iterable, Optional

from medtransfer_jax import paths
from medtransfer_jax.data.base import DataError


def require(cond: bool, message: str, instructions: str = "") -> None:
    if not cond:
        sep = "" if message.endswith(".") else "."   # one sentence each when joined on a line
        raise DataError(message + (sep + "\n\nExpected layout:\n" + instructions
                                   if instructions else ""))


def find_root(root, is_root: Callable[[str], bool], subdirs: Iterable[str], name: str,
              instructions: str, listing: Optional[paths.Listings] = None) -> str:
    """``root`` itself if it has the layout, else ``root/<subdir>`` (one level) that has it.

    ``root`` may be a local folder or a ``gs://`` prefix; ``listing`` (the parser's
    cache, used by ``is_root`` too) answers the folder checks.
    """
    require(bool(root), f"{name}: data.root is not set; point it at the manual download.", instructions)
    root = paths.expand(str(root)).rstrip("/") or "/"
    paths.require_remote_support(root, "data.root")
    listing = listing or paths.Listings()
    require(listing.isdir(root), f"{name}: data.root folder not found: {root}", instructions)
    if is_root(root):
        return root
    for sub in subdirs:
        cand = os.path.join(root, sub)   # string join: fine for URLs
        if listing.isdir(cand) and is_root(cand):
            return cand
    raise DataError(f"{name}: {root} does not have the expected layout.\n\nExpected layout:\n"
                    + instructions)


def read_csv_rows(path: str, name: str, instructions: str = "", header: bool = True):
    require(paths.isfile(path), f"{name}: file not found: {path}", instructions)
    with paths.open_text(path) as f:
        if header:
            return list(csv.DictReader(f))
        return [row for row in csv.reader(f) if row]
