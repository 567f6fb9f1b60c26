"""Source checkpoint (Keras .h5 / torchvision .pth) -> weights directory, with a self-check.

The library side of ``python -m medtransfer_jax.convert``: the study runner and tests
call :func:`convert` directly; the CLI module only parses flags.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, Optional

import jax
import numpy as np
from absl import logging

from medtransfer_jax import paths
from medtransfer_jax import preprocessing as prep
from medtransfer_jax.weights import _common, checkpoint, keras_h5, torchvision

FORMATS = ("keras_h5", "torchvision")


def default_source_name(input_path: str) -> str:
    return "radimagenet" if "radimagenet" in paths.basename(input_path).lower() else "imagenet"


def default_preprocessing(fmt: str, source_name: str) -> str:
    if fmt == "torchvision":
        return "torch"
    return "radimagenet" if source_name == "radimagenet" else "caffe"


def file_sha256(path: str) -> str:
    """SHA-256 of a weights file, recorded in the converted weights' metadata (a study
    converts again when its input file no longer matches it)."""
    h = hashlib.sha256()
    with paths.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(fmt: str, input_path: str, output_dir: str, *, num_classes: Optional[int] = None,
            source_name: Optional[str] = None, preprocessing: Optional[str] = None,
            image_size: int = 224, depth: Optional[int] = None, overwrite: bool = False,
            self_check: bool = True) -> Dict[str, Any]:
    """Converts ``input_path`` and writes a weights directory; returns a summary dict.

    Raises:
      ValueError for bad arguments, CheckpointError for unusable files.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r} is not one of {FORMATS}.")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"--num_classes must be >= 1, got {num_classes}.")
    if preprocessing is not None and preprocessing not in prep.MODES:
        raise ValueError(f"--preprocessing={preprocessing!r} is not one of {prep.MODES}.")
    if image_size < 32:
        raise ValueError(f"--image_size must be >= 32, got {image_size}.")
    output_dir = paths.to_str(paths.workdir(output_dir))  # gs:// kept, local made absolute
    if paths.exists(paths.join(output_dir, checkpoint.METADATA_FILE)) and not overwrite:
        raise ValueError(f"--output_dir={output_dir} already holds a weights directory; pass "
                         "--overwrite to replace it or choose another directory.")
    if paths.isfile(output_dir):
        raise ValueError(f"--output_dir={output_dir} is a file; give a directory path.")
    if (not overwrite and paths.isdir(output_dir) and paths.listdir(output_dir)
            and not paths.exists(paths.join(output_dir, checkpoint.METADATA_FILE))):
        raise ValueError(f"--output_dir={output_dir} is a folder with other files in it; give "
                         "a new or empty directory (the weights are written into it), or "
                         "--overwrite.")

    loader = keras_h5.load_keras_h5 if fmt == "keras_h5" else torchvision.load_torchvision
    variables, info = loader(input_path, depth=depth)
    logging.info("Read %s: %s", input_path, info)

    source_name = source_name or default_source_name(input_path)
    preprocessing = preprocessing or default_preprocessing(fmt, source_name)
    head_note = "none in the file"
    kept_classes = info["num_classes"]
    if info["has_head"]:
        head_note = f"kept ({info['num_classes']} classes)"
        if num_classes is not None and num_classes != info["num_classes"]:
            variables["params"].pop("predictions")
            kept_classes = None
            head_note = (f"dropped ({info['num_classes']} classes in the file, "
                         f"--num_classes={num_classes})")
            logging.warning("Dropping the source head: %s", head_note)
    elif num_classes is not None:
        head_note = f"none in the file (a {num_classes}-class head is initialised at fine-tuning)"

    metadata = checkpoint.WeightsMetadata(
        source=source_name, layout=info["layout"], depth=info["depth"], width=info["width"],
        num_classes=kept_classes, preprocessing=preprocessing, image_size=image_size,
        converted_from=info["path"], format=fmt,
        extra=dict(container=info.get("h5_layout") or info.get("wrapper"),
                   keras_version=info.get("keras_version"),
                   source_num_classes=info["num_classes"],
                   ignored=info.get("ignored", [])[:20],
                   sha256=file_sha256(input_path)))
    checkpoint.save_weights(output_dir, variables, metadata, overwrite=True)

    summary = dict(output=output_dir, input=info["path"], format=fmt,
                   container=metadata.extra["container"], depth=info["depth"],
                   width=info["width"], layout=info["layout"], source=source_name,
                   preprocessing=preprocessing, head=head_note, num_classes=kept_classes,
                   num_layers=len(variables["params"]),
                   num_params=_common.parameter_count(variables),
                   num_batch_stats=_common.parameter_count(variables, "batch_stats"))
    if self_check:
        summary["self_check"] = check_weights_dir(output_dir, variables)
    return summary


def check_weights_dir(directory: str, expected: Optional[Dict[str, Any]] = None,
                      image_size: int = 64) -> str:
    """Loads a weights directory back, builds its model and runs one forward pass.

    Checks that the restored leaves equal ``expected`` (if given) exactly and that the
    model's outputs on two normalised random images are finite. Returns a one-line
    description; raises CheckpointError on any failure.
    """
    loaded = checkpoint.load_model(directory, to_device=False)
    variables, metadata, model = loaded.variables, loaded.metadata, loaded.model
    if expected is not None:
        for coll, layers in expected.items():
            for layer, leaves in layers.items():
                for leaf, want in leaves.items():
                    got = variables.get(coll, {}).get(layer, {}).get(leaf)
                    if got is None or not np.array_equal(np.asarray(got), want):
                        raise checkpoint.CheckpointError(
                            f"self-check: {directory} {coll}/{layer}/{leaf} does not read back "
                            "as written.")
    images = np.random.default_rng(0).integers(0, 256, (2, image_size, image_size, 3))
    x = prep.normalize(images.astype(np.float32), metadata.preprocessing)
    try:
        out = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
    except Exception as e:  # a structure mismatch shows up here
        raise checkpoint.CheckpointError(
            f"self-check: the model rebuilt from {directory}/metadata.json cannot run with its "
            f"weights: {type(e).__name__}: {e}") from e
    if not np.all(np.isfinite(out)):
        raise checkpoint.CheckpointError(f"self-check: non-finite outputs from {directory}.")
    return (f"reloaded, forward pass on {x.shape} -> {out.shape}, finite "
            f"(max |out| {np.abs(out).max():.3g})")


def format_summary(s: Dict[str, Any]) -> str:
    lines = [
        f"Converted {s['input']} ({s['format']}, {s['container']}) -> {s['output']}",
        f"  model: ResNet{s['depth']} layout={s['layout']} width={s['width']}",
        f"  layers with weights: {s['num_layers']}; parameters: {s['num_params']:,} "
        f"(+ {s['num_batch_stats']:,} BatchNorm statistics)",
        f"  head: {s['head']}",
        f"  source: {s['source']}; preprocessing: {s['preprocessing']}",
    ]
    if "self_check" in s:
        lines.append(f"  self-check: {s['self_check']}")
    return "\n".join(lines)
