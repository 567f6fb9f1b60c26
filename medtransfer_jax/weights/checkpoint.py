"""Model-weights checkpoints: an orbax tree plus a small JSON of metadata.

One format for every set of weights the project hands between stages: converted
source checkpoints (ImageNet / RadImageNet), and weights exported from fine-tuning
runs. So any stage (training, evaluation, CCA, filter analysis) loads weights the same
way (:func:`load_model`, the one loader) and knows how to rebuild the model and
normalise its inputs.

A weights directory may be local or a ``gs://`` URL (see :mod:`medtransfer_jax.paths`);
orbax writes the tree to the bucket directly. Layout::

    DIR/metadata.json     # WeightsMetadata as JSON
    DIR/variables/        # orbax StandardCheckpointer tree {'params', 'batch_stats'}
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import jax
import numpy as np

from medtransfer_jax import paths, preprocessing, sharding
from medtransfer_jax.errors import UserError
from medtransfer_jax.models import resnet

METADATA_FILE = "metadata.json"
VARIABLES_DIR = "variables"


class CheckpointError(UserError):
    """A weights file or directory cannot be used; the message says why and how to fix it."""


@dataclasses.dataclass
class WeightsMetadata:
    """Where weights came from and how to use them.

    Attributes:
      source: a short name, e.g. ``imagenet``, ``radimagenet``, ``finetuned``.
      layout: ``keras_v1`` or ``torchvision_v15`` (see models/resnet.py).
      depth, width, num_classes: rebuild the model (num_classes None = no head).
      preprocessing: one of preprocessing.MODES; the pipeline normalises with it.
      image_size: the resolution the weights were trained at (informational).
      converted_from: the original file, if converted.
      format: ``keras_h5``, ``torchvision`` or ``flax``.
      extra: anything else (fine-tuning run, config, metrics).
    """

    source: str
    layout: str
    depth: int = 50
    width: int = 64
    num_classes: Optional[int] = None
    preprocessing: str = "caffe"
    image_size: int = 224
    converted_from: Optional[str] = None
    format: str = "flax"
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)
    head: str = "softmax"     # resnet.HEADS: 'sigmoid' = one logit (a Keras binary head)

    def __post_init__(self):
        if self.layout not in resnet.LAYOUTS:
            raise CheckpointError(f"metadata layout={self.layout!r} is not one of {resnet.LAYOUTS}")
        if self.preprocessing not in preprocessing.MODES:
            raise CheckpointError(
                f"metadata preprocessing={self.preprocessing!r} is not one of {preprocessing.MODES}")

    def model_spec(self) -> resnet.ModelSpec:
        return resnet.ModelSpec(depth=self.depth, layout=self.layout,
                                num_classes=self.num_classes, width=self.width,
                                head=self.head)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, default=str)


def save_weights(directory: paths.PathLike, variables: Mapping[str, Any],
                 metadata: WeightsMetadata, *, overwrite: bool = True) -> str:
    """Writes ``variables`` ({'params', 'batch_stats'}) and metadata under ``directory``.

    Returns the directory as a string: absolute if local, the URL as given if remote.
    ``metadata.json`` is written last (atomically), so a directory with metadata has a
    complete tree unless it was damaged later.
    """
    import orbax.checkpoint as ocp

    directory = paths.makedirs(paths.workdir(directory))
    tree = {k: jax.tree.map(np.asarray, dict(variables[k]))
            for k in ("params", "batch_stats") if k in variables}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / VARIABLES_DIR, tree, force=overwrite)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:  # orbax's save is collective; the metadata has one writer
        paths.write_text_atomic(directory / METADATA_FILE, metadata.to_json())
    return paths.to_str(directory)


def load_metadata(directory: paths.PathLike) -> WeightsMetadata:
    """Reads ``directory/metadata.json``; CheckpointError says what is missing and the fix."""
    shown = paths.to_str(directory)
    path = paths.join(directory, METADATA_FILE)
    if not paths.isdir(directory):
        raise CheckpointError(
            f"Weights directory {shown!r} does not exist. Create one with "
            "`python -m medtransfer_jax.convert --format=keras_h5 --input=FILE "
            "--output_dir=DIR`.")
    if not paths.exists(path):
        # A training run (or a study's pre-trained source) holds its weights further down.
        inside = [paths.to_str(paths.join(directory, *sub)) for sub in (
            ("export", "best"), ("run", "export", "best"))
            if paths.exists(paths.join(directory, *sub, METADATA_FILE))]
        hint = (f"; its exported weights are in {inside[0]!r}: pass that" if inside else
                " (made by medtransfer_jax.convert or exported by training)")
        raise CheckpointError(
            f"{shown!r} has no {METADATA_FILE}; it is not a medtransfer_jax weights "
            f"directory{hint}.")
    try:
        raw = json.loads(paths.read_text(path))
        return WeightsMetadata(**raw)
    except CheckpointError:   # a bad layout/preprocessing value, named by __post_init__
        raise
    except (ValueError, TypeError, OSError) as e:   # not JSON, not UTF-8, missing fields
        raise CheckpointError(f"Cannot read {path}: {type(e).__name__}: {e}. "
                              f"{rewrite_hint(directory)}.") from e


def rewrite_hint(directory: paths.PathLike) -> str:
    """How to write a damaged weights directory again, by what it is. Told by where it
    lies, since its metadata.json (which says where it came from) may be what is damaged:
    a training run's ``RUN/export/{best,last}`` is rewritten by training the run again
    (a done run does nothing until its results.json is gone), a study's
    ``STUDY/sources/NAME/weights`` by the study's sources stage, anything else by
    converting (or copying) it again."""
    d = paths.workdir(directory)
    shown = paths.to_str(d)
    if paths.basename(d) in ("best", "last") and d.parent.name == "export":
        run = paths.to_str(d.parent.parent)
        # a sweep's or study's run keeps the config it ran with; a bare `train` would
        # train the default config into it
        config = (f"--config={run}/sweep_config.py"
                  if paths.exists(paths.join(run, "sweep_config.py"))
                  else "--config=<the config it was trained with, as in its config.json>")
        return (f"It was exported by the training run {run}: move {run}/results.json away "
                f"and rerun that run (`python -m medtransfer_jax.train --workdir={run} "
                f"{config}`, or the sweep/study stage that ran it, with --force), which trains "
                "and exports it again")
    if paths.basename(d) == "weights" and d.parent.parent.name == "sources":
        study = paths.to_str(d.parent.parent.parent)
        return (f"The study {study} made it: delete {shown} and rerun the study's own "
                f"command (`python -m medtransfer_jax.study --workdir={study} --config=...` "
                "with its --config) adding --stages=sources --force, which converts or draws "
                "it again")
    return ("Re-create it with `python -m medtransfer_jax.convert --output_dir="
            f"{shown}` (or copy it again from where it came from)")


def load_weights(directory: paths.PathLike) -> Tuple[Dict[str, Any], WeightsMetadata]:
    """Returns (variables as NumPy trees, metadata) from a local or ``gs://`` directory."""
    import orbax.checkpoint as ocp

    metadata = load_metadata(directory)
    path = paths.workdir(directory) / VARIABLES_DIR
    if not paths.isdir(path):
        raise CheckpointError(f"{paths.to_str(directory)!r} has metadata but no "
                              f"{VARIABLES_DIR}/ tree; the save was interrupted. "
                              f"{rewrite_hint(directory)}.")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(path)
    except Exception as e:  # orbax raises many types for damaged trees
        raise CheckpointError(f"Cannot restore weights from {path}: {type(e).__name__}: {e}. "
                              f"The directory is damaged. {rewrite_hint(directory)}.") from e
    return {k: dict(v) for k, v in tree.items()}, metadata


@dataclasses.dataclass
class LoadedModel:
    """A model rebuilt from a weights directory, ready for inference."""
    model: resnet.ResNet
    variables: Dict[str, Any]
    metadata: WeightsMetadata
    name: str

    @property
    def depth(self) -> int:
        return self.model.depth

    def valid_layers(self) -> Tuple[str, ...]:
        return resnet.block_output_names(self.model.depth) + ("logits",)


def load_model(weights: Union[paths.PathLike, LoadedModel], name: Optional[str] = None, *,
               mesh=None, to_device: bool = True) -> LoadedModel:
    """The one "weights directory -> model + variables" path of the project.

    The model is built from ``metadata.model_spec()`` (architecture and head as saved).
    The variables go on the device once (NumPy leaves would be re-uploaded with every
    forward batch): replicated over ``mesh`` if given, else on the default device;
    ``to_device=False`` keeps them as NumPy (training merges them into a fresh head).
    A LoadedModel passes through. Errors: CheckpointError naming the directory.
    """
    if isinstance(weights, LoadedModel):
        return weights
    variables, metadata = load_weights(weights)
    if to_device:
        variables = (jax.device_put(variables) if mesh is None
                     else sharding.replicate(variables, mesh))
    return LoadedModel(metadata.model_spec().build(), variables, metadata,
                       name or paths.to_str(weights))


def merge_into(target: Mapping[str, Any], source: Mapping[str, Any], *,
               skip_head: bool = False, source_name: str = "checkpoint") -> Dict[str, Any]:
    """Copies ``source`` leaves into a freshly initialised ``target`` tree.

    Used to start fine-tuning from pre-trained weights. Every layer of ``target``
    except the head must be present in ``source`` with the same shape; the head
    (``predictions``) is taken from source only if ``skip_head`` is False and the
    shapes agree (a 1000-class ImageNet head never fits a 2-class task).

    Raises:
      CheckpointError naming the layer and both shapes on any mismatch.
    """
    out: Dict[str, Any] = {}
    for collection, t_tree in target.items():
        s_tree = dict(source.get(collection, {}))
        flat_t = _flatten(t_tree)
        flat_s = _flatten(s_tree)
        merged = {}
        for key, t_val in flat_t.items():
            layer = key[0]
            is_head = layer == "predictions"
            if is_head and (skip_head or key not in flat_s or
                            np.shape(flat_s[key]) != np.shape(t_val)):
                merged[key] = t_val
                continue
            if key not in flat_s:
                raise CheckpointError(
                    f"{source_name}: layer '{'/'.join(key)}' ({collection}) is missing. The "
                    "checkpoint was made for a different architecture (depth/layout/width); "
                    "check its metadata.json against the config's model settings.")
            s_val = flat_s[key]
            if np.shape(s_val) != np.shape(t_val):
                raise CheckpointError(
                    f"{source_name}: layer '{'/'.join(key)}' ({collection}) has shape "
                    f"{tuple(np.shape(s_val))} but the model expects {tuple(np.shape(t_val))}. "
                    "Check depth/width/layout in the config against the checkpoint's metadata.")
            merged[key] = np.asarray(s_val, dtype=np.asarray(t_val).dtype)
        out[collection] = _unflatten(merged)
    return out


def _flatten(tree, prefix=()):
    flat = {}
    for k, v in dict(tree).items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def _unflatten(flat):
    tree: Dict[str, Any] = {}
    for key, v in flat.items():
        node = tree
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = v
    return tree
