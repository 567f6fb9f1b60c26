r"""Convert a source checkpoint (Keras .h5 or torchvision .pth) to a weights directory.

Usage::

    python -m medtransfer_jax.convert --format=keras_h5 \
        --input=RadImageNet-ResNet50_notop.h5 --output=weights/radimagenet_r50
    python -m medtransfer_jax.convert --format=torchvision \
        --input=resnet50-11ad3fa6.pth --output=weights/torchvision_r50_v2

The output directory holds the orbax tree and ``metadata.json`` (source, layout,
preprocessing, depth, width, head); every later stage loads it with
``medtransfer_jax.weights.load_weights``. After writing, the directory is loaded back,
the Flax model is built from its metadata and run once as a self-check.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from medtransfer_jax.weights.conversion import FORMATS, convert, format_summary

_FORMAT = flags.DEFINE_enum("format", None, FORMATS, "Source file format.")
_INPUT = flags.DEFINE_string("input", None, "Source checkpoint file (.h5/.keras or .pth/.pt).")
_OUTPUT = flags.DEFINE_string("output", None, "Weights directory to write.")
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", None, "Keep the source's head only if it has this many classes; "
    "otherwise it is dropped (the fine-tuning run initialises a new one).")
_SOURCE_NAME = flags.DEFINE_string(
    "source_name", None, "Name recorded in the metadata (default: 'radimagenet' if the file "
    "name contains RadImageNet, else 'imagenet').")
_PREPROCESSING = flags.DEFINE_enum(
    "preprocessing", None, ("caffe", "radimagenet", "torch", "unit"),
    "Input normalisation the weights expect (default from the source: caffe for Keras "
    "ImageNet, radimagenet for RadImageNet files, torch for torchvision).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Resolution the source was trained at.")
_DEPTH = flags.DEFINE_integer("depth", None, "Expected ResNet depth (default: inferred).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing weights directory.")


def main(argv):
    if not flags.FLAGS["verbosity"].present:  # orbax logs a lot at INFO
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]} (all options are --flags).")
    if not _INPUT.value:
        raise app.UsageError("--input is required: the source checkpoint file "
                             "(Keras .h5 or torchvision .pth).")
    if not _FORMAT.value:
        guess = ""
        if os.path.isfile(_INPUT.value):
            from medtransfer_jax.weights import _common
            kind = _common.sniff(_INPUT.value)
            guess = {"hdf5": " The input is an HDF5 file: use --format=keras_h5.",
                     "zip": " The input is a zip (PyTorch .pth or Keras .keras): "
                            "--format=torchvision or --format=keras_h5.",
                     "pickle": " The input looks like a PyTorch file: use --format=torchvision."
                     }.get(kind, "")
        raise app.UsageError(f"--format is required: one of {', '.join(FORMATS)}.{guess}")
    if not _OUTPUT.value:
        raise app.UsageError("--output is required: the weights directory to write.")
    from medtransfer_jax.weights.checkpoint import CheckpointError
    try:
        summary = convert(
            _FORMAT.value, _INPUT.value, _OUTPUT.value, num_classes=_NUM_CLASSES.value,
            source_name=_SOURCE_NAME.value, preprocessing=_PREPROCESSING.value,
            image_size=_IMAGE_SIZE.value, depth=_DEPTH.value, overwrite=_OVERWRITE.value)
    except CheckpointError as e:  # the file is unusable: say why, no usage text
        print(f"Cannot convert: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    print(format_summary(summary), flush=True)


if __name__ == "__main__":
    app.run(main)
