"""The on-disk decode store: a later process reads each image's pixels instead of the file,
and anything that could change the pixels (the file, size, filter, loader, confounder,
code) names another entry."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medtransfer_jax.data import (confounders, decode_memo, decode_store, device_cache,
                                  integrity, pipeline, sources, synthetic)
from medtransfer_jax.data.base import DataError, DatasetSplits, TransformedSource
from medtransfer_jax.data.sources import Example, FileSource, NpySliceLoader


def _images(folder, n=6):
    """PNG and JPEG files, grey, RGB and RGBA, of different sizes."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        shape = [(40, 30), (33, 47, 3), (20, 20, 4)][i % 3]
        path = folder / f"img{i}.{'png' if i % 2 else 'jpg'}"
        image = rng.integers(0, 256, shape, np.uint8)
        Image.fromarray(image).convert("RGB" if i % 2 == 0 else Image.fromarray(image).mode
                                       ).save(path)
        out.append(str(path))
    return out


def _source(paths, loader=None):
    return FileSource([Example(p, i % 2, f"id{i}", f"g{i}", loader=loader)
                       for i, p in enumerate(paths)], ("a", "b"))


class _Process:
    """What a new process starts with: an empty decode memo and a store over ``root``."""

    def __init__(self, monkeypatch, root):
        self.store = decode_store.DecodeStore(str(root))
        monkeypatch.setattr(decode_store, "STORE", self.store)
        monkeypatch.setattr(decode_memo, "MEMO", decode_memo.DecodeMemo(limit_bytes=2 ** 30))
        monkeypatch.setattr(integrity, "_CHECKED_GOOD", set())


@pytest.fixture
def decodes(monkeypatch):
    """The paths PIL decodes, in order."""
    seen = []
    real = sources.decode_image

    def counting(path):
        seen.append(path)
        return real(path)

    monkeypatch.setattr(sources, "decode_image", counting)
    return seen


def _reference(paths, size, method="bilinear"):
    """Each file decoded and resized without any cache, as decode_split stacks it."""
    out = []
    for p in paths:
        img = pipeline.resize(np.asarray(Image.open(p).convert("RGB")), size, method)
        out.append(img)
    return np.stack(out)


def test_a_second_process_reads_the_stored_pixels_bit_for_bit(tmp_path, monkeypatch, decodes,
                                                               caplog):
    paths = _images(tmp_path)
    first = _Process(monkeypatch, tmp_path / "store")
    with caplog.at_level(logging.INFO, logger=device_cache.__name__):
        images, labels = device_cache.decode_split(_source(paths), 16)
    assert len(decodes) == 6 and first.store.writes == 6 and first.store.reads == 0
    assert "decoded 6 of 6 images at 16 px, read 0 from the decode cache" in caplog.text
    np.testing.assert_array_equal(images, _reference(paths, 16))
    entries = list((tmp_path / "store").rglob("*.npy"))
    assert len(entries) == 6
    assert {e.relative_to(tmp_path / "store").parts[0] for e in entries} == {
        decode_store.code_fingerprint()}

    second = _Process(monkeypatch, tmp_path / "store")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=device_cache.__name__):
        again, again_labels = device_cache.decode_split(_source(paths), 16)
    assert len(decodes) == 6 and second.store.reads == 6 and second.store.writes == 0
    assert "decoded 0 of 6 images at 16 px, read 6 from the decode cache" in caplog.text
    assert again.dtype == np.uint8 and again.shape == images.shape
    np.testing.assert_array_equal(again, images)
    np.testing.assert_array_equal(again_labels, labels)


def test_a_changed_file_is_decoded_again(tmp_path, monkeypatch, decodes):
    paths = _images(tmp_path)
    _Process(monkeypatch, tmp_path / "store")
    device_cache.decode_split(_source(paths), 16)
    Image.fromarray(np.full((40, 30), 7, np.uint8)).save(paths[3])
    st = os.stat(paths[3])
    os.utime(paths[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # coarse clocks
    later = _Process(monkeypatch, tmp_path / "store")
    decodes.clear()
    out, _ = device_cache.decode_split(_source(paths), 16)
    assert decodes == [paths[3]] and later.store.reads == 5
    assert (out[3] == 7).all()
    np.testing.assert_array_equal(out, _reference(paths, 16))


@pytest.mark.parametrize("change", ["size", "method", "loader", "confounder"])
def test_anything_that_changes_the_pixels_names_another_entry(tmp_path, monkeypatch, change):
    folder = tmp_path / "vol"
    folder.mkdir()
    vols = []
    for i in range(3):
        vols.append(str(folder / f"v{i}.npy"))
        np.save(vols[-1], np.random.default_rng(i).integers(0, 256, (4, 24, 24), np.uint8))
    _Process(monkeypatch, tmp_path / "store")
    src = _source(vols, loader=NpySliceLoader(1))
    before, _ = device_cache.decode_split(src, 16)
    later = _Process(monkeypatch, tmp_path / "store")
    size, method = (12 if change == "size" else 16), ("nearest" if change == "method"
                                                       else "bilinear")
    other = src
    if change == "loader":
        other = _source(vols, loader=NpySliceLoader(2))
    if change == "confounder":
        cfg = dict(confounders.default_confounder_config(), kind="tag")
        other = confounders.confound(src, np.array([True, False, True]), cfg)
    out, _ = device_cache.decode_split(other, size, method)
    expected_reads = 1 if change == "confounder" else 0      # the untouched image
    assert later.store.reads == expected_reads
    ref = np.stack([pipeline.resize(np.asarray(other.load_image(i)), size, method)
                    for i in range(3)])
    np.testing.assert_array_equal(out[..., 0], ref)
    if change == "size":
        assert before.shape[1:3] == (16, 16) and out.shape[1:3] == (12, 12)


def test_only_images_from_local_files_with_stable_keys_are_stored(tmp_path, monkeypatch):
    proc = _Process(monkeypatch, tmp_path / "store")
    device_cache.decode_split(synthetic.SyntheticSource(num_examples=4, image_size=24), 16)
    paths = _images(tmp_path, 2)
    anon = TransformedSource(_source(paths), lambda im, _id: 255 - im, np.array([True, True]))
    device_cache.decode_split(anon, 16)
    assert proc.store.writes == 0 and not (tmp_path / "store").exists()
    with pytest.raises(decode_store.Unstorable):
        decode_store.encode_key(("file", "gs://bucket/a.png", None))
    with pytest.raises(decode_store.Unstorable):
        decode_store.encode_key(("file", str(tmp_path / "missing.png"), None))
    with pytest.raises(decode_store.Unstorable):
        decode_store.encode_key(("x", np.zeros(3)))
    key = ("file", paths[0], NpySliceLoader(2))
    text = decode_store.encode_key(key)
    assert "NpySliceLoader(index=2,axis=0)" in text and str(os.stat(paths[0]).st_mtime_ns) in text


def test_the_store_can_be_turned_off_and_the_code_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(decode_store.ENV, "")
    assert decode_store.DecodeStore().folder is None
    monkeypatch.setenv(decode_store.ENV, str(tmp_path / "s"))
    assert decode_store.DecodeStore().folder == tmp_path / "s" / decode_store.code_fingerprint()
    monkeypatch.delenv(decode_store.ENV)
    assert str(decode_store.DecodeStore().folder).startswith(
        os.path.expanduser("~/.cache/medtransfer_jax/decoded/"))
    before = decode_store.code_fingerprint()
    monkeypatch.setattr(decode_store, "FORMAT", decode_store.FORMAT + 1)
    assert decode_store.code_fingerprint() != before


def test_a_bad_entry_is_decoded_again_and_rewritten(tmp_path, monkeypatch, decodes, caplog):
    paths = _images(tmp_path, 3)
    _Process(monkeypatch, tmp_path / "store")
    good, _ = device_cache.decode_split(_source(paths), 16)
    entries = sorted((tmp_path / "store").rglob("*.npy"))
    entries[0].write_bytes(entries[0].read_bytes()[:40])          # truncated
    np.save(entries[1], np.zeros((8, 8, 3), np.uint8))            # wrong size
    later = _Process(monkeypatch, tmp_path / "store")
    decodes.clear()
    with caplog.at_level(logging.WARNING, logger=decode_store.__name__):
        out, _ = device_cache.decode_split(_source(paths), 16)
    assert len(decodes) == 2 and later.store.reads == 1 and later.store.writes == 2
    assert "is unreadable" in caplog.text and "not a 16 px image" in caplog.text
    np.testing.assert_array_equal(out, good)
    third = _Process(monkeypatch, tmp_path / "store")
    device_cache.decode_split(_source(paths), 16)
    assert third.store.reads == 3


def test_a_disk_that_refuses_writes_warns_once_and_the_run_goes_on(tmp_path, monkeypatch,
                                                                   caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the store's folder should be")
    proc = _Process(monkeypatch, blocker)
    paths = _images(tmp_path, 4)
    with caplog.at_level(logging.WARNING, logger=decode_store.__name__):
        out, _ = device_cache.decode_split(_source(paths), 16)
    np.testing.assert_array_equal(out, _reference(paths, 16))
    assert proc.store.writes == 0
    assert caplog.text.count("cannot write under") == 1
    assert decode_store.ENV in caplog.text


def _splits(paths):
    src = _source(paths)
    from medtransfer_jax.data.base import SubsetSource
    return DatasetSplits(train=SubsetSource(src, np.arange(0, 4)),
                         val=SubsetSource(src, np.arange(4, 5)),
                         test=SubsetSource(src, np.arange(5, 6)), num_classes=2,
                         class_names=src.class_names, name="files")


def test_a_later_process_does_not_read_files_already_found_readable(tmp_path, monkeypatch):
    paths = _images(tmp_path)
    checked = []
    real = integrity.check_file
    monkeypatch.setattr(integrity, "check_file",
                        lambda p, ld=None: checked.append(p) or real(p, ld))
    _Process(monkeypatch, tmp_path / "store")
    assert integrity.check_splits(_splits(paths)) == 6 and len(checked) == 6
    _Process(monkeypatch, tmp_path / "store")
    assert integrity.check_splits(_splits(paths)) == 6 and len(checked) == 6  # the marker
    # A file changed since: the set is read again, and a corrupt file is still found.
    with open(paths[2], "wb") as f:
        f.write(b"not an image")
    _Process(monkeypatch, tmp_path / "store")
    with pytest.raises(DataError, match=r"1 of 6 image files .*img2\.jpg"):
        integrity.check_splits(_splits(paths))
    assert len(checked) == 12
    _Process(monkeypatch, tmp_path / "store")
    with pytest.raises(DataError, match="img2.jpg"):       # no marker for a failed check
        integrity.check_splits(_splits(paths))


def test_two_real_processes_share_the_store(tmp_path):
    """The environment variable reaches a fresh interpreter; the second reads, not decodes."""
    paths = _images(tmp_path)
    script = ("import sys; from medtransfer_jax.data import decode_store, device_cache, sources;"
              "src = sources.FileSource([sources.Example(p, i % 2, str(i), str(i)) for i, p in "
              "enumerate(sys.argv[1:])], ('a', 'b'));"
              "x, _ = device_cache.decode_split(src, 16);"
              "print(decode_store.STORE.writes, decode_store.STORE.reads, int(x.sum()))")
    env = dict(os.environ, **{decode_store.ENV: str(tmp_path / "shared")})
    runs = [subprocess.run([sys.executable, "-c", script, *paths], env=env, capture_output=True,
                           text=True, timeout=120) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    (w1, r1, s1), (w2, r2, s2) = (map(int, r.stdout.split()) for r in runs)
    assert (w1, r1) == (6, 0) and (w2, r2) == (0, 6) and s1 == s2 > 0
