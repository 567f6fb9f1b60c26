"""Shared set-up of the `python -m medtransfer_jax.analyze` tests: random weights dirs and
absl flags parsed (and restored) around each test that calls analyze's flag parsing."""
from typing import List

import pytest
from absl import flags
from absl.testing import flagsaver

from medtransfer_jax.models import resnet
from medtransfer_jax.weights.checkpoint import WeightsMetadata, save_weights


def random_weights_dirs(root, *, depth: int, width: int, image_size: int,
                        seeds=(0, 1)) -> List[str]:
    """One weights dir per seed under ``root``: a random headless ResNet, 'unit' inputs."""
    model = resnet.ResNet(depth=depth, width=width, num_classes=None)
    out = []
    for i, seed in enumerate(seeds):
        d = str(root / f"w{i}")
        save_weights(d, resnet.random_variables(model, seed),
                     WeightsMetadata(source="random", layout="keras_v1", depth=depth,
                                     width=width, preprocessing="unit", image_size=image_size))
        out.append(d)
    return out


@pytest.fixture(autouse=True)
def parsed_flags():
    """absl flags marked parsed, and every flag a test sets restored after it."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver():
        yield
