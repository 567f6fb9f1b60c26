"""Dataset parsers on fake files in each dataset's real download layout (made here)."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

from medtransfer_jax import data
from medtransfer_jax.data import builders
from medtransfer_jax.data.builders import chest, thyroid
import test_paths

pytestmark = pytest.mark.fast  # pure NumPy/SciPy: no JAX compilation

# The gs:// bucket stand-in and the no-os.path-on-URLs guard (pytest fixtures).
fake_gcs, no_os_path_on_urls = test_paths.fake_gcs, test_paths.no_os_path_on_urls


def _png(path, value=50, size=8, rgb=False, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shape = (size, size, 3) if rgb else (size, size)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path, format=fmt)


def _cfg(name, root, **kw):
    cfg = data.default_data_config()
    cfg.name, cfg.root = name, str(root)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _load(name, root, **kw):
    return builders.load_source(_cfg(name, root, **kw))


def test_every_builder_has_instructions_and_classes():
    for name, mod in builders.BUILDERS.items():
        assert len(mod.MANUAL_DOWNLOAD_INSTRUCTIONS) > 200 and "<root>" in mod.MANUAL_DOWNLOAD_INSTRUCTIONS
        assert len(mod.CLASS_NAMES) >= 2 and mod.CHANNELS in (1, 3)
        with pytest.raises(data.DataError, match="Expected layout"):
            mod.examples("/definitely/not/here", None)


def test_chest_pooled_with_patient_ids(tmp_path):
    root = tmp_path / "chest_xray"
    files = {
        "train/NORMAL/IM-0761-0001.jpeg": 0, "train/NORMAL/NORMAL2-IM-0761-0002.jpeg": 0,
        "val/NORMAL/IM-0011-0001-0001.jpeg": 0, "test/NORMAL/NORMAL2-IM-0300-0001.jpeg": 0,
        "train/PNEUMONIA/person1_bacteria_1.jpeg": 1, "train/PNEUMONIA/person1_virus_7.jpeg": 1,
        "test/PNEUMONIA/person22_virus_55.jpeg": 1, "val/PNEUMONIA/person1946_bacteria_4875.jpeg": 1,
    }
    for f in files:
        _png(str(root / f), fmt="JPEG")
    (tmp_path / "__MACOSX").mkdir()
    src = _load("chest", tmp_path)  # parent folder also accepted
    assert len(src) == 8 and src.class_names == ("normal", "pneumonia")
    got = dict(zip(src.ids, zip(src.labels, src.groups)))
    assert got["train/NORMAL/IM-0761-0001.jpeg"] == (0, "0761")
    assert got["train/NORMAL/NORMAL2-IM-0761-0002.jpeg"] == (0, "0761")
    assert got["val/NORMAL/IM-0011-0001-0001.jpeg"] == (0, "0011")
    assert got["train/PNEUMONIA/person1_virus_7.jpeg"] == (1, "person1")
    assert got["val/PNEUMONIA/person1946_bacteria_4875.jpeg"] == (1, "person1946")
    assert chest.patient_id("NORMAL2-IM-1269-0001-0002.jpeg") == "1269"


def test_breast_normal_is_benign_and_masks_skipped(tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    for folder, n in (("benign", 3), ("malignant", 2), ("normal", 2)):
        for i in range(1, n + 1):
            _png(str(root / folder / f"{folder} ({i}).png"), 10 * i)
            _png(str(root / folder / f"{folder} ({i})_mask.png"), 255)
        _png(str(root / folder / f"{folder} (1)_mask_1.png"), 255)
    src = _load("breast", tmp_path)
    assert len(src) == 7 and not any("_mask" in i for i in src.ids)
    lab = dict(zip(src.ids, src.labels))
    assert lab["normal/normal (1).png"] == 0 and lab["benign/benign (2).png"] == 0
    assert lab["malignant/malignant (2).png"] == 1
    assert set(src.meta["finding"]) == {"benign", "malignant", "normal"}


def _ddti_xml(number, tirads, age="49", sex="F"):
    t = f"<tirads>{tirads}</tirads>" if tirads is not None else "<tirads/>"
    return (f'<?xml version="1.0" encoding="UTF-8"?><case><number>{number}</number><age>{age}</age>'
            f"<sex>{sex}</sex><composition>solid</composition>{t}<reportbacaf/><mark><image>1</image>"
            "<svg>[]</svg></mark></case>")


def test_thyroid_tirads_rule(tmp_path):
    cases = {"1": "4a", "2": "3", "3": None, "4": "5", "5": "4c", "6": "2"}
    for c, t in cases.items():
        (tmp_path / f"{c}.xml").write_text(_ddti_xml(c, t))
        for k in (1, 2):
            _png(str(tmp_path / f"{c}_{k}.jpg"), fmt="JPEG")
    _png(str(tmp_path / "99_1.jpg"), fmt="JPEG")  # no XML: dropped
    src = _load("thyroid", tmp_path)
    assert len(src) == 12
    lab = {g: l for g, l in zip(src.groups, src.labels)}
    assert lab == {"1": 1, "2": 0, "3": 0, "4": 1, "5": 1, "6": 0}
    assert thyroid.tirads_label("4b") == 1 and thyroid.tirads_label("") == 0
    sp = data.get_splits(_cfg("thyroid", tmp_path, num_folds=3), 0)
    assert not set(sp.train.groups) & set(sp.test.groups)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_mammograms_benign_without_callback(tmp_path):
    header = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
              "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
              "image file path", "cropped image file path", "ROI mask file path"]
    specs = {
        "calc_case_description_train_set.csv": [("P_00005", "Calc-Training_P_00005_RIGHT_CC", 1, "MALIGNANT"),
                                                ("P_00005", "Calc-Training_P_00005_RIGHT_CC", 2, "BENIGN_WITHOUT_CALLBACK")],
        "calc_case_description_test_set.csv": [("P_00038", "Calc-Test_P_00038_LEFT_CC", 1, "BENIGN")],
        "mass_case_description_train_set.csv": [("P_00001", "Mass-Training_P_00001_LEFT_CC", 1, "MALIGNANT")],
        "mass_case_description_test_set.csv": [("P_00016", "Mass-Test_P_00016_LEFT_MLO", 1, "BENIGN_WITHOUT_CALLBACK")],
    }
    for fname, rows in specs.items():
        out = []
        for pid, key, abn, path in rows:
            out.append([pid, 2, "LEFT", "CC", abn, "calcification", "x", "y", 3, path, 2,
                        f"{key}/1.3.6.1.4.1.9590/1.3.6.1.4.1.9590/000000.dcm\n", "crop", "roi"])
            _png(str(tmp_path / "images" / f"{key}.png"))
        _write_csv(tmp_path / fname, header, out)
    # a 16-bit PNG export is fine too
    Image.fromarray((np.arange(64).reshape(8, 8) * 500).astype(np.uint16)).save(
        tmp_path / "images" / "Mass-Test_P_00016_LEFT_MLO.png")
    src = _load("mammograms", tmp_path)
    assert len(src) == 5
    lab = dict(zip(src.ids, src.labels))
    assert lab["Calc-Training_P_00005_RIGHT_CC#1"] == 1 and lab["Calc-Training_P_00005_RIGHT_CC#2"] == 0
    assert lab["Mass-Test_P_00016_LEFT_MLO#1"] == 0 and lab["Calc-Test_P_00038_LEFT_CC#1"] == 0
    assert src.groups.tolist().count("P_00005") == 2
    assert src[4]["image"].dtype == np.uint8 and src[4]["image"].max() == 255


def _mrnet(root, n_train=4, n_valid=2, depth=7):
    rng = np.random.default_rng(0)
    labels = {}
    for subset, cases in (("train", range(n_train)), ("valid", range(n_train, n_train + n_valid))):
        os.makedirs(root / subset / "sagittal", exist_ok=True)
        rows = {t: [] for t in ("abnormal", "acl", "meniscus")}
        for c in cases:
            vol = rng.integers(0, 256, (depth + c % 2, 16, 16)).astype(np.uint8)
            np.save(root / subset / "sagittal" / f"{c:04d}.npy", vol)
            acl, men = int(c % 3 == 1), int(c % 2 == 0)
            labels[f"{c:04d}"] = (acl, men)
            rows["acl"].append([f"{c:04d}", acl])
            rows["meniscus"].append([f"{c:04d}", men])
            rows["abnormal"].append([f"{c:04d}", int(acl or men)])
        for t, r in rows.items():
            with open(root / f"{subset}-{t}.csv", "w", newline="") as f:
                csv.writer(f).writerows(r)
    return labels


def test_knee_mrnet_volumes_paper_and_exclusive_rules(tmp_path):
    root = tmp_path / "MRNet-v1.0"
    labels = _mrnet(root)
    src = _load("knee", tmp_path, knee_num_slices=3)
    assert src.class_names == ("normal", "acl", "meniscus")
    assert len(src) == 6 * 2 * 3  # cases x views x slices
    for i in range(len(src)):
        case, view = src.groups[i], src.meta["view"][i]
        acl, men = labels[case]
        want = (1 if acl else 0) if view == "acl" else (2 if men else 0)
        assert src.labels[i] == want
    r = src[0]
    vol = np.load(root / "train" / "sagittal" / "0000.npy")
    assert r["image"].shape == (16, 16)
    np.testing.assert_array_equal(r["image"], vol[src.meta["slice"][0]])
    assert sorted(set(src.meta["slice"][src.groups == "0000"])) == [2, 3, 4]  # central 3 of 7
    ex = _load("knee", tmp_path, knee_num_slices=0, knee_label_rule="exclusive")
    assert len(ex) == sum(7 + c % 2 for c in range(6))
    lab = dict(zip(ex.groups, ex.labels))
    assert lab == {c: (1 if a else (2 if m else 0)) for c, (a, m) in labels.items()}
    sp = data.get_splits(_cfg("knee", tmp_path, num_folds=2, heldout_val_fraction=1.0), 0)
    assert not set(sp.train.groups) & set(sp.test.groups)


def test_knee_paper_png_layout(tmp_path):
    root = tmp_path / "knee"
    _mrnet(root, n_train=3, n_valid=1)
    for view in ("acl", "meniscus"):
        for c in range(4):
            _png(str(root / "images" / view / f"{c:04d}_sagittal_{10 + c}.000000.png"))
    src = _load("knee", root)
    assert len(src) == 8
    lab = dict(zip(src.ids, src.labels))
    assert lab["images/acl/0001_sagittal_11.000000.png"] == 1      # case 1: ACL tear
    assert lab["images/meniscus/0001_sagittal_11.000000.png"] == 0  # no meniscus tear
    assert lab["images/meniscus/0002_sagittal_12.000000.png"] == 2


def test_isic_one_hot_and_lesion_groups(tmp_path):
    names = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    rows = []
    for i in range(9):
        img = f"ISIC_{24306 + i:07d}"
        _png(str(tmp_path / "ISIC2018_Task3_Training_Input" / f"{img}.jpg"), rgb=True, fmt="JPEG")
        onehot = [0.0] * 7
        onehot[i % 7] = 1.0
        rows.append([img] + onehot)
    os.makedirs(tmp_path / "ISIC2018_Task3_Training_GroundTruth")
    _write_csv(tmp_path / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv",
               ["image"] + list(names), rows)
    src = _load("isic", tmp_path)
    assert src.class_names == names and src.labels.tolist() == [i % 7 for i in range(9)]
    assert src[0]["image"].shape == (8, 8, 3) and src.groups[0] == src.ids[0]
    _write_csv(tmp_path / "ISIC2018_Task3_Training_LesionGroupings.csv", ["image", "lesion_id", "diagnosis_confirm_type"],
               [[r[0], f"HAM_{i // 3}", "histo"] for i, r in enumerate(rows)])
    src = _load("isic", tmp_path)
    assert src.groups.tolist()[:4] == ["HAM_0", "HAM_0", "HAM_0", "HAM_1"]
    rows[0][2] = 1.0  # two hot
    _write_csv(tmp_path / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv",
               ["image"] + list(names), rows)
    with pytest.raises(data.DataError, match="line 2: row is not one-hot"):
        _load("isic", tmp_path)


def test_pcam_hdf5_sampling(tmp_path):
    h5py = pytest.importorskip("h5py")
    sizes = {"train": 30, "valid": 10, "test": 10}
    rng = np.random.default_rng(0)
    allx = []
    for split, n in sizes.items():
        x = rng.integers(0, 256, (n, 96, 96, 3)).astype(np.uint8)
        y = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)
        with h5py.File(tmp_path / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f.create_dataset("x", data=x)
        with h5py.File(tmp_path / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f.create_dataset("y", data=y)
        allx.append(x)
    allx = np.concatenate(allx)
    src = _load("pcam", tmp_path, pcam_num_examples=20, pcam_sample_seed=22)
    assert len(src) == 20 and src.class_names == ("no", "yes")
    keep = np.sort(np.random.RandomState(22).choice(50, 20, replace=False))
    offsets = {"train": 0, "valid": 30, "test": 40}
    got = [offsets[i.split("/")[0]] + int(i.split("/")[1]) for i in src.ids]
    assert got == keep.tolist()
    for j in (0, 7, 19):
        np.testing.assert_array_equal(src[j]["image"], allx[got[j]])
    # Readable through worker-less grain pipeline (loader pickles / reopens)
    b = next(data.make_train_iter(src, image_size=32, global_batch_size=4, process_index=0, process_count=1))
    assert b["image"].shape == (4, 32, 32, 3)


def test_nih_cxr14_labels_views_and_metadata(tmp_path):
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
    rows = [
        ["00000001_000.png", "Cardiomegaly|Atelectasis", 0, 1, 58, "M", "PA"],
        ["00000001_001.png", "No Finding", 1, 1, 58, "M", "PA"],
        ["00000002_000.png", "No Finding", 0, 2, 81, "F", "PA"],
        ["00000003_000.png", "Atelectasis", 0, 3, 30, "F", "AP"],      # AP: dropped
        ["00000004_000.png", "Effusion", 0, 4, 45, "F", "PA"],          # other finding: dropped
        ["00000005_000.png", "Atelectasis", 0, 5, 66, "F", "PA"],
    ]
    _write_csv(tmp_path / "Data_Entry_2017.csv", header, [r + [1024, 1024, 0.14, 0.14] for r in rows])
    for i, r in enumerate(rows):
        sub = "images_001" if i < 3 else "images_002"
        _png(str(tmp_path / sub / "images" / r[0]))
    src = _load("nih_cxr14", tmp_path)
    assert src.class_names == ("no", "yes") and len(src) == 4
    assert list(src.ids) == ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000005_000.png"]
    assert src.labels.tolist() == [1, 0, 0, 1] and list(src.groups) == ["1", "1", "2", "5"]
    assert list(src.meta["sex"]) == ["M", "M", "F", "F"] and src.meta["age"].tolist() == [58, 58, 81, 66]
    assert list(src.meta["age_bucket"]) == ["<60", "<60", ">=60", ">=60"]
    # a CSV row whose image is missing: clear error, or skipped with the flag
    os.remove(tmp_path / "images_002" / "images" / "00000005_000.png")
    with pytest.raises(data.DataError, match="00000005_000.png"):
        _load("nih_cxr14", tmp_path)
    assert len(_load("nih_cxr14", tmp_path, skip_corrupt=True)) == 3


def test_lidc_slice_csv(tmp_path):
    rows = []
    for i in range(6):
        rel = f"images/LIDC-IDRI-{i // 2:04d}_nodule{i % 2}.png"
        _png(str(tmp_path / rel))
        rows.append([rel, "malignant" if i % 3 == 0 else "benign", f"LIDC-IDRI-{i // 2:04d}", 4 if i % 3 == 0 else 2])
    _write_csv(tmp_path / "lidc_slices.csv", ["path", "label", "patient_id", "malignancy"], rows)
    src = _load("lidc", tmp_path)
    assert src.labels.tolist() == [1, 0, 0, 1, 0, 0] and src.groups[1] == "LIDC-IDRI-0000"
    assert src.meta["malignancy"][0] == "4"


def test_tfds_prepare_and_read_back_without_tensorflow(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from medtransfer_jax.data.builders import tfds_builder
    manual = tmp_path / "busi"
    for folder, n in (("benign", 3), ("malignant", 3), ("normal", 2)):
        for i in range(1, n + 1):
            _png(str(manual / folder / f"{folder} ({i}).png"), 20 * i + (100 if folder == "malignant" else 0))
    raw = _load("breast", manual)
    b = tfds_builder.prepare("breast", str(manual), str(tmp_path / "tfds"))
    assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(b.data_dir))
    assert "BUSI" in b.MANUAL_DOWNLOAD_INSTRUCTIONS or "Breast" in b.MANUAL_DOWNLOAD_INSTRUCTIONS
    src = _load("breast", manual, tfds_data_dir=str(tmp_path / "tfds"))
    assert len(src) == len(raw) and sorted(src.ids) == sorted(raw.ids)
    by_id = {raw.ids[i]: i for i in range(len(raw))}
    for j in range(len(src)):
        i = by_id[src.ids[j]]
        assert src.labels[j] == raw.labels[i] and src.meta["finding"][j] == raw.meta["finding"][i]
        np.testing.assert_array_equal(src[j]["image"], raw[i]["image"])


def test_a_tfds_prepared_dataset_keeps_its_file_paths_for_the_papers_csvs(tmp_path):
    """ISIC prepared with TFDS: its examples keep the download's relative paths (the ids
    'ISIC_0024306' name no file, so no paper CSV row matched), and fold CSVs split it."""
    pytest.importorskip("tensorflow_datasets")
    from medtransfer_jax.data.builders import tfds_builder
    manual = tmp_path / "isic"
    _layout_isic(manual)
    raw = _load("isic", manual)
    tfds_builder.prepare("isic", str(manual), str(tmp_path / "tfds"))
    src = _load("isic", manual, tfds_data_dir=str(tmp_path / "tfds"))
    assert dict(zip(src.ids, src.relpaths)) == dict(zip(raw.ids, raw.relpaths))
    assert all(r.endswith(".jpg") for r in src.relpaths) and "_relpath" not in src.meta
    d = tmp_path / "csvs"
    d.mkdir()
    names = sorted(os.path.basename(r) for r in raw.relpaths)
    for split, part in (("train", names[:5]), ("val", names[5:])):
        _write_csv(d / f"{split}_fold1.csv", ["", "path"],
                   [[j, f"../../data/ISIC2018/{n}"] for j, n in enumerate(part)])
    sp = data.get_splits(_cfg("isic", manual, folds="paper", fold_csv_dir=str(d),
                              tfds_data_dir=str(tmp_path / "tfds")), fold=0)
    assert (len(sp.train), len(sp.val)) == (5, len(names) - 5)

def test_get_splits_reads_the_papers_fold_csvs(tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    names = []
    for folder, n in (("benign", 4), ("malignant", 3), ("normal", 3)):
        for i in range(1, n + 1):
            _png(str(root / folder / f"{folder} ({i}).png"))
            names.append((f"{folder} ({i}).png", "malignant" if folder == "malignant" else "benign"))
    folds = tmp_path / "revisiting-transfer" / "data" / "breast"
    os.makedirs(folds)
    parts = {"train": names[:6], "val": names[6:8], "test": names[8:]}
    for split, rows in parts.items():
        _write_csv(folds / f"{split}_fold3.csv", ["", "path", "class"],
                   [[i, f"../../../data/breast/{f}", c] for i, (f, c) in enumerate(rows)])
    sp = data.get_splits(_cfg("breast", tmp_path, folds="paper", fold_csv_dir=str(folds)), fold=2)
    for split in ("train", "val", "test"):
        got = sorted(os.path.basename(i) for i in getattr(sp, split).ids)
        assert got == sorted(f for f, _ in parts[split])
    assert sp.info["folds"] == "paper"
    # Feb-2023 layout (train/val only): the val fold is also the test.
    os.remove(folds / "test_fold3.csv")
    feb = data.get_splits(_cfg("breast", tmp_path, folds="paper", fold_csv_dir=str(folds)), fold=2)
    assert list(feb.test.ids) == list(feb.val.ids) and len(feb.val) == 2
    # kfold ignores the CSV folder (the project's own split).
    own = data.get_splits(_cfg("breast", tmp_path, folds="kfold", num_folds=2,
                               fold_csv_dir=str(folds)), fold=0)
    assert own.info["folds"] == "kfold"


def test_paper_folds_missing_folder_names_it_and_the_fix(tmp_path):
    """folds='paper' never falls back silently: the error names the folder, where the CSVs
    come from and the kfold switch."""
    root = tmp_path / "Dataset_BUSI_with_GT"
    for folder in ("benign", "malignant"):
        for i in range(1, 3):
            _png(str(root / folder / f"{folder} ({i}).png"))
    missing = str(tmp_path / "nowhere" / "breast")
    cfg = _cfg("breast", tmp_path, folds="paper", fold_csv_dir=missing,
               fold_csv_origin="github.com/DovileDo/revisiting-transfer data/breast/")
    with pytest.raises(data.DataError) as e:
        data.get_splits(cfg, fold=0)
    msg = str(e.value)
    assert missing in msg and "DovileDo/revisiting-transfer data/breast/" in msg
    assert "--config.data.fold_csv_dir" in msg and "data.folds=kfold" in msg


def _nih(root, n_pos=6, n_neg=6, others=()):
    """A fake NIH CXR14 download: Atelectasis (F) and No Finding (M/F) PA images, then
    ``others``: (findings, view) rows the label rule leaves out."""
    header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
              "Patient Gender", "View Position"]
    rows = []
    kinds = [("Atelectasis" if i < n_pos else "No Finding", "PA")
             for i in range(n_pos + n_neg)] + list(others)
    for i, (findings, view) in enumerate(kinds):
        rows.append([f"{i:08d}_000.png", findings, 0, i + 1, 50, "MF"[i % 2], view])
        _png(str(root / "images" / rows[-1][0]), value=10 + i)
    _write_csv(root / "Data_Entry_2017.csv", header, rows)
    return rows


def test_source_matters_csvs_fixed_test_and_csv_labels(tmp_path):
    """The paper's chest-14 CSVs: train/val per fold, one fixed test.csv for every fold,
    classes YES/NO taken from the CSV (data.fold_csv_labels='csv'). Their rows include
    images with other findings and views (YES/NO came from an unpublished rule): the CSVs
    pick them (they were dropped by the label rule, so every fold failed to load)."""
    rows = _nih(tmp_path / "nih", others=[("Cardiomegaly|Effusion", "PA"),
                                           ("Pneumothorax", "AP")])
    names = [r[0] for r in rows]
    d = tmp_path / "source-matters" / "data" / "chest14"
    os.makedirs(d)
    # The CSV calls image 0 (Atelectasis in the dataset) 'NO': the CSV wins in 'csv' mode.
    lab = {n: ("YES" if i < 6 else "NO") for i, n in enumerate(names)}
    lab[names[0]] = "NO"
    lab[names[12]], lab[names[13]] = "YES", "NO"     # other findings, an AP view
    test = names[:2] + names[6:8]
    for k in (1, 2):
        rest = [n for n in names if n not in test]
        val = rest[k::4]
        train = [n for n in rest if n not in val]
        for split, subset in (("train", train), ("val", val)):
            _write_csv(d / f"{split}_fold{k}.csv", ["", "path", "pid", "class"],
                       [[j, n, int(n[:8]) + 1, lab[n]] for j, n in enumerate(subset)])
    _write_csv(d / "test.csv", ["", "path", "pid", "class"],
               [[j, n, int(n[:8]) + 1, lab[n]] for j, n in enumerate(test)])
    cfg = _cfg("nih_cxr14", tmp_path / "nih", folds="paper", fold_csv_dir=str(d),
               fold_csv_labels="csv")
    sp0, sp1 = data.get_splits(cfg, fold=0), data.get_splits(cfg, fold=1)
    assert sorted(sp0.test.ids) == sorted(sp1.test.ids) == sorted(test)
    assert sorted(sp0.val.ids) != sorted(sp1.val.ids)
    got = dict(zip(sp0.test.ids, sp0.test.labels))
    assert got[names[0]] == 0 and got[names[1]] == 1 and got[names[6]] == 0
    everyone = dict(zip(list(sp0.train.ids) + list(sp0.val.ids),
                        list(sp0.train.labels) + list(sp0.val.labels)))
    assert everyone[names[12]] == 1 and everyone[names[13]] == 0
    # 'check' mode keeps the label rule: it refuses the rows the rule leaves out or labels
    # otherwise, naming them.
    cfg.fold_csv_labels = "check"
    with pytest.raises(data.DataError, match="(disagree with the dataset's label rule|"
                                             "rows name files not found)"):
        data.get_splits(cfg, fold=0)


def test_knee_png_layout_required_by_the_paper_protocol(tmp_path):
    root = tmp_path / "MRNet-v1.0"
    _mrnet(root)
    assert len(_load("knee", tmp_path, knee_layout="any")) > 0     # npy volumes accepted
    with pytest.raises(data.DataError, match=r"5,222 PNGs in images/acl and images/meniscus"):
        _load("knee", tmp_path, knee_layout="png")


def test_lidc_median_malignancy_rule(tmp_path):
    rows = []
    for i, rating in enumerate([1, 2, 3, 4, 5, 3]):
        rel = f"images/n{i}.png"
        _png(str(tmp_path / rel))
        rows.append([rel, "benign" if i % 2 else "malignant", f"P{i // 2}", rating])
    _write_csv(tmp_path / "lidc_slices.csv", ["path", "label", "patient_id", "malignancy"], rows)
    src = _load("lidc", tmp_path, lidc_label_rule="median_malignancy")
    assert list(src.ids) == ["images/n0.png", "images/n1.png", "images/n3.png", "images/n4.png"]
    assert src.labels.tolist() == [0, 0, 1, 1]
    assert _load("lidc", tmp_path).labels.tolist() == [1, 0, 1, 0, 1, 0]   # the label column


def test_source_matters_sex_experiment_csvs(tmp_path):
    """kind='sampled' with the paper's gender CSVs: their train/val and the one fixed,
    reversed test (the only extra test, 'ood'); classes named by the findings."""
    rows = _nih(tmp_path / "nih", n_pos=6, n_neg=6)
    names = [r[0] for r in rows]
    finding = {r[0]: ("Atelectasis" if r[1] == "Atelectasis" else "No Finding") for r in rows}
    gender = tmp_path / "sm" / "chest14" / "gender"
    os.makedirs(gender / "F_50")
    test, rest = names[:2] + names[6:8], names[2:6] + names[8:]
    for split, subset in (("train", rest[:-2]), ("val", rest[-2:])):
        _write_csv(gender / "F_50" / f"{split}_fold1.csv", ["", "path", "class", "pid", "Patient Gender"],
                   [[j, n, finding[n], int(n[:8]) + 1, "F"] for j, n in enumerate(subset)])
    _write_csv(gender / "test.csv", ["", "path", "class", "pid", "Patient Gender"],
               [[j, n, finding[n], int(n[:8]) + 1, "M"] for j, n in enumerate(test)])
    cfg = _cfg("nih_cxr14", tmp_path / "nih", folds="paper", fold_csv_dir=str(gender / "F_50"),
               fold_csv_test=str(gender / "test.csv"), fold_csv_labels="csv")
    cfg.confounder.kind, cfg.confounder.p = "sampled", 0.5
    sp = data.get_splits(cfg, fold=0)
    assert set(sp.extra_tests) == {"ood"} and sorted(sp.extra_tests["ood"].ids) == sorted(test)
    assert (len(sp.train), len(sp.val)) == (6, 2)
    got = dict(zip(sp.test.ids, sp.test.labels))
    assert [got[n] for n in test] == [1, 1, 0, 0]         # Atelectasis positive, No Finding 0


# ---------------------------------------------------------------------------------------
# The same download layouts inside a bucket (gs://), read through medtransfer_jax.paths
# ---------------------------------------------------------------------------------------

def _layout_chest(root):
    for f in ("train/NORMAL/IM-0761-0001.jpeg", "test/NORMAL/NORMAL2-IM-0300-0001.jpeg",
              "val/NORMAL/IM-0011-0001-0001.jpeg", "train/PNEUMONIA/person1_bacteria_1.jpeg",
              "test/PNEUMONIA/person22_virus_55.jpeg"):
        _png(str(root / "chest_xray" / f), value=len(f), fmt="JPEG")


def _layout_breast(root):
    for folder, n in (("benign", 2), ("malignant", 2), ("normal", 1)):
        for i in range(1, n + 1):
            _png(str(root / "Dataset_BUSI_with_GT" / folder / f"{folder} ({i}).png"), 10 * i)
            _png(str(root / "Dataset_BUSI_with_GT" / folder / f"{folder} ({i})_mask.png"), 255)


def _layout_thyroid(root):
    os.makedirs(root)
    for c, t in {"1": "4a", "2": "3", "3": "5"}.items():
        (root / f"{c}.xml").write_text(_ddti_xml(c, t))
        _png(str(root / f"{c}_1.jpg"), value=int(c) * 30, fmt="JPEG")


def _layout_mammograms(root):
    os.makedirs(root)
    header = ["patient_id", "breast_density", "image view", "abnormality id", "abnormality type",
              "pathology", "image file path"]
    for k, fname in enumerate(("calc_case_description_train_set.csv", "calc_case_description_test_set.csv",
                               "mass_case_description_train_set.csv", "mass_case_description_test_set.csv")):
        key = f"Case_P_{k:05d}_LEFT_CC"
        _write_csv(root / fname, header, [[f"P_{k}", 2, "CC", 1, "mass", ("BENIGN", "MALIGNANT")[k % 2],
                                           f"{key}/1.2/3.4/000000.dcm\n"]])
        _png(str(root / "images" / f"{key}.png"), value=40 * k)


def _layout_knee(root):
    _mrnet(root / "MRNet-v1.0", n_train=2, n_valid=2, depth=5)


def _layout_knee_png(root):
    _mrnet(root, n_train=1, n_valid=1)
    for view in ("acl", "meniscus"):
        for c in range(2):
            _png(str(root / "images" / view / f"{c:04d}_sagittal_{10 + c}.000000.png"), value=c)


def _layout_isic(root):
    rows = []
    for i in range(7):
        img = f"ISIC_{24306 + i:07d}"
        _png(str(root / "ISIC2018_Task3_Training_Input" / f"{img}.jpg"), value=i, rgb=True, fmt="JPEG")
        rows.append([img] + [float(k == i) for k in range(7)])
    os.makedirs(root / "ISIC2018_Task3_Training_GroundTruth")
    _write_csv(root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv",
               ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"], rows)


def _layout_pcam(root):
    h5py = pytest.importorskip("h5py")
    os.makedirs(root)
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("valid", 2), ("test", 2)):
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f.create_dataset("x", data=rng.integers(0, 256, (n, 96, 96, 3)).astype(np.uint8))
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f.create_dataset("y", data=(np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1))


def _layout_nih(root):
    _nih(root, n_pos=3, n_neg=3)


def _layout_lidc(root):
    rows = []
    for i in range(4):
        rel = f"images/LIDC-IDRI-{i // 2:04d}_nodule{i % 2}.png"
        _png(str(root / rel), value=i)
        rows.append([rel, ("benign", "malignant")[i % 2], f"LIDC-IDRI-{i // 2:04d}"])
    _write_csv(root / "lidc_slices.csv", ["path", "label", "patient_id"], rows)


def _layout_image_folder(root):
    for cls in ("a", "b"):
        for i in range(2):
            _png(str(root / cls / "sub" / f"{cls}{i}.png"), value=i)


BUCKET_LAYOUTS = {"chest": _layout_chest, "breast": _layout_breast, "thyroid": _layout_thyroid,
                  "mammograms": _layout_mammograms, "knee": _layout_knee, "knee_png": _layout_knee_png,
                  "isic": _layout_isic, "pcam": _layout_pcam, "nih_cxr14": _layout_nih,
                  "lidc": _layout_lidc, "image_folder": _layout_image_folder}


def test_bucket_layouts_cover_every_builder():
    assert set(builders.BUILDERS) <= {k.split("_png")[0] for k in BUCKET_LAYOUTS}


@pytest.mark.parametrize("layout", sorted(BUCKET_LAYOUTS))
def test_every_builder_reads_its_layout_from_a_bucket(layout, fake_gcs, no_os_path_on_urls,
                                                      monkeypatch):
    """The download layout copied into a bucket (stand-in) parses to the same examples as
    the local folder, every image decodes to the same pixels, every bucket folder is
    listed at most once, and no gs:// path reaches os.path / open (the guard)."""
    from medtransfer_jax import paths
    from medtransfer_jax.data import integrity

    name = layout.split("_png")[0]
    local = fake_gcs / "bucket" / "data" / layout
    BUCKET_LAYOUTS[layout](local)
    url = f"gs://bucket/data/{layout}"
    kw = {"pcam_num_examples": 0, "knee_num_slices": 2}
    listed = []
    scandir = paths.scandir
    monkeypatch.setattr(paths, "scandir", lambda folder: listed.append(str(folder)) or scandir(folder))
    remote = _load(name, url, **kw)
    assert listed and all(p.startswith("gs://bucket/") for p in listed)
    assert len(listed) == len(set(listed)), sorted(listed)      # each folder listed once
    here = _load(name, local, **kw)
    assert len(remote) == len(here) > 0
    assert list(remote.ids) == list(here.ids) and remote.labels.tolist() == here.labels.tolist()
    assert list(remote.groups) == list(here.groups) and remote.relpaths == here.relpaths
    assert all(p.startswith(url + "/") for p in remote.paths)
    for i in range(len(remote)):
        np.testing.assert_array_equal(remote[i]["image"], here[i]["image"])
    sp = data.get_splits(_cfg(name, url, num_folds=2, heldout_val_fraction=1.0, **kw), 0)
    assert integrity.check_splits(sp, num_threads=2) > 0


def test_bucket_paper_folds_and_a_bad_image_are_reported_with_their_urls(fake_gcs,
                                                                       no_os_path_on_urls):
    """fold_csv_dir in the bucket; a corrupt and a missing file are named by URL."""
    from medtransfer_jax.data import integrity

    _layout_breast(fake_gcs / "bucket" / "busi")
    folds = fake_gcs / "bucket" / "folds"
    os.makedirs(folds)
    names = [("benign (1).png", "benign"), ("benign (2).png", "benign"), ("malignant (1).png", "malignant"),
             ("malignant (2).png", "malignant"), ("normal (1).png", "benign")]
    for split, rows in (("train", names[:3]), ("val", names[3:4]), ("test", names[4:])):
        _write_csv(folds / f"{split}_fold1.csv", ["", "path", "class"],
                   [[i, f"../data/breast/{f}", c] for i, (f, c) in enumerate(rows)])
    cfg = _cfg("breast", "gs://bucket/busi", folds="paper", fold_csv_dir="gs://bucket/folds")
    sp = data.get_splits(cfg, 0)
    assert sp.info["folds"] == "paper" and [os.path.basename(i) for i in sp.test.ids] == ["normal (1).png"]
    bad = fake_gcs / "bucket" / "busi" / "Dataset_BUSI_with_GT" / "benign" / "benign (2).png"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(data.DataError, match=r"1 of 5 .*gs://bucket/busi/Dataset_BUSI_with_GT/"
                                             r"benign/benign \(2\).png"):
        integrity.check_splits(data.get_splits(cfg, 0), num_threads=2)
    os.remove(bad)
    with pytest.raises(data.DataError,
                       match=r"gs://bucket/folds/train_fold1.csv: 1 of 3 rows .*benign \(2\)"):
        data.get_splits(cfg, 0)
    # name='csv' with the CSV in the bucket: relative rows resolve in the bucket, a missing
    # file is named by its URL.
    _write_csv(fake_gcs / "bucket" / "busi" / "list.csv", ["path", "label"],
               [["Dataset_BUSI_with_GT/benign/benign (1).png", "b"],
                ["Dataset_BUSI_with_GT/malignant/malignant (1).png", "m"]])
    csv_cfg = _cfg("csv", "gs://bucket/busi", csv_path="gs://bucket/busi/list.csv")
    src = builders.load_source(csv_cfg)
    assert list(src.paths) == ["gs://bucket/busi/Dataset_BUSI_with_GT/benign/benign (1).png",
                               "gs://bucket/busi/Dataset_BUSI_with_GT/malignant/malignant (1).png"]
    assert src[1]["image"].shape == (8, 8) and src.labels.tolist() == [0, 1]
    with open(fake_gcs / "bucket" / "busi" / "list.csv", "a") as f:
        f.write("Dataset_BUSI_with_GT/benign/benign (2).png,b\n")
    with pytest.raises(data.DataError, match=r"line 4: file gs://bucket/busi/Dataset_BUSI_with_GT/"
                                             r"benign/benign \(2\).png does not exist"):
        builders.load_source(csv_cfg)
    assert len(data.get_splits(_cfg("breast", "gs://bucket/busi", folds="kfold", num_folds=2,
                                    skip_corrupt=True), 0).train) > 0


def test_pcam_hdf5_read_as_the_papers_png_export(tmp_path):
    """With the paper's fold CSVs, the HDF5 download is read as pcam_converter.py exported
    it (train, valid, test into one folder as <i>_label=<y>.png, a later split overwriting
    an earlier name), nothing is sampled, and the CSV rows match (8,000 of 8,000 rows were
    unmatched: the HDF5 examples were named <file>/<i>)."""
    h5py = pytest.importorskip("h5py")
    labels = {"train": [0, 1, 0, 1, 1, 0], "valid": [0, 0, 1], "test": [1, 0]}
    pixels = {}
    for k, (split, ys) in enumerate(labels.items()):
        x = np.stack([np.full((96, 96, 3), 10 * k + i, np.uint8) for i in range(len(ys))])
        pixels[split] = x
        with h5py.File(tmp_path / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f.create_dataset("x", data=x)
        with h5py.File(tmp_path / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f.create_dataset("y", data=np.asarray(ys, np.uint8).reshape(-1, 1, 1, 1))
    # the export, simulated independently: the last writer of each name
    last = {}
    for split, ys in labels.items():
        for i, y in enumerate(ys):
            last[f"{i}_label={y}.png"] = (split, i)
    src = _load("pcam", tmp_path, folds="paper", pcam_num_examples=3)
    assert sorted(src.relpaths) == sorted(last)                   # nothing sampled away
    for j, name in enumerate(src.relpaths):
        split, i = last[name]
        np.testing.assert_array_equal(src[j]["image"], pixels[split][i])
        assert src.labels[j] == int(name[-5])
    d = tmp_path / "csvs"
    d.mkdir()
    names = sorted(last)
    _write_csv(d / "train_fold1.csv", ["", "path", "class"],
               [[j, f"../PCam/png_images/{n}", "yes" if n[-5] == "1" else "no"]
                for j, n in enumerate(names[:5])])
    _write_csv(d / "val_fold1.csv", ["", "path", "class"],
               [[j, f"../PCam/png_images/{n}", "yes" if n[-5] == "1" else "no"]
                for j, n in enumerate(names[5:])])
    cfg = _cfg("pcam", tmp_path, folds="paper", fold_csv_dir=str(d), pcam_num_examples=3)
    sp = data.get_splits(cfg, fold=0)
    assert len(sp.train) == 5 and len(sp.val) == len(names) - 5
