r"""Convert a source checkpoint (Keras .h5 or torchvision .pth) to a weights directory.

Usage::

    python -m medtransfer_jax.convert --format=keras_h5 \
        --input=RadImageNet-ResNet50_notop.h5 --output_dir=weights/radimagenet_r50
    python -m medtransfer_jax.convert --format=torchvision \
        --input=resnet50-11ad3fa6.pth --output_dir=weights/torchvision_r50_v2

The output directory holds the orbax tree and ``metadata.json`` (source, layout,
preprocessing, depth, width, head); every later stage loads it with
``medtransfer_jax.weights.load_weights``. After writing, the directory is loaded back,
the Flax model is built from its metadata and run once as a self-check. Bad input:
one line ``convert: error: ...``, exit status 2, nothing written.
"""
from __future__ import annotations

import os

from absl import flags

from medtransfer_jax import cli
from medtransfer_jax.errors import UserError
from medtransfer_jax.weights.checkpoint import CheckpointError
from medtransfer_jax.weights import _common
from medtransfer_jax.weights.conversion import FORMATS, convert, format_summary

_FORMAT = flags.DEFINE_enum("format", None, FORMATS, "Source file format.")
_INPUT = flags.DEFINE_string("input", None, "Source checkpoint file (.h5/.keras or .pth/.pt).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Weights directory to write.")
flags.DEFINE_alias("output", "output_dir")  # the flag's name before the vocabulary was unified
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


def _format_hint(path: str) -> str:
    kind = _common.sniff(path) if os.path.isfile(path) else None
    return {"hdf5": " The input is an HDF5 file: use --format=keras_h5.",
            "zip": " The input is a zip (PyTorch .pth or Keras .keras): "
                   "--format=torchvision or --format=keras_h5.",
            "pickle": " The input looks like a PyTorch file: use --format=torchvision."
            }.get(kind, "")


def _validate() -> None:
    """Flags and paths, checked before the conversion imports JAX or writes anything."""
    cli.require(_INPUT.value, "--input", "the source checkpoint file (Keras .h5 or "
                "torchvision .pth)")
    if not _FORMAT.value:
        raise UserError(f"--format is required: one of {', '.join(FORMATS)}."
                        + _format_hint(_INPUT.value))
    cli.require(_OUTPUT.value, "--output_dir", "the weights directory to write")
    if not os.path.isfile(_INPUT.value):
        raise UserError(f"Cannot convert: --input={_INPUT.value} is not a file")
    cli.check_output_dir(_OUTPUT.value, "--output_dir")
    cli.check_positive(_IMAGE_SIZE.value, "--image_size")
    cli.check_positive(_NUM_CLASSES.value, "--num_classes")


def main(argv):
    cli.no_positional(argv)
    _validate()
    cli.enable_compile_cache()  # the check that loads the written weights back compiles
    try:
        summary = convert(
            _FORMAT.value, _INPUT.value, _OUTPUT.value, num_classes=_NUM_CLASSES.value,
            source_name=_SOURCE_NAME.value, preprocessing=_PREPROCESSING.value,
            image_size=_IMAGE_SIZE.value, depth=_DEPTH.value, overwrite=_OVERWRITE.value)
    except CheckpointError as e:  # the file is unusable: say why
        raise UserError(f"Cannot convert {_INPUT.value}: {e}") from e
    except ValueError as e:
        raise UserError(str(e)) from e
    print(format_summary(summary), flush=True)


if __name__ == "__main__":
    cli.run(main, "convert", quiet=True, checkpoints=False)
