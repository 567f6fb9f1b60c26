"""The parser module of each dataset, by ``data.name`` (shared by load_source and the TFDS
builders, so neither imports the other's package for it)."""
from __future__ import annotations

from medtransfer_jax.data.base import DataError
from medtransfer_jax.data.builders import (breast, chest, isic, knee, lidc, mammograms, nih_cxr14,
                                           pcam, thyroid)

BUILDERS = {m.NAME: m for m in (chest, breast, thyroid, mammograms, knee, isic, pcam, nih_cxr14, lidc)}


def get_builder(name: str):
    """The parser module of dataset ``name``."""
    if name not in BUILDERS:
        raise DataError(f"No dataset parser named {name!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[name]


def instructions(name: str) -> str:
    """The manual-download instructions of dataset ``name``."""
    return get_builder(name).MANUAL_DOWNLOAD_INSTRUCTIONS
