"""Corrupt images are found before training: every bad file of the splits in one error."""
import os

import _train_utils  # noqa: F401  (persistent XLA cache)
import numpy as np
import pytest
from PIL import Image

from medtransfer_jax import data as data_lib
from medtransfer_jax.data import integrity
from medtransfer_jax.training import loop, presets


def _folder(root, n_per_class=10):
    """root/{a,b}/*.png|jpg with 32 px images; returns {name: path}."""
    rng = np.random.default_rng(0)
    paths = {}
    for cls in ("a", "b"):
        os.makedirs(os.path.join(root, cls))
        for i in range(n_per_class):
            ext = "png" if i % 2 else "jpg"
            p = os.path.join(root, cls, f"{i:02d}.{ext}")
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(p)
            paths[f"{cls}{i}"] = p
    return paths


def _corrupt(paths):
    """A truncated JPEG (header fine, data cut) and a PNG that is not an image at all."""
    jpg, png = paths["a4"], paths["b3"]
    with open(jpg, "rb") as f:
        head = f.read()
    with open(jpg, "wb") as f:
        f.write(head[: len(head) // 2])
    with open(png, "wb") as f:
        f.write(b"not an image")
    return jpg, png


def _config(root, **kw):
    c = presets.tiny_config()
    c.sharding.num_devices = 1
    c.data.name = "image_folder"
    c.data.root = root
    c.data.heldout_val_fraction = 0.5
    for k, v in kw.items():
        c.data[k] = v
    return c


def test_check_file_reasons(tmp_path):
    paths = _folder(str(tmp_path / "d"), 2)
    assert integrity.check_file(paths["a0"]) is None
    jpg, png = _corrupt({"a4": paths["a0"], "b3": paths["a1"]})
    assert integrity.check_file(jpg) is not None
    assert "UnidentifiedImageError" in integrity.check_file(png)
    assert integrity.check_file(str(tmp_path / "nope.png")) == "file not found"


def test_every_bad_file_reported_before_training(tmp_path):
    root = str(tmp_path / "data")
    jpg, png = _corrupt(_folder(root))
    splits = data_lib.get_splits(_config(root).data)
    with pytest.raises(data_lib.DataError) as e:
        integrity.check_splits(splits, num_threads=4)
    msg = str(e.value)
    assert msg.startswith("2 of 20 image files") and jpg in msg and png in msg
    assert "data.skip_corrupt=True" in msg
    # The loop runs the check at setup, before building the model or any checkpoint.
    wd = str(tmp_path / "run")
    with pytest.raises(data_lib.DataError, match="2 of 20 image files"):
        loop.train_and_evaluate(_config(root), wd)
    assert not os.listdir(os.path.join(wd, "checkpoints"))
    # skip_corrupt=True: the source drops (and counts) them; nothing is left to report.
    skipped = data_lib.get_splits(_config(root, skip_corrupt=True).data)
    assert integrity.check_splits(skipped) == 18
    base = skipped.train.base
    assert sorted(p for p, _ in base.skipped) == sorted([jpg, png])


def test_non_file_sources_need_no_check():
    splits = data_lib.get_splits(presets.tiny_config().data)
    assert integrity.check_splits(splits) == 0


def test_a_readable_file_is_read_once_per_process(tmp_path, monkeypatch):
    """A study's later runs over the same files do not read them again; a file not yet
    found readable is always read."""
    root = str(tmp_path / "data")
    _folder(root, 4)
    read = []
    real = integrity.check_file
    monkeypatch.setattr(integrity, "check_file", lambda p, ld=None: read.append(p) or real(p, ld))
    splits = data_lib.get_splits(_config(root).data)
    assert integrity.check_splits(splits, num_threads=2) == 8 and len(read) == 8
    assert integrity.check_splits(data_lib.get_splits(_config(root).data)) == 8
    assert len(read) == 8
    # A file that fails is not remembered as good: it is read (and reported) every time.
    bad_root = str(tmp_path / "bad")
    _corrupt(_folder(bad_root, 5))
    bad = data_lib.get_splits(_config(bad_root).data)
    for _ in range(2):
        with pytest.raises(data_lib.DataError, match="2 of 10 image files"):
            integrity.check_splits(bad, num_threads=2)
    assert len(read) == 8 + 10 + 2
