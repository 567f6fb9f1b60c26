"""Helpers shared by the dataset parsers."""
from __future__ import annotations

import os
from typing import Callable, Iterable

from medtransfer_jax.data.base import DataError


def require(cond: bool, message: str, instructions: str = "") -> None:
    if not cond:
        raise DataError(message + ("\n\nExpected layout:\n" + instructions if instructions else ""))


def find_root(root, is_root: Callable[[str], bool], subdirs: Iterable[str], name: str,
              instructions: str) -> str:
    """``root`` itself if it has the layout, else ``root/<subdir>`` (one level) that has it."""
    require(bool(root), f"{name}: data.root is not set; point it at the manual download.", instructions)
    root = os.path.expanduser(str(root))
    require(os.path.isdir(root), f"{name}: data.root folder not found: {root}", instructions)
    if is_root(root):
        return root
    for sub in subdirs:
        cand = os.path.join(root, sub)
        if os.path.isdir(cand) and is_root(cand):
            return cand
    raise DataError(f"{name}: {root} does not have the expected layout.\n\nExpected layout:\n"
                    + instructions)


def read_csv_rows(path: str, name: str, instructions: str = "", header: bool = True):
    import csv
    require(os.path.isfile(path), f"{name}: file not found: {path}", instructions)
    with open(path, newline="") as f:
        if header:
            return list(csv.DictReader(f))
        return [row for row in csv.reader(f) if row]
