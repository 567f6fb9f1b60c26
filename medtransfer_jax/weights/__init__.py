"""Model weights: converting source checkpoints and the project's weights format.

* :func:`load_keras_h5` / :func:`load_torchvision`: source files -> Flax variables
  (+ an ``info`` dict: depth, width, head, container layout).
* :func:`save_weights` / :func:`load_weights`: the orbax tree + ``metadata.json``
  every stage reads; :func:`load_model` (the one "weights dir -> model + variables on the
  device" path, a :class:`LoadedModel`); :func:`merge_into` starts a model from such weights.

``python -m medtransfer_jax.convert`` ties them together. The source readers import
h5py / torch lazily, so importing this package stays cheap.
"""
from medtransfer_jax.weights.checkpoint import (CheckpointError, LoadedModel, WeightsMetadata,
                                                load_metadata, load_model, load_weights,
                                                merge_into, save_weights)
from medtransfer_jax.weights.keras_h5 import load_keras_h5
from medtransfer_jax.weights.torchvision import load_torchvision

__all__ = ["CheckpointError", "LoadedModel", "WeightsMetadata", "load_metadata", "load_model",
           "load_weights", "merge_into", "save_weights", "load_keras_h5", "load_torchvision"]
