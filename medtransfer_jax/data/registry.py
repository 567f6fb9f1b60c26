"""``get_splits(cfg, fold)``: from a data config to the train/val/test sources of one fold.

Steps: build the full source for ``cfg.name`` (synthetic, an image folder, a CSV, or one of
the studies' datasets parsed from its manual-download folder), split it (the paper's
fold CSVs if ``cfg.fold_csv_dir`` is set, else stratified patient-grouped k-fold), then
apply the Source Matters confounder if ``cfg.confounder.kind != 'none'``.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from medtransfer_jax.data import splits as splits_lib
from medtransfer_jax.data import synthetic
from medtransfer_jax.data.base import DataError, DatasetSplits, Source, SubsetSource
from medtransfer_jax.data.config import DATASET_NAMES

log = logging.getLogger(__name__)


def build_source(cfg) -> Source:
    """The whole dataset named by ``cfg.name`` as one random-access source."""
    name = cfg.name
    if name == "synthetic":
        return synthetic.from_config(cfg.synthetic)
    if name not in DATASET_NAMES:
        raise DataError(f"Unknown dataset name {name!r} (config field data.name); choose one of "
                        f"{DATASET_NAMES}")
    from medtransfer_jax.data import builders  # local: only the file-based datasets need it
    return builders.load_source(cfg)


def _subsample(source: Source, max_examples: Optional[int], seed: int) -> Source:
    if not max_examples or len(source) <= max_examples:
        return source
    # A seeded random subset (for debugging / quick runs); splitting then groups as usual.
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(source), size=int(max_examples), replace=False))
    log.info("data.max_examples=%d: using a random subset of the %d examples", max_examples, len(source))
    return SubsetSource(source, keep)


def get_splits(cfg, fold: Optional[int] = None) -> DatasetSplits:
    """Train/val/test sources of fold ``fold`` (0-based; default ``cfg.fold``).

    Returns a DatasetSplits; with a confounder, ``extra_tests`` holds the 'iid', 'clean'
    and 'ood' test sets (see confounders.py).
    """
    fold = cfg.get("fold", 0) if fold is None else fold
    source = build_source(cfg)
    source = _subsample(source, cfg.get("max_examples"), cfg.split_seed)
    if len(source) == 0:
        raise DataError(f"dataset {cfg.name!r} at {cfg.get('root')!r} has no examples")
    kind = cfg.confounder.kind if "confounder" in cfg else "none"

    if kind == "sampled":
        from medtransfer_jax.data import confounders
        return confounders.sampled_splits(source, cfg, fold)

    if cfg.get("fold_csv_dir"):
        relpaths = getattr(source, "relpaths", None)
        if relpaths is None:
            raise DataError(f"data.fold_csv_dir is set but dataset {cfg.name!r} has no file paths "
                            "to match the CSV rows against")
        idx = splits_lib.read_fold_csvs(cfg.fold_csv_dir, fold, relpaths, source.class_names,
                                        source.labels, strict=not cfg.get("skip_corrupt", False))
        train, val, test = idx["train"], idx["val"], idx["test"]
    else:
        groups = source.groups if cfg.get("group_split", True) else None
        train, val, test = splits_lib.train_val_test_indices(
            source.labels, groups, fold, cfg.num_folds, cfg.split_seed,
            cfg.get("heldout_val_fraction", 0.25))
    result = DatasetSplits(
        train=SubsetSource(source, train), val=SubsetSource(source, val),
        test=SubsetSource(source, test), num_classes=source.num_classes,
        class_names=tuple(source.class_names), name=cfg.name,
        info={"fold": int(fold), "num_examples": len(source)})
    if kind not in ("none", None, ""):
        from medtransfer_jax.data import confounders
        result = confounders.apply_artifact(result, cfg.confounder)
    return result
