"""Image-folder and CSV sources, decoding, and bad input (clear errors naming the path)."""
import logging
import os

import numpy as np
import pytest
from PIL import Image

from medtransfer_jax import data
from medtransfer_jax.data import sources

pytestmark = pytest.mark.fast  # pure NumPy/SciPy: no JAX compilation


def _img(path, value=100, size=(12, 10), mode="L"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.full((size[1], size[0]) + ((3,) if mode == "RGB" else ()), value, np.uint8)
    arr[0, 0] = 255 - value
    Image.fromarray(arr, mode).save(path)
    return arr


def _folder(tmp_path):
    root = tmp_path / "folder"
    a = _img(str(root / "cat" / "a1.png"), 10)
    _img(str(root / "cat" / "sub" / "a2.jpg"), 20, mode="RGB")
    _img(str(root / "dog" / "d1.bmp"), 30)
    _img(str(root / "dog" / "d2.tif"), 40)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root, a


def test_image_folder_source(tmp_path):
    root, a = _folder(tmp_path)
    src = sources.ImageFolderSource(str(root))
    assert src.class_names == ("cat", "dog") and len(src) == 4
    assert src.labels.tolist() == [0, 0, 1, 1]
    r = src[0]
    np.testing.assert_array_equal(r["image"], a)
    assert r["id"] == "cat/a1.png" and r["group"] == r["id"] and r["label"] == 0
    assert src[1]["image"].shape == (10, 12, 3)
    # fixed class order
    src2 = sources.ImageFolderSource(str(root), class_names=["dog", "cat"])
    assert src2.labels.tolist() == [0, 0, 1, 1] and src2[0]["id"].startswith("dog/")


def test_image_folder_via_get_splits(tmp_path):
    root = tmp_path / "f"
    for c in ("neg", "pos"):
        for i in range(10):
            _img(str(root / c / f"{i}.png"), 10 * i)
    cfg = data.default_data_config()
    cfg.name, cfg.root = "image_folder", str(root)
    sp = data.get_splits(cfg, 0)
    assert sp.class_names == ("neg", "pos") and len(sp.train) + len(sp.val) + len(sp.test) == 20
    b = next(data.make_train_iter(sp.train, image_size=8, global_batch_size=4, process_index=0, process_count=1))
    assert b["image"].shape == (4, 8, 8, 3)


def test_csv_source(tmp_path):
    root = tmp_path / "csvdata"
    _img(str(root / "img" / "x.png"), 5)
    _img(str(root / "img" / "y.png"), 6)
    _img(str(root / "img" / "z.png"), 7)
    (root / "labels.csv").write_text("path,label,group,sex\nimg/x.png,sick,p1,F\nimg/y.png,healthy,p1,F\n"
                                     "img/z.png,sick,p2,M\n")
    src = sources.CsvSource(str(root / "labels.csv"))
    assert src.class_names == ("healthy", "sick")
    assert src.labels.tolist() == [1, 0, 1] and list(src.groups) == ["p1", "p1", "p2"]
    assert src[2]["sex"] == "M" and src[0]["image"][1, 1] == 5
    # integer labels, and a root other than the csv folder
    (tmp_path / "int.csv").write_text("path,label\nimg/x.png,0\nimg/y.png,2\nimg/z.png,1\n")
    src = sources.CsvSource(str(tmp_path / "int.csv"), root=str(root))
    assert src.class_names == ("0", "1", "2") and src.labels.tolist() == [0, 2, 1]


def test_decode_modes(tmp_path):
    p16 = str(tmp_path / "deep.png")
    arr16 = (np.arange(20 * 20).reshape(20, 20) * 100).astype(np.uint16)
    Image.fromarray(arr16).save(p16)
    out = sources.decode_image(p16)
    assert out.dtype == np.uint8 and out.shape == (20, 20)
    ref = np.round((arr16 - arr16.min()) / (arr16.max() - arr16.min()) * 255)
    np.testing.assert_array_equal(out, ref.astype(np.uint8))
    prgba = str(tmp_path / "rgba.png")
    Image.fromarray(np.zeros((5, 6, 4), np.uint8)).save(prgba)
    assert sources.decode_image(prgba).shape == (5, 6, 3)
    pp = str(tmp_path / "pal.png")
    Image.fromarray(np.zeros((5, 6), np.uint8)).convert("P").save(pp)
    assert sources.decode_image(pp).shape == (5, 6, 3)


# ------------------------------------------------------------------ bad input
def test_corrupt_and_truncated_images_name_the_path(tmp_path):
    root = tmp_path / "bad"
    _img(str(root / "a" / "ok.png"))
    _img(str(root / "b" / "ok.jpg"), mode="RGB")
    (root / "a" / "garbage.png").write_bytes(b"this is not a png")
    good = (root / "b" / "ok.jpg").read_bytes()
    (root / "b" / "trunc.jpg").write_bytes(good[: len(good) // 2])
    src = sources.ImageFolderSource(str(root))
    bad = [i for i in range(len(src)) if src.ids[i] in ("a/garbage.png", "b/trunc.jpg")]
    for i in bad:
        with pytest.raises(data.DataError) as e:
            src[i]
        assert str(root) in str(e.value) and "skip_corrupt" in str(e.value)
    # Through the pipeline the error still names the file.
    with pytest.raises(Exception, match="garbage.png"):
        list(data.make_eval_iter(src, image_size=8, global_batch_size=4, process_index=0, process_count=1))


def test_skip_corrupt_drops_and_logs(tmp_path, caplog):
    root = tmp_path / "bad"
    _img(str(root / "a" / "ok.png"))
    _img(str(root / "b" / "ok.png"))
    (root / "a" / "garbage.png").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING):
        src = sources.ImageFolderSource(str(root), skip_corrupt=True)
    assert len(src) == 2 and len(src.skipped) == 1 and "garbage.png" in src.skipped[0][0]
    assert "skipped 1 of 3" in caplog.text


def test_missing_folder_and_empty_class(tmp_path):
    with pytest.raises(data.DataError, match="nowhere"):
        sources.ImageFolderSource(str(tmp_path / "nowhere"))
    root = tmp_path / "r"
    _img(str(root / "a" / "x.png"))
    os.makedirs(root / "b")
    with pytest.raises(data.DataError, match=r"class 'b' is empty.*r/b"):
        sources.ImageFolderSource(str(root))
    cfg = data.default_data_config()
    cfg.name, cfg.root = "image_folder", None
    with pytest.raises(data.DataError, match="data.root"):
        data.get_splits(cfg)


def test_csv_naming_missing_file(tmp_path):
    _img(str(tmp_path / "x.png"))
    (tmp_path / "l.csv").write_text("path,label\nx.png,a\nmissing.png,b\n")
    with pytest.raises(data.DataError, match=r"line 3: file .*missing.png does not exist"):
        sources.CsvSource(str(tmp_path / "l.csv"))
    with pytest.raises(data.DataError, match="no examples"):
        # skipping the only 'b' row leaves class 'b' empty
        sources.CsvSource(str(tmp_path / "l.csv"), skip_corrupt=True)
    (tmp_path / "cols.csv").write_text("file,label\nx.png,a\n")
    with pytest.raises(data.DataError, match="missing column 'path'"):
        sources.CsvSource(str(tmp_path / "cols.csv"))
    with pytest.raises(data.DataError, match="CSV file not found"):
        sources.CsvSource(str(tmp_path / "nope.csv"))
    (tmp_path / "lab.csv").write_text("path,label\nx.png,c\n")
    with pytest.raises(data.DataError, match="label 'c' is not one of"):
        sources.CsvSource(str(tmp_path / "lab.csv"), class_names=["a", "b"])


def test_unknown_dataset_name():
    cfg = data.default_data_config()
    cfg.name = "imagenet21k"
    with pytest.raises(data.DataError, match="Unknown dataset name"):
        data.get_splits(cfg)


def test_bucket_tfds_dir_is_refused_with_what_works():
    """ArrayRecord files cannot be read from gs:// (array_record opens local files only)."""
    cfg = data.default_data_config()
    cfg.name, cfg.root, cfg.tfds_data_dir = "breast", "/tmp/not-used", "gs://bucket/tfds"
    with pytest.raises(data.DataError, match="data.tfds_data_dir=gs://bucket/tfds: .*data.root=gs://"):
        data.get_splits(cfg)


@pytest.mark.parametrize("field", ["root", "fold_csv_dir"])
def test_bucket_data_paths_without_gcsfs_name_the_field_and_the_extra(field, monkeypatch):
    from medtransfer_jax import errors, paths

    monkeypatch.setattr(paths, "remote_support_installed", lambda: False)
    cfg = data.default_data_config()
    cfg.name = "breast"
    cfg.root = "/tmp/not-used"
    if field == "fold_csv_dir":
        cfg.folds = "paper"
    cfg[field] = "gs://bucket/busi"
    with pytest.raises(errors.UserError, match=rf"data.{field}=gs://bucket/busi: .*\[gcs\]"):
        data.get_splits(cfg)
