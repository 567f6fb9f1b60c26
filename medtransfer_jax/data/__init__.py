"""Data: datasets, splits, grain pipelines, synthetic tasks and confounders.

    from medtransfer_jax import data
    cfg = data.default_data_config()
    splits = data.get_splits(cfg, fold=0)
    it = data.make_train_iter(splits.train, image_size=64, preprocessing='unit',
                              global_batch_size=32, seed=0, augment=cfg.augment)
"""
import contextlib
from typing import Optional

from medtransfer_jax.data import decode_memo, decode_store, integrity
from medtransfer_jax.data.base import (ArraySource, DataError, DatasetSplits, Source, SubsetSource,
                                       TransformedSource)
from medtransfer_jax.data.config import DATASET_NAMES, default_data_config
from medtransfer_jax.data.pipeline import (make_eval_dataset, make_eval_iter, make_train_dataset,
                                           make_train_iter, num_eval_batches)
from medtransfer_jax.data.registry import build_source, get_splits
from medtransfer_jax.data.synthetic import SyntheticSource

__all__ = [
    "ArraySource", "as_new_process", "DATASET_NAMES", "DataError", "DatasetSplits", "Source",
    "SubsetSource", "SyntheticSource", "TransformedSource", "build_source", "default_data_config",
    "get_splits",
    "make_eval_dataset", "make_eval_iter", "make_train_dataset", "make_train_iter",
    "num_eval_batches",
]


@contextlib.contextmanager
def as_new_process(store_root: Optional[str] = None):
    """Inside the block, the package's process-level file state is a fresh process's: an
    empty decode memo, no file known readable, and (``store_root`` given; '' = off) a
    decode store over that folder. ``bench decode`` times a run's start this way; the
    tests isolate themselves with it. The previous state comes back after."""
    saved = decode_memo.MEMO, decode_store.STORE, integrity._CHECKED_GOOD
    decode_memo.MEMO, integrity._CHECKED_GOOD = decode_memo.DecodeMemo(), set()
    if store_root is not None:
        decode_store.STORE = decode_store.DecodeStore(store_root)
    try:
        yield
    finally:
        decode_memo.MEMO, decode_store.STORE, integrity._CHECKED_GOOD = saved
