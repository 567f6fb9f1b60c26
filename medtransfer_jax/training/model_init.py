"""The model a run starts from: random init or a converted weights directory."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
from absl import logging

from medtransfer_jax import preprocessing as prep_lib
from medtransfer_jax.models import resnet
from medtransfer_jax.weights import checkpoint as weights_lib


def build_model_and_variables(config, num_classes: int, rng) -> Tuple[Any, Dict, str, str, Any]:
    """Returns (model, variables, preprocessing mode, init description, ModelSpec).

    ``config.model.init``: 'random' or a weights directory (weights/checkpoint.py);
    the architecture and the input normalisation then come from its metadata (a
    non-None ``config.model.preprocessing`` overrides the latter, e.g. the Revisiting
    study fed RadImageNet plain caffe inputs). The new head is freshly initialised.
    """
    m = config.model
    image_size = config.data.image_size
    init = m.init or "random"
    common = dict(num_classes=num_classes, dropout_rate=m.dropout_rate,
                  dtype=jnp.dtype(m.dtype), bn_momentum=m.bn_momentum)
    head = "sigmoid" if m.get("head") == "sigmoid_binary" and num_classes == 2 else "softmax"
    if init == "random":
        spec = resnet.ModelSpec(depth=m.depth, layout=m.layout, num_classes=num_classes,
                                width=m.width, head=head)
        model = spec.build(**common)
        variables = resnet.init_variables(model, rng, image_size)
        return model, jax.device_get(variables), m.preprocessing or "unit", "random", spec
    init = os.path.expanduser(init)
    try:
        source = weights_lib.load_model(init, to_device=False)   # NumPy trunk, merged below
    except weights_lib.CheckpointError as e:
        raise weights_lib.CheckpointError(f"--config.model.init={m.init}: {e}") from None
    meta = source.metadata
    for key in ("depth", "layout", "width"):
        if m[key] is not None and m[key] != getattr(meta, key):
            logging.warning("config.model.%s=%r differs from %s/metadata.json (%r); the "
                            "checkpoint's architecture is used.", key, m[key], init,
                            getattr(meta, key))
    spec = dataclasses.replace(meta.model_spec(), num_classes=num_classes, head=head)
    model = spec.build(**common)
    fresh = jax.device_get(resnet.init_variables(model, rng, image_size))
    variables = weights_lib.merge_into(fresh, source.variables, skip_head=True,
                                       source_name=init)
    mode = m.preprocessing or meta.preprocessing
    pair = (m.preprocessing, meta.preprocessing)
    if all(pair) and pair[0] != pair[1] and pair not in _WARNED:
        # Deliberate in the papers' protocols (caffe inputs for RadImageNet too), a silent
        # mismatch otherwise (e.g. torchvision weights fed a Keras protocol's inputs); said
        # once per process, not once per run of a study.
        _WARNED.add(pair)
        logging.warning("config.model.preprocessing=%r overrides %s/metadata.json (%r): the "
                        "inputs are normalised unlike the weights' pre-training; set "
                        "--config.model.preprocessing=%s to match it.", m.preprocessing, init,
                        meta.preprocessing, meta.preprocessing)
    if mode not in prep_lib.MODES:
        raise ValueError(f"config.model.preprocessing={mode!r} is not one of {prep_lib.MODES}")
    return model, variables, mode, init, spec


_WARNED: set = set()
