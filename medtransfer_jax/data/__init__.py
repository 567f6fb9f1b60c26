"""Data: datasets, splits, grain pipelines, synthetic tasks and confounders.

    from medtransfer_jax import data
    cfg = data.default_data_config()
    splits = data.get_splits(cfg, fold=0)
    it = data.make_train_iter(splits.train, image_size=64, preprocessing='unit',
                              global_batch_size=32, seed=0, augment=cfg.augment)
"""
from medtransfer_jax.data.base import (ArraySource, DataError, DatasetSplits, Source, SubsetSource,
                                       TransformedSource)
from medtransfer_jax.data.config import DATASET_NAMES, default_data_config
from medtransfer_jax.data.pipeline import (make_eval_dataset, make_eval_iter, make_train_dataset,
                                           make_train_iter, num_eval_batches)
from medtransfer_jax.data.registry import build_source, get_splits
from medtransfer_jax.data.synthetic import SyntheticSource

__all__ = [
    "ArraySource", "DATASET_NAMES", "DataError", "DatasetSplits", "Source", "SubsetSource",
    "SyntheticSource", "TransformedSource", "build_source", "default_data_config", "get_splits",
    "make_eval_dataset", "make_eval_iter", "make_train_dataset", "make_train_iter",
    "num_eval_batches",
]
