"""The real-study configs: grids, one-argument subsets, each run's protocol, pre-flight,
and the filters-only study end to end on two tiny weights dirs."""
import importlib.util
import math
import os

import _train_utils
import jax
import pytest

from medtransfer_jax.models import resnet
from medtransfer_jax.studies import runner, tables
from medtransfer_jax.training import sweep
from medtransfer_jax.weights import checkpoint

CONFIGS = os.path.join(_train_utils.REPO, "configs")


def _config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def test_revisiting_grid_and_subset(tmp_path):
    full = runner.Study(_config("study_revisiting"), str(tmp_path)).finetune_runs()
    assert len(full) == 7 * 5 * 5 == 175
    cfg = _config("study_revisiting", f"targets=breast,thyroid,folds=0,1,data={tmp_path}/d")
    study = runner.Study(cfg, str(tmp_path / "wd"))
    runs = study.finetune_runs()
    assert len(runs) == 2 * 5 * 2
    by_name = {r.name: r for r in runs}
    frz = sweep.load_config(by_name["breast/imagenet_frz/fold1"])
    assert frz.train.freeze == "two_phase" and frz.data.fold == 1
    assert frz.model.init == study.source_dir("imagenet") == study.source_dir("imagenet_frz")
    assert frz.data.root == str(tmp_path / "d" / "breast") and frz.train.lr == 1e-3
    rnd = sweep.load_config(by_name["thyroid/random/fold0"])
    assert rnd.train.freeze == "none" and rnd.model.init == study.source_dir("random")
    assert cfg.published == "revisiting" and cfg.analysis.auc_metric == "auc_keras"
    assert [list(p) for p in cfg.analysis.cca.between] == [
        ["imagenet", "radimagenet"], ["imagenet_frz", "radimagenet_frz"]]
    feb = _config("study_revisiting", "targets=breast,protocol=feb2023,freeze=no")
    feb_runs = runner.Study(feb, str(tmp_path)).finetune_runs()
    assert len(feb_runs) == 3 * 5 and sweep.load_config(feb_runs[0]).train.lr == 1e-5
    # the published tables are the feb2023 scripts': both declare them, the report compares
    # only a feb2023 study (tests/test_study_report.py)
    assert (feb.published, feb.protocol, cfg.protocol) == ("revisiting", "feb2023", "sep2023")
    with pytest.raises(ValueError, match="freeze='true'; choose both"):
        _config("study_revisiting", "freeze=true")    # it silently dropped the frozen runs


def test_revisiting_preflight_lists_missing_files(tmp_path):
    cfg = _config("study_revisiting", f"targets=breast,thyroid,folds=0,data={tmp_path}/d,"
                                      f"imagenet={tmp_path}/in.h5,radimagenet={tmp_path}/rad.h5")
    pf = runner.preflight(cfg, str(tmp_path / "wd"))
    # two .h5 files, two data roots, two fold-CSV folders (folds=paper is the default)
    assert len(pf.missing) == 6, pf.missing
    assert any("in.h5" in m for m in pf.missing) and any("rad.h5" in m for m in pf.missing)
    assert sum("data root" in m for m in pf.missing) == 2
    assert sum("fold_csv_dir" in m for m in pf.missing) == 2
    # 5 sources x 1 fold per target, <= 30 epochs over 4/5 of BUSI (780) / DDTI (480), each
    # epoch ceil(N / 256) full batches of 256 (train.epoch_steps=ceil, as Keras ran them)
    epoch = {n: math.ceil(0.8 * n / 256) * 256 for n in (780, 480)}
    assert epoch == {780: 768, 480: 512}
    assert pf.runs == 10 and pf.images == 5 * 30 * epoch[780] + 5 * 30 * epoch[480]
    with pytest.raises(ValueError, match="unknown argument 'target'"):
        _config("study_revisiting", "target=breast")
    with pytest.raises(ValueError, match="targets \\['lung'\\] unknown"):
        _config("study_revisiting", "targets=lung")


def test_the_full_revisiting_grid_fits_a_vm_disk_once_done_runs_drop_their_checkpoints(
        tmp_path):
    """175 ResNet50 fine-tunes: each done run keeps its two float32 exports; only the runs
    in flight (and runs told to keep them) hold their three checkpoints of params + Adam."""
    from medtransfer_jax.studies import preflight as pre
    cfg = _config("study_revisiting")
    params = pre.param_count(cfg.model.depth, cfg.model.width, cfg.model.layout)
    assert 23_000_000 < params < 24_000_000        # headless ResNet50
    pf = runner.preflight(cfg, str(tmp_path / "wd"))
    assert pf.runs == 175
    assert pf.bytes_needed == params * (175 * 2 * 4 + 1 * 3 * 3 * 4)
    assert pf.bytes_needed < 35e9                  # it was ~166 GB with every checkpoint kept
    three = runner.preflight(cfg, str(tmp_path / "wd"), mode="subprocess", parallel=3)
    assert three.bytes_needed == params * (175 * 2 * 4 + 3 * 3 * 3 * 4)
    cfg.targets.breast.overrides = list(cfg.targets.breast.get("overrides", [])) + [
        "checkpoint.keep_when_done=True"]
    kept = runner.preflight(cfg, str(tmp_path / "wd"))
    assert kept.bytes_needed == params * (175 * 2 * 4 + (25 + 1) * 3 * 3 * 4)


def test_every_paper_config_keeps_its_split_on_the_device_and_it_fits_a_16_gib_chip():
    """The studies' datasets are small, so every target decodes once and augments in the
    jitted step (the grain path fed an H200 a third of its step rate); the largest whole
    dataset at its protocol's size stays under device_cache's 40 % of a 16 GiB chip."""
    from medtransfer_jax.data import device_cache
    from medtransfer_jax.data.builders import get_builder
    from medtransfer_jax.studies.preflight import DATASET_SIZES
    folders = {"revisiting": sorted(DATASET_SIZES), "source_matters": ["lowpass", "noise",
                                                                     "sampled", "tag"]}
    for folder, names in folders.items():
        for name in names:
            for protocol in (("sep2023", "feb2023") if folder == "revisiting" else ("",)):
                arg = "imagenet" + (f",protocol={protocol}" if protocol else "")
                c = sweep.load_config(sweep.Run("r", os.path.join(CONFIGS, folder, f"{name}.py")
                                                + f":{arg}", "/x"))
                assert c.data.cache == "device", (folder, name)
                if folder == "revisiting":
                    channels = get_builder(c.data.name).CHANNELS
                    nbytes = DATASET_SIZES[name] * c.data.image_size ** 2 * channels
                    assert nbytes < device_cache.MAX_DEVICE_FRACTION * 16 * 2 ** 30, name


def test_source_matters_grid(tmp_path):
    full = runner.Study(_config("study_source_matters"), str(tmp_path)).finetune_runs()
    assert len(full) == 4 * 3 * 6 * 5
    cfg = _config("study_source_matters", "confounders=tag,noise,ps=0,1.0,folds=0")
    study = runner.Study(cfg, str(tmp_path))
    runs = study.finetune_runs()
    assert len(runs) == 2 * 3 * 2 and study.clean_targets == []
    r = [r for r in runs if r.name == "noise/radimagenet/noise-p1/fold0"][0]
    c = sweep.load_config(r)
    assert c.data.confounder.kind == "noise" and c.data.confounder.p == 1.0
    # The noise experiment defaults to the chest X-rays (#12.8); LIDC is one argument away.
    assert c.data.name == "nih_cxr14" and c.model.preprocessing == "radimagenet"
    lidc = runner.Study(_config("study_source_matters", f"confounders=noise,noise_dataset=lidc,"
                                                        f"lidc={tmp_path}/l,folds=0"),
                        str(tmp_path)).finetune_runs()
    c = sweep.load_config(lidc[0])
    assert c.data.name == "lidc" and c.data.root == str(tmp_path / "l")



def test_each_p_of_the_sampled_study_reads_its_own_csv_folder(tmp_path):
    """The study sets p by an override (data.confounder.p=...): the paper's F_<100p>
    folder must follow it (it stayed F_50, so every p trained on p = 0.5's images)."""
    cfg = _config("study_source_matters", "confounders=sampled,ps=0,0.2,1.0,folds=0")
    runs = [r for r in runner.Study(cfg, str(tmp_path)).finetune_runs()
            if r.keys["source"] == "imagenet"]
    got = {}
    for r in runs:
        c = sweep.load_config(r)
        got[c.data.confounder.p] = os.path.basename(c.data.fold_csv_dir)
        # the resolved file a subprocess run reads says the same
        resolved = sweep.load_config(sweep.Run(r.name, sweep.write_config(r) + ":", "", [], {}))
        assert resolved.data.fold_csv_dir == c.data.fold_csv_dir
    assert got == {0.0: "F_0", 0.2: "F_20", 1.0: "F_100"}

def _save_tiny(path, seed):
    model = resnet.ResNet(depth=18, layout="keras_v1", width=8, num_classes=None)
    checkpoint.save_weights(str(path), resnet.init_variables(model, jax.random.key(seed), 32),
                            checkpoint.WeightsMetadata(source=f"s{seed}", layout="keras_v1",
                                                       depth=18, width=8, num_classes=None,
                                                       preprocessing="unit"))


def test_filters_study_end_to_end(tmp_path):
    _save_tiny(tmp_path / "alpha", 0)
    _save_tiny(tmp_path / "beta", 1)
    cfg = _config("study_filters", f"weights={tmp_path}/alpha,{tmp_path}/beta")
    assert set(cfg.sources) == {"alpha", "beta"}
    status = runner.run_study(cfg, str(tmp_path / "wd"))
    assert status["report"] == "done" and status["filters"] == "done"
    drift = [r for r in tables.read_csv(str(tmp_path / "wd" / "tables" / "filter_drift.csv"))
             if r["scope"] == "depth_bin"]
    assert {(r["a"], r["b"]) for r in drift} == {("alpha", "beta")}
    assert all(r["drift"] > 0 and r["noise_floor"] > 0 for r in drift)
    md = open(tmp_path / "wd" / "report.md").read()
    assert "filter_layer_statistics.png" in md and "filter_kl_drift.png" in md
    # the sources are compared with each other, not pre vs fine-tuned, and nothing is pending
    assert "between the sources" in md and "pre vs fine-tuned" not in md
    assert "No fine-tuning results yet" not in md and "fine-tunes nothing" in md
    assert "ResNet50 (width 64" not in md and "filter_histograms.png" in md
    assert "figures/conv1_filters.png" in md and "7×7 stem filters (conv1_conv) of each" in md


# ---------------------------------------------------- pre-flight: what would make runs fail
def _busi(root):
    """A BUSI layout the breast parser accepts: one (never decoded) PNG per class folder."""
    for folder in ("benign", "malignant", "normal"):
        os.makedirs(root / folder)
        (root / folder / f"{folder} (1).png").write_bytes(b"not decoded")


def _fold_csv(path, n):
    path.write_text(",path,class\n" + "".join(f"{i},x/{i}.png,no\n" for i in range(n)))


def test_revisiting_preflight_finds_empty_data_text_h5_missing_csvs_and_bad_folds(tmp_path):
    """The audit's case (empty data and fold-CSV folders, a text file as .h5, folds=7)
    used to pass; each is now one MISSING line naming the argument of this config."""
    d, f = tmp_path / "D", tmp_path / "F"
    os.makedirs(d / "breast")
    os.makedirs(f / "breast")
    (tmp_path / "B.h5").write_text("hello world\n")
    (tmp_path / "A.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))  # the signature only
    arg = (f"targets=breast,folds=0,7,data={d},imagenet={tmp_path}/A.h5,"
           f"radimagenet={tmp_path}/B.h5,fold_csvs={f}")
    pf = runner.preflight(_config("study_revisiting", arg), str(tmp_path / "wd"))
    assert pf.missing == [
        f"sources.radimagenet.input: {tmp_path}/B.h5 is not a Keras .h5 weights file (no HDF5 "
        "signature: it starts with b'hello wo') (give configs/study_revisiting.py:"
        "radimagenet=FILE with a Keras .h5 weights file)",
        f"targets.breast: breast: {d}/breast does not have the expected layout (give "
        "configs/study_revisiting.py:data=DIR with DIR/breast in it; the layout: "
        "medtransfer_jax.data.builders.instructions('breast'))",
        f"targets.breast: fold CSV {f}/breast/train_fold1.csv not found (fold 0 reads "
        "train_fold1.csv, val_fold1.csv; give configs/study_revisiting.py:fold_csvs=DIR with "
        "DIR/breast in it, the CSVs from https://github.com/DovileDo/revisiting-transfer "
        "(HEAD, Sep 2023: train/val/test_fold1..5.csv), data/breast/: clone it and set "
        "MEDTRANSFER_FOLD_CSVS=<clone>/data)",
        "folds [7]: outside the protocol's 5 folds (0-4, 0-based; e.g. "
        "configs/study_revisiting.py:folds=0,1)"], pf.missing
    assert "pre-flight: ok" not in pf.text()

    # Data in the layout, train CSV only, one per-fold test file: the first missing file.
    os.rmdir(d / "breast")
    _busi(d / "breast")
    _fold_csv(f / "breast" / "train_fold1.csv", 7)
    _fold_csv(f / "breast" / "test_fold2.csv", 2)
    arg = arg.replace("folds=0,7", "folds=0")
    missing = runner.preflight(_config("study_revisiting", arg), str(tmp_path / "wd")).missing
    assert len(missing) == 2 and "B.h5" in missing[0]
    assert missing[1].startswith(f"targets.breast: fold CSV {f}/breast/val_fold1.csv not found "
                                 "(fold 0 reads train_fold1.csv, val_fold1.csv, test_fold1.csv;")
    _fold_csv(f / "breast" / "val_fold1.csv", 2)
    _fold_csv(f / "breast" / "test_fold1.csv", 2)
    os.remove(tmp_path / "B.h5")
    (tmp_path / "B.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    pf = runner.preflight(_config("study_revisiting", arg), str(tmp_path / "wd"))
    assert pf.missing == [] and "pre-flight: ok" in pf.text()
    # the training split is the CSV's 7 rows: an epoch is one batch of 256 drawn from
    # them (ceil(7 / 256) steps), 30 epochs per run, 5 runs
    assert pf.images == 5 * 30 * 256 and "<= 7,680 images/run" in pf.text()


def test_preflight_checkpoint_signatures(tmp_path):
    """The cheap checks of a source file, by format (first bytes; a zip's directory)."""
    import zipfile

    from medtransfer_jax.studies import preflight

    def write_zip(name, member):
        with zipfile.ZipFile(tmp_path / name, "w") as z:
            z.writestr(member, b"x")
        return str(tmp_path / name)

    torch_zip = write_zip("ok.pth", "archive/data.pkl")
    keras_zip = write_zip("ok.keras", "model.weights.h5")
    (tmp_path / "legacy.pth").write_bytes(b"\x80\x02}q\x00.")
    (tmp_path / "text.pth").write_text("<html>404</html>")
    (tmp_path / "cut.pth").write_bytes(open(torch_zip, "rb").read()[:20])
    (tmp_path / "empty.h5").write_bytes(b"")
    (tmp_path / "w.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    check = preflight.checkpoint_problem
    assert check(torch_zip, "torchvision") is None and check(keras_zip, "keras_h5") is None
    assert check(str(tmp_path / "legacy.pth"), "torchvision") is None
    assert check(str(tmp_path / "w.h5"), "keras_h5") is None
    assert check(str(tmp_path / "w.h5"), "torchvision") == (
        f"{tmp_path}/w.h5 is not a PyTorch .pth/.pt state dict (neither a zip nor a pickle: "
        "it starts with b'\\x89HDF\\r\\n\\x1a\\n')")
    assert "neither a zip nor a pickle: it starts with b'<html>40'" in check(
        str(tmp_path / "text.pth"), "torchvision")
    assert "is a damaged zip" in check(str(tmp_path / "cut.pth"), "torchvision")
    assert check(keras_zip, "torchvision") == (f"{keras_zip} is a zip without data.pkl, so "
                                               "not a PyTorch .pth/.pt state dict")
    assert "is empty (0 bytes)" in check(str(tmp_path / "empty.h5"), "keras_h5")
    # The filters study names its own argument for a bad file.
    pf = runner.preflight(_config("study_filters", f"weights={tmp_path}/text.pth"),
                          str(tmp_path / "wd"))
    assert len(pf.missing) == 1 and pf.missing[0].endswith(
        "(give configs/study_filters.py:weights=FILE with a PyTorch .pth/.pt state dict)")


def _nih(root, n_images):
    os.makedirs(root / "images")
    rows = ["Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender,View Position"]
    for i in range(n_images):
        (root / "images" / f"{i:08d}_000.png").write_bytes(b"not decoded")
        rows.append(f"{i:08d}_000.png,{'Atelectasis' if i % 2 else 'No Finding'},{i},50,M,PA")
    (root / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")


def test_source_matters_preflight_hints_and_images_from_the_csvs(tmp_path, monkeypatch):
    """Hints name configs/study_source_matters.py and its nih/lidc arguments and the fold
    CSVs' variable; the images to process come from train_fold{K+1}.csv, or are said to
    be unknown until the data is there (once, not '<= ?' per target)."""
    from medtransfer_jax.studies import preflight

    monkeypatch.setenv("MEDTRANSFER_SM_FOLD_CSVS", str(tmp_path / "sm"))
    h5 = tmp_path / "w.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n")
    weights = f"imagenet={h5},radimagenet={h5}"
    cfg = _config("study_source_matters", f"confounders=tag,noise,noise_dataset=lidc,ps=0,"
                                          f"folds=0,nih=/nonexistent,lidc={tmp_path}/l,{weights}")
    pf = runner.preflight(cfg, str(tmp_path / "wd"))
    assert ("targets.tag: data root '/nonexistent' is not a directory (give "
            "configs/study_source_matters.py:nih=DIR)") in pf.missing
    assert (f"targets.noise: data root '{tmp_path}/l' is not a directory (give "
            "configs/study_source_matters.py:lidc=DIR)") in pf.missing
    assert not any("study_revisiting" in m or "data=DIR" in m for m in pf.missing)
    csv = [m for m in pf.missing if m.startswith("targets.tag: data.fold_csv_dir=")]
    assert len(csv) == 1 and "set MEDTRANSFER_SM_FOLD_CSVS=<clone>/data" in csv[0]
    text = pf.text()
    assert pf.images is None and "?" not in text and "unknown" not in text.split("\n", 1)[1]
    assert text.count("unknown until the data is there") == 1
    with pytest.raises(ValueError) as e:
        _config("study_source_matters", "data=/x")
    assert str(e.value).endswith("(e.g. configs/study_source_matters.py:confounders=tag,"
                                 "ps=0,1.0,folds=0,1)") and "targets" not in str(e.value)

    # Data and CSVs there: the training split is the CSV's 5 rows, 30 epochs per run.
    _nih(tmp_path / "nih", 6)
    os.makedirs(tmp_path / "sm" / "chest14")
    _fold_csv(tmp_path / "sm" / "chest14" / "train_fold1.csv", 5)
    _fold_csv(tmp_path / "sm" / "chest14" / "val_fold1.csv", 2)
    _fold_csv(tmp_path / "sm" / "chest14" / "test.csv", 2)
    cfg = _config("study_source_matters", f"confounders=tag,ps=0,folds=0,nih={tmp_path}/nih,"
                                          f"{weights}")
    pf = runner.preflight(cfg, str(tmp_path / "wd"))
    # an epoch of the 5 rows is one batch of 256 drawn from them (ceil(5 / 256) steps)
    assert pf.missing == [] and pf.images == 3 * 30 * 256, pf.missing
    assert ("<= 23,040 training images to process" in pf.text()
            and "<= 7,680 images/run" in pf.text())
    work = preflight.stage_work(runner.Study(cfg, str(tmp_path / "wd")), ["finetune"])
    assert list(work["finetune"].items.values()) == [30 * 256.0] * 3   # the ETA's units too
    os.remove(tmp_path / "nih" / "images" / "00000003_000.png")
    missing = runner.preflight(cfg, str(tmp_path / "wd")).missing
    assert missing == [f"targets.tag: nih_cxr14: 1 of 6 listed files do not exist, e.g. "
                       f"{tmp_path}/nih/images/00000003_000.png (give "
                       "configs/study_source_matters.py:nih=DIR; the layout: "
                       "medtransfer_jax.data.builders.instructions('nih_cxr14'))"]


def test_revisiting_cca_pairs_compute_each_pair_of_weights_once(tmp_path):
    """imagenet_frz's pre-trained weights are imagenet's, so 'imagenet_frz vs
    radimagenet_frz (pre)' is 'imagenet vs radimagenet (pre)': computed once, not twice."""
    from medtransfer_jax.studies import analyses
    study = runner.Study(_config("study_revisiting", "targets=breast,folds=0"), str(tmp_path))
    pairs = analyses.cca_pairs(study, "breast", 0)
    weights = [(a, b) for _, _, a, b in pairs]
    assert len(weights) == len(set(weights))
    labels = [p[0] for p in pairs]
    assert "imagenet vs radimagenet (pre)" in labels
    assert "imagenet_frz vs radimagenet_frz (pre)" not in labels
    assert "imagenet_frz vs radimagenet_frz (fine-tuned)" in labels
    # the rest of the paper's results/CCA_<task>.csv, labelled as published.json labels it
    from medtransfer_jax.studies import published
    paper = set(published.load()["revisiting"]["cca"]["breast"])
    assert paper <= set(labels), paper - set(labels)
