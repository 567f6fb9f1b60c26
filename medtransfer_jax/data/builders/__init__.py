"""Dataset parsers: one module per dataset of the two studies.

Each module turns the dataset's manual-download folder into a list of
:class:`~medtransfer_jax.data.sources.Example` with the study's label rule, and carries

* ``NAME`` (the ``data.name`` key), ``CLASS_NAMES``, ``CHANNELS`` (1 grey / 3 colour),
* ``MANUAL_DOWNLOAD_INSTRUCTIONS``: where to download and the exact folder layout,
* ``examples(root, cfg, listing=None) -> list[Example]`` (``listing``: a
  ``paths.Listings`` the parser lists folders through, shared with the FileSource's
  existence check so a bucket folder is listed once).

``load_source(cfg)`` reads a dataset straight from its raw folder (no TensorFlow needed);
``tfds_builder`` wraps the same parsers as TFDS builders that prepare ArrayRecord files.
"""
from __future__ import annotations

import logging

from medtransfer_jax import paths
from medtransfer_jax.data.base import Source
from medtransfer_jax.data.builders import tfds_builder
from medtransfer_jax.data.builders.parsers import BUILDERS, get_builder, instructions
from medtransfer_jax.data.sources import CsvSource, FileSource, ImageFolderSource

__all__ = ["BUILDERS", "get_builder", "instructions", "load_source"]

log = logging.getLogger(__name__)


def load_source(cfg) -> Source:
    """The whole dataset ``cfg.name`` from ``cfg.root`` (or a prepared TFDS dir) as a Source."""
    name = cfg.name
    skip = bool(cfg.get("skip_corrupt", False))
    class_names = cfg.get("class_names")
    if name == "image_folder":
        return ImageFolderSource(cfg.root, class_names=class_names, skip_corrupt=skip)
    if name == "csv":
        return CsvSource(cfg.csv_path, root=cfg.get("root"), class_names=class_names, skip_corrupt=skip)
    module = get_builder(name)
    if cfg.get("tfds_data_dir"):
        return tfds_builder.TfdsSource(name, cfg.tfds_data_dir)
    listing = paths.Listings()
    examples = module.examples(cfg.root, cfg, listing)
    source = FileSource(examples, module.CLASS_NAMES, name=f"{name} ({cfg.root})", skip_corrupt=skip,
                        listing=listing)
    log.info("%s: %s", name, source)
    return source
