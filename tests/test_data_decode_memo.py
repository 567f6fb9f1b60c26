"""The decode memo: a study decodes each image once, and only images it can name."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from medtransfer_jax.data import confounders, decode_memo, device_cache, synthetic
from medtransfer_jax.data.base import ArraySource, SubsetSource, TransformedSource
from medtransfer_jax.data.sources import Example, FileSource, NpySliceLoader


@pytest.fixture
def memo(monkeypatch):
    fresh = decode_memo.DecodeMemo(limit_bytes=2 ** 30)
    monkeypatch.setattr(decode_memo, "MEMO", fresh)
    return fresh


class _Counting(synthetic.SyntheticSource):
    """Counts the images it renders."""
    loads = 0

    def load_image(self, index):
        type(self).loads += 1
        return super().load_image(index)


def test_lru_is_bounded_in_bytes_and_hands_out_read_only_images():
    m = decode_memo.DecodeMemo(limit_bytes=250)
    made = []

    def make(v):
        made.append(v)
        return np.full(100, v, np.uint8)

    for v in (1, 2, 1, 3):          # 1 is used again before 3 arrives: 2 is the oldest
        m.get(("k", v), lambda v=v: make(v))
    assert made == [1, 2, 3] and (m.hits, m.misses) == (1, 3)
    assert len(m) == 2 and m.nbytes == 200
    m.get(("k", 2), lambda: make(2))                # evicted, decoded again
    assert made == [1, 2, 3, 2]
    image = m.get(("k", 2), lambda: make(99))
    assert image[0] == 2 and not image.flags.writeable
    assert m.get(None, lambda: make(7))[0] == 7 and made[-1] == 7   # no key: no memo
    view_of = np.arange(10, dtype=np.uint8)
    kept = m.get(("view",), lambda: view_of[2:5])
    assert view_of.flags.writeable and kept.base is None   # a view is copied, not frozen


def test_a_second_split_over_the_same_images_decodes_nothing(memo):
    a = _Counting(num_examples=40, image_size=24, seed=3)
    images, labels = device_cache.decode_split(a, 16)
    assert _Counting.loads == 40
    # Another Source object over the same data (a later run), and one fold of it.
    b = _Counting(num_examples=40, image_size=24, seed=3)
    fold = SubsetSource(b, np.arange(5, 25))
    again, again_labels = device_cache.decode_split(b, 16)
    part, part_labels = device_cache.decode_split(fold, 16)
    assert _Counting.loads == 40 and memo.hits == 60
    np.testing.assert_array_equal(again, images)
    np.testing.assert_array_equal(part, images[5:25])
    np.testing.assert_array_equal(part_labels, labels[5:25])
    # The same pixels without the memo.
    memo.limit_bytes = 0
    plain, plain_labels = device_cache.decode_split(b, 16)
    np.testing.assert_array_equal(plain, images)
    np.testing.assert_array_equal(plain_labels, labels)


@pytest.mark.parametrize("change", ["size", "method", "seed", "contrast"])
def test_anything_that_changes_the_pixels_misses(memo, change):
    src = synthetic.SyntheticSource(num_examples=8, image_size=24, seed=0)
    device_cache.decode_split(src, 16)
    size, method = 16, "bilinear"
    other = synthetic.SyntheticSource(num_examples=8, image_size=24,
                                      seed=1 if change == "seed" else 0,
                                      contrast=0.5 if change == "contrast" else 0.35)
    size = 20 if change == "size" else size
    method = "nearest" if change == "method" else method
    out, _ = device_cache.decode_split(other, size, method)
    assert memo.hits == 0 and memo.misses == 16
    ref = [np.asarray(other.load_image(i)) for i in range(8)]
    from medtransfer_jax.data import pipeline
    np.testing.assert_array_equal(out[..., 0] if out.shape[-1] == 1 else out,
                                  np.stack([pipeline.resize(r, size, method) for r in ref]))


def test_a_confounder_is_part_of_the_key(memo):
    base = synthetic.SyntheticSource(num_examples=10, image_size=32, seed=0)
    cfg = dict(confounders.default_confounder_config(), kind="tag")
    mask = np.arange(10) < 5
    tagged = confounders.confound(base, mask, cfg)
    keys = [tagged.image_key(i) for i in range(10)]
    assert keys[0] != base.image_key(0) and keys[0][0] == "transformed"
    assert keys[7] == base.image_key(7)            # untouched image: the base's pixels
    clean, _ = device_cache.decode_split(base, 32)
    out, _ = device_cache.decode_split(tagged, 32)
    assert memo.hits == 5                           # only the untouched half
    assert not np.array_equal(out[:5], clean[:5])
    np.testing.assert_array_equal(out[5:], clean[5:])
    # A lambda is keyed by identity, so it names no pixels: never memoised.
    anon = TransformedSource(base, lambda im, _id: 255 - im, mask)
    assert anon.image_key(0) is None and anon.image_key(7) == base.image_key(7)


def test_files_are_keyed_by_path_and_loader(tmp_path, memo):
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(p)
        paths.append(str(p))
    files = FileSource([Example(p, i % 2, str(i), str(i)) for i, p in enumerate(paths)],
                       ("a", "b"))
    assert files.image_key(1) == ("file", paths[1], None)
    assert NpySliceLoader(3) == NpySliceLoader(3) and NpySliceLoader(3) != NpySliceLoader(4)
    out, _ = device_cache.decode_split(files, 8)
    again, _ = device_cache.decode_split(
        FileSource([Example(p, i % 2, str(i), str(i)) for i, p in enumerate(paths)],
                   ("a", "b")), 8)
    assert memo.hits == 3 and out[2, 0, 0, 0] == 80
    np.testing.assert_array_equal(again, out)
    # In-memory arrays have no name: decoded each time.
    arr = ArraySource(np.zeros((2, 8, 8), np.uint8), [0, 1], ("a", "b"))
    assert arr.image_key(0) is None


def test_the_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(decode_memo.ENV, "0.5")
    assert decode_memo.default_limit_bytes() == 2 ** 29
    monkeypatch.setenv(decode_memo.ENV, "0")
    assert decode_memo.DecodeMemo().limit_bytes == 0
    monkeypatch.setenv(decode_memo.ENV, "lots")
    with pytest.raises(ValueError, match="MEDTRANSFER_DECODE_MEMO_GB='lots'"):
        decode_memo.default_limit_bytes()
    monkeypatch.delenv(decode_memo.ENV)
    assert 0 < decode_memo.default_limit_bytes() <= decode_memo.MAX_DEFAULT_BYTES


def test_loaders_stay_frozen_dataclasses():
    from medtransfer_jax.data.builders.pcam import H5PatchLoader
    for loader in (NpySliceLoader(1), H5PatchLoader(2)):
        assert dataclasses.is_dataclass(loader) and hash(loader) == hash(type(loader)(
            *dataclasses.astuple(loader)))


def test_a_bad_limit_is_a_one_line_error_before_anything_is_written(tmp_path):
    """Read at first use, not at import: the main says what is wrong and exits 2."""
    import subprocess
    import sys
    from _train_utils import REPO, subprocess_env
    wd = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "medtransfer_jax.train", f"--workdir={wd}"],
                       cwd=REPO, env=subprocess_env(**{decode_memo.ENV: "lots"}),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "train: error: MEDTRANSFER_DECODE_MEMO_GB='lots' is not a number of GiB" in p.stderr
    assert "Traceback" not in p.stderr and not wd.exists()
