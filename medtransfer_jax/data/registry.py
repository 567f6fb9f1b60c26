"""``get_splits(cfg, fold)``: from a data config to the train/val/test sources of one fold.

Steps: build the full source for ``cfg.name`` (synthetic, an image folder, a CSV, or one of
the studies' datasets parsed from its manual-download folder), split it (the paper's
fold CSVs when ``cfg.folds == 'paper'``, else stratified patient-grouped k-fold), then
apply the Source Matters confounder if ``cfg.confounder.kind != 'none'``.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import numpy as np

from medtransfer_jax import paths
from medtransfer_jax.data import builders, confounders
from medtransfer_jax.data import splits as splits_lib
from medtransfer_jax.data import synthetic
from medtransfer_jax.data.base import DataError, DatasetSplits, RelabeledSource, Source, SubsetSource
from medtransfer_jax.data.config import DATASET_NAMES

log = logging.getLogger(__name__)


def _check_bucket_paths(cfg) -> None:
    """Data paths may be ``gs://`` (read through medtransfer_jax.paths); say up front when
    this machine lacks the library that reads buckets, and refuse the one path that
    cannot be a bucket: ArrayRecord files (``tfds_data_dir``) are read by array_record's
    C++ reader, which opens local files only (google/array_record#120)."""
    for field in ("root", "csv_path", "fold_csv_dir", "fold_csv_test"):
        value = cfg.get(field)
        if isinstance(value, str):
            paths.require_remote_support(value, f"data.{field}")
    value = cfg.get("tfds_data_dir")
    if isinstance(value, str) and paths.is_remote(value):
        raise DataError(
            f"data.tfds_data_dir={value}: prepared ArrayRecord files are read with local file "
            "APIs only (array_record cannot open gs://). Copy the prepared folder to the "
            "worker's disk, or point data.root at the raw download in the bucket instead "
            "(data.root=gs://... works).")


def build_source(cfg) -> Source:
    """The whole dataset named by ``cfg.name`` as one random-access source."""
    _check_bucket_paths(cfg)
    name = cfg.name
    if name == "synthetic":
        return synthetic.from_config(cfg.synthetic)
    if name not in DATASET_NAMES:
        raise DataError(f"Unknown dataset name {name!r} (config field data.name); choose one of "
                        f"{DATASET_NAMES}")
    return builders.load_source(cfg)


def _subsample(source: Source, max_examples: Optional[int], seed: int) -> Source:
    if not max_examples or len(source) <= max_examples:
        return source
    # A seeded random subset (for debugging / quick runs); splitting then groups as usual.
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(source), size=int(max_examples), replace=False))
    log.info("data.max_examples=%d: using a random subset of the %d examples", max_examples, len(source))
    return SubsetSource(source, keep)


def paper_fold_dir(cfg) -> Optional[str]:
    """The fold-CSV folder to split by, or None for the project's k-fold (``data.folds``).

    ``folds='paper'`` (the paper protocols' default) needs ``data.fold_csv_dir`` to exist;
    otherwise a DataError names the folder and where the CSVs come from
    (``data.fold_csv_origin``), so a reproduction never silently falls back to other splits.
    """
    mode = cfg.get("folds", "kfold")
    if mode == "kfold":
        return None
    _check_bucket_paths(cfg)
    if mode != "paper":
        raise DataError(f"data.folds={mode!r}; choose 'paper' (the paper's fold CSVs) or 'kfold'")
    d = cfg.get("fold_csv_dir")
    if not d or not paths.isdir(paths.expand(d)):
        origin = cfg.get("fold_csv_origin") or "the paper repository's data/<task>/ folder"
        raise DataError(
            f"data.folds='paper' splits by the paper's fold CSVs, but data.fold_csv_dir={d!r} "
            f"is not a folder. Get them from {origin} (or pass --config.data.fold_csv_dir="
            "<folder>), or run the project's own split with --config.data.folds=kfold.")
    return paths.expand(d)


def _class_lookup(cfg, source: Source) -> Dict[str, int]:
    """Lower-case CSV class value -> label: the dataset's class names, plus for NIH CXR14 the
    two findings of ``data.nih_labels`` (the sex experiment's CSVs name them)."""
    lookup = {str(c).lower(): i for i, c in enumerate(source.class_names)}
    if cfg.name == "nih_cxr14":
        negative, positive = tuple(cfg.get("nih_labels", ("No Finding", "Atelectasis")))
        lookup.update({str(negative).lower(): 0, str(positive).lower(): 1})
    return lookup


def _csv_split(cfg, source: Source, fold: int, csv_dir: str):
    """(source, train, val, test) from the fold CSVs; the source is relabeled from the CSV
    when ``data.fold_csv_labels='csv'``."""
    relpaths = getattr(source, "relpaths", None)
    if relpaths is None:
        raise DataError(f"data.folds='paper' but dataset {cfg.name!r} has no file paths to match "
                        "the CSV rows against")
    mode = cfg.get("fold_csv_labels", "check")
    if mode not in ("check", "csv"):
        raise DataError(f"data.fold_csv_labels={mode!r}; choose 'check' or 'csv'")
    idx = splits_lib.read_fold_csvs(
        csv_dir, fold, relpaths, source.class_names, source.labels,
        strict=not cfg.get("skip_corrupt", False), test_csv=cfg.get("fold_csv_test"),
        class_lookup=_class_lookup(cfg, source) if mode == "csv" else None)
    if mode == "csv":
        labels = np.where(idx["labels"] >= 0, idx["labels"], source.labels)
        source = RelabeledSource(source, labels)
    return source, idx["train"], idx["val"], idx["test"]


def get_splits(cfg, fold: Optional[int] = None) -> DatasetSplits:
    """Train/val/test sources of fold ``fold`` (0-based; default ``cfg.fold``).

    Returns a DatasetSplits; with a confounder, ``extra_tests`` holds the 'iid', 'clean'
    and 'ood' test sets (see confounders.py). With the paper's sex-experiment CSVs the
    fixed test is the reversed one, ``extra_tests = {'ood': test}``.
    """
    fold = cfg.get("fold", 0) if fold is None else fold
    csv_dir = paper_fold_dir(cfg)   # first: a missing CSV folder is the likelier mistake
    source = build_source(cfg)
    source = _subsample(source, cfg.get("max_examples"), cfg.split_seed)
    if len(source) == 0:
        raise DataError(f"dataset {cfg.name!r} at {cfg.get('root')!r} has no examples")
    kind = cfg.confounder.kind if "confounder" in cfg else "none"

    if kind == "sampled" and csv_dir is None:
        return confounders.sampled_splits(source, cfg, fold)
    if csv_dir is not None:
        source, train, val, test = _csv_split(cfg, source, fold, csv_dir)
    else:
        groups = source.groups if cfg.get("group_split", True) else None
        train, val, test = splits_lib.train_val_test_indices(
            source.labels, groups, fold, cfg.num_folds, cfg.split_seed,
            cfg.get("heldout_val_fraction", 0.25))
    extra = {"ood": SubsetSource(source, test)} if kind == "sampled" else {}
    result = DatasetSplits(
        train=SubsetSource(source, train), val=SubsetSource(source, val),
        test=SubsetSource(source, test), num_classes=source.num_classes,
        class_names=tuple(source.class_names), name=cfg.name, extra_tests=extra,
        info={"fold": int(fold), "num_examples": len(source),
              "folds": "paper" if csv_dir else "kfold"})
    if kind not in ("none", "sampled", None, ""):
        result = confounders.apply_artifact(result, cfg.confounder)
    return result
