"""paths.py: gs:// URLs stay URLs; a local folder stands in for the bucket.

`fake_gcs` routes every epath operation on ``gs://bucket/...`` to ``tmp/gcs/bucket/...``
(etils.epath.testing.mock_epath), so the code under test runs its real gs:// branch.
`no_os_path_on_urls` makes os.path.abspath/exists/isdir/..., os.makedirs/replace and
open raise on any argument that still carries ``gs:`` — the bug this module exists to prevent is
``os.path.abspath('gs://b/run') == $PWD/gs:/b/run``.
"""
import builtins
import io
import json
import os
import pathlib
import re
import threading

import numpy as np
import pytest
from etils.epath import testing as epath_testing

from _train_utils import REPO, TINY_CONFIG
from medtransfer_jax import paths


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    # The stand-in serves gs:// itself: no gcsfs/TensorFlow needed for it.
    monkeypatch.setattr(paths, "remote_support_installed", lambda: True)
    root = tmp_path / "gcs"
    root.mkdir()

    def local(p):
        s = os.fspath(p)
        return str(root / s[len("gs://"):]) if s.startswith("gs://") else s

    def one(fn, path, *a, **k):
        return fn(local(path), *a, **k)

    def two(fn, path, dst, *a, **k):
        return fn(local(path), local(dst), *a, **k)

    with epath_testing.mock_epath(
            exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, open=one, remove=one,
            rmtree=one, stat=one, glob=one, walk=one, rename=two, replace=two, copy=two):
        yield root


@pytest.fixture
def no_os_path_on_urls(monkeypatch):
    def guard(name, fn):
        def wrapped(*args, **kwargs):
            for a in args:
                if isinstance(a, (str, os.PathLike)) and "gs:" in os.fspath(a):
                    raise AssertionError(f"{name}({os.fspath(a)!r}): a gs:// URL reached os.path")
            return fn(*args, **kwargs)
        return wrapped

    # Not join/dirname/basename: os.path is posixpath, which epath itself uses for
    # string joins of URL parts; the harm is in functions that touch the disk or the cwd.
    for name in ("abspath", "exists", "isdir", "isfile", "getsize", "expanduser", "realpath"):
        monkeypatch.setattr(os.path, name, guard(f"os.path.{name}", getattr(os.path, name)))
    for name in ("makedirs", "replace", "rename", "listdir", "remove"):
        monkeypatch.setattr(os, name, guard(f"os.{name}", getattr(os, name)))
    monkeypatch.setattr(builtins, "open", guard("open", builtins.open))


def test_urls_stay_urls_and_local_paths_become_absolute(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert str(paths.workdir("gs://bucket/runs/b1")) == "gs://bucket/runs/b1"
    assert paths.to_str(paths.join("gs://bucket/runs", "b1", "results.json")) == \
        "gs://bucket/runs/b1/results.json"
    assert paths.is_remote("gs://b/x") and not paths.is_remote("runs/gs:x")
    assert str(paths.workdir("~/w")) == str(tmp_path / "w")
    assert str(paths.workdir("rel/dir")) == str(tmp_path / "rel" / "dir")
    assert paths.basename("gs://bucket/RadImageNet-ResNet50_notop.h5") == \
        "RadImageNet-ResNet50_notop.h5"
    assert paths.basename("gs://bucket/dir/") == "dir"
    with pytest.raises(ValueError, match="empty path"):
        paths.workdir("")


def test_file_operations_on_a_bucket(fake_gcs, no_os_path_on_urls):
    run = paths.makedirs(paths.workdir("gs://bucket/runs/b1"))
    assert paths.isdir("gs://bucket/runs/b1") and paths.exists(run)
    paths.write_text_atomic(run / "results.json", '{"status": "done"}')
    paths.append_text(run / "metrics.jsonl", "a\n")
    paths.append_text(run / "metrics.jsonl", "b\n")
    paths.write_bytes_atomic(run / "blob.bin", b"\x00\x01")
    assert paths.read_text("gs://bucket/runs/b1/results.json") == '{"status": "done"}'
    assert paths.read_text(run / "metrics.jsonl") == "a\nb\n"
    assert paths.read_bytes(run / "blob.bin") == b"\x00\x01"
    assert paths.getsize(run / "blob.bin") == 2 and paths.isfile(run / "blob.bin")
    assert paths.listdir(run) == ["blob.bin", "metrics.jsonl", "results.json"]
    # The bytes landed in the bucket stand-in, not in a local ./gs:/ folder.
    assert (fake_gcs / "bucket" / "runs" / "b1" / "results.json").read_text() == \
        '{"status": "done"}'
    assert not (pathlib.Path.cwd() / "gs:").exists()


def test_local_atomic_write_leaves_no_temporaries_and_keeps_old_file_on_error(tmp_path,
                                                                               monkeypatch):
    target = tmp_path / "results.csv"
    paths.write_text_atomic(target, "old\n")

    def writer(i):
        for _ in range(20):
            paths.write_text_atomic(target, f"writer {i}\n" * 100)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = target.read_text()
    assert len(text.splitlines()) == 100 and len(set(text.splitlines())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        paths.write_text_atomic(target, "new\n")
    assert target.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


class _FakeOrbax:
    """Stands in for orbax.checkpoint.StandardCheckpointer (which writes gs:// through
    tensorstore, not epath): records the path it was given, stores the tree as .npz."""

    seen = []

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def save(self, path, tree, force=False):
        self.seen.append(path)
        flat = {f"{c}|{layer}|{leaf}": v for c, layers in tree.items()
                for layer, leaves in layers.items() for leaf, v in leaves.items()}
        buf = io.BytesIO()
        np.savez(buf, **flat)
        paths.makedirs(path)
        paths.write_bytes_atomic(paths.join(path, "tree.npz"), buf.getvalue())

    def wait_until_finished(self):
        pass

    def restore(self, path):
        self.seen.append(path)
        data = np.load(io.BytesIO(paths.read_bytes(paths.join(path, "tree.npz"))))
        tree = {}
        for key in data.files:
            c, layer, leaf = key.split("|")
            tree.setdefault(c, {}).setdefault(layer, {})[leaf] = data[key]
        return tree


def test_weights_directory_on_a_bucket(fake_gcs, no_os_path_on_urls, monkeypatch):
    import orbax.checkpoint as ocp

    from medtransfer_jax.weights import checkpoint

    monkeypatch.setattr(ocp, "StandardCheckpointer", _FakeOrbax)
    _FakeOrbax.seen.clear()
    rng = np.random.default_rng(0)
    variables = {"params": {"conv1_conv": {"kernel": rng.normal(size=(3, 3, 3, 4))}},
                 "batch_stats": {"conv1_bn": {"mean": rng.normal(size=4)}}}
    md = checkpoint.WeightsMetadata(source="imagenet", layout="keras_v1", depth=18, width=4)
    out = checkpoint.save_weights("gs://bucket/weights/imagenet", variables, md)
    assert out == "gs://bucket/weights/imagenet"
    got, md2 = checkpoint.load_weights("gs://bucket/weights/imagenet")
    assert md2 == md
    np.testing.assert_array_equal(got["params"]["conv1_conv"]["kernel"],
                                  variables["params"]["conv1_conv"]["kernel"])
    # orbax received the URL itself (it writes to GCS directly), never a local path.
    assert [str(p) for p in _FakeOrbax.seen] == ["gs://bucket/weights/imagenet/variables"] * 2
    assert (fake_gcs / "bucket" / "weights" / "imagenet" / "metadata.json").exists()
    with pytest.raises(checkpoint.CheckpointError, match=r"'gs://bucket/nothing' does not exist"):
        checkpoint.load_metadata("gs://bucket/nothing")


def test_source_checkpoint_read_from_a_bucket(fake_gcs, no_os_path_on_urls, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from medtransfer_jax.weights import _common, torchvision as tv_reader

    model = torchvision.models.resnet18(num_classes=3)
    (fake_gcs / "bucket").mkdir()
    with builtins.open(fake_gcs / "bucket" / "r18.pth", "wb") as f:   # guard: local path
        torch.save(model.state_dict(), f)
    url = "gs://bucket/r18.pth"
    assert _common.check_input_file(url, "PyTorch") == url and _common.sniff(url) == "zip"
    variables, info = tv_reader.load_torchvision(url)
    assert info["path"] == url and info["depth"] == 18 and info["num_classes"] == 3
    w = model.state_dict()["conv1.weight"].numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(variables["params"]["conv1_conv"]["kernel"], w)
    with pytest.raises(Exception, match=r"gs://bucket/missing.pth: no such file"):
        _common.check_input_file("gs://bucket/missing.pth", "PyTorch")


def test_adopting_modules_have_no_os_path_left():
    """Static half of the guard: the weights stage names paths only through paths.py."""
    for name in ("checkpoint.py", "conversion.py", "_common.py", "torchvision.py", "keras_h5.py"):
        text = open(os.path.join(REPO, "medtransfer_jax", "weights", name)).read()
        assert not re.search(r"\bos\.(path\.|makedirs|replace)|[^.]\bopen\(", text), name


class _StepLog:
    """A loop hook recording the steps a run trains (the resumed run starts after the save)."""

    def __init__(self):
        self.steps = []

    def after_step(self, step, state):
        self.steps.append(step)


def test_training_run_in_a_bucket_stays_there_and_resumes(fake_gcs, no_os_path_on_urls,
                                                           monkeypatch, tmp_path):
    """A tiny training with ``--workdir=gs://bucket/run``: config/metrics/predictions/
    results/exports land in the bucket stand-in through paths.*, orbax is handed the URL
    (the stand-in maps it to a local folder only at orbax's door, since orbax writes
    arrays to GCS with tensorstore, which no local mock reaches), TensorBoard gets the URL
    as its logdir, and a SIGTERM-interrupted run resumes from its checkpoint there (a
    damaged latest checkpoint is moved aside within the bucket)."""
    import _train_faults
    import orbax.checkpoint as ocp

    from medtransfer_jax.training import loop, periodic, sweep

    def local(p):
        s = os.fspath(p)
        return str(fake_gcs / s[len("gs://"):]) if s.startswith("gs://") else s

    handed = []   # what orbax and tensorboardX were given

    class Manager(ocp.CheckpointManager):
        def __init__(self, directory, *a, **k):
            handed.append(("manager", os.fspath(directory)))
            super().__init__(local(directory), *a, **k)

    class Checkpointer(ocp.StandardCheckpointer):
        def save(self, directory, *a, **k):
            handed.append(("weights", os.fspath(directory)))
            return super().save(local(directory), *a, **k)

    class TB:
        def __init__(self, logdir, **kwargs):
            handed.append(("tb", logdir))

        def add_scalar(self, *a):
            pass

        def close(self):
            pass

    monkeypatch.setattr(ocp, "CheckpointManager", Manager)
    monkeypatch.setattr(ocp, "StandardCheckpointer", Checkpointer)
    monkeypatch.setattr(periodic, "SummaryWriter", TB)
    monkeypatch.chdir(tmp_path)
    cfg = sweep.load_config(sweep.Run("gcs", TINY_CONFIG, "/unused"))
    url = "gs://bucket/runs/tiny"
    with pytest.raises(loop.Preempted):
        loop.train_and_evaluate(cfg, url, hooks=[_train_faults.Fault("term", 5)])
    bucket_run = fake_gcs / "bucket" / "runs" / "tiny"
    assert (bucket_run / "checkpoints" / "5").is_dir()
    assert not (bucket_run / "results.json").exists()

    # Damage the latest save: the resumed run moves it aside inside the bucket and
    # resumes from the previous one (step 4, an evaluation).
    for root, _, files in os.walk(bucket_run / "checkpoints" / "5" / "state"):
        for name in files:
            with builtins.open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")
    second = _StepLog()
    res = loop.train_and_evaluate(cfg, url, hooks=[second])
    assert second.steps[0] == 5 and second.steps[-1] == cfg.train.num_steps
    damaged = sorted(p.name for p in (bucket_run / "checkpoints.damaged").iterdir())
    assert len(damaged) == 2 and damaged[0].startswith("5-") and damaged[1] == "README.txt"
    assert res["status"] == "done"
    assert json.loads((bucket_run / "results.json").read_text())["best_step"] == \
        res["best_step"]
    assert json.loads((bucket_run / "config.json").read_text())["seed"] == cfg.seed
    events = [json.loads(line) for line in (bucket_run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [e["step"] for e in events if e["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == cfg.train.num_steps
    for name in ("predictions.csv", "predictions/test.csv", "export/best/metadata.json",
                 "export/last/metadata.json"):
        assert (bucket_run / name).is_file(), name
    kinds = {k for k, _ in handed}
    assert kinds == {"manager", "weights", "tb"}
    assert all(p.startswith(url + "/") for _, p in handed), handed
    assert ("manager", url + "/checkpoints") in handed and ("tb", url + "/tb") in handed
    assert not (tmp_path / "gs:").exists()
    assert loop.read_results(url)["status"] == "done"
    # A finished run in the bucket is recognised and not repeated.
    third = _StepLog()
    assert loop.train_and_evaluate(cfg, url, hooks=[third])["status"] == "done"
    assert third.steps == []


def test_study_paths_tables_and_markers_on_a_bucket(fake_gcs, no_os_path_on_urls, tmp_path,
                                                    monkeypatch):
    """A gs:// study keeps URLs for its layout, tables, stage markers, the sweep's
    results reading (done runs are recognised, their metrics collected) and the
    bootstrap CI read from a run's predictions file in the bucket."""
    from test_study import _tiny_study_config

    from medtransfer_jax.studies import analyses, runner, tables
    from medtransfer_jax.training import sweep
    from medtransfer_jax.inference import predictions

    monkeypatch.chdir(tmp_path)
    url = "gs://bucket/study"
    study = runner.Study(_tiny_study_config(), url)
    assert study.workdir == url and study.path("tables", "a.csv") == url + "/tables/a.csv"
    assert study.source_dir("natural") == url + "/sources/natural/run/export/best"
    assert study.fine_tuned_dir("lesion", "random", fold=0) == \
        url + "/finetune/lesion/random/fold0/export/best"
    runs = study.finetune_runs()
    assert runs and all(r.workdir.startswith(url + "/finetune/") for r in runs)

    rows = [{"target": "lesion", "fold": 0, "auc": 0.75}, {"target": "lesion", "fold": 1,
                                                            "auc": 0.25, "skip": [1]}]
    tables.write_csv(study.path("tables", "runs.csv"), rows)
    got = tables.read_csv(study.path("tables", "runs.csv"))
    assert got == [{"target": "lesion", "fold": 0.0, "auc": 0.75},
                   {"target": "lesion", "fold": 1.0, "auc": 0.25}]
    assert tables.read_csv_if(study.path("tables", "none.csv")) == []
    tables.write_json(study.path("tables", "x.json"), {"a": [1, 2]})
    assert tables.read_json(study.path("tables", "x.json")) == {"a": [1, 2]}
    assert (fake_gcs / "bucket" / "study" / "tables" / "runs.csv").is_file()

    paths.makedirs(study.path("stages"))
    assert not study.is_done("sources")
    assert study._finish("sources", 1.0) == "done" and study.is_done("sources")
    assert study._finish("report", 2.0) == "partial"  # other stages not done

    run = runs[0]
    assert run.status() == "new" and sweep.read_results(run.workdir) is None
    paths.makedirs(paths.join(run.workdir, "checkpoints", "3"))
    assert run.status() == "partial"
    paths.write_text_atomic(paths.join(run.workdir, "results.json"), json.dumps(
        {"status": "done", "best_step": 4, "val": {"auc": 0.6}, "test": {"auc": 0.5}}))
    assert run.status() == "done"
    assert sweep.collect([run])[0]["test.auc"] == 0.5

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    probs = rng.dirichlet([1, 1], 40)
    for where in (run.workdir, str(tmp_path / "local")):
        predictions.write_predictions(paths.join(where, "predictions.csv"),
                                      [str(i) for i in range(40)], ["g"] * 40, "test", labels,
                                      probs)
    remote = analyses.run_auc_ci(run.workdir, "test", "auc", 50)
    local = analyses.run_auc_ci(str(tmp_path / "local"), "test", "auc", 50)
    assert remote and remote == local
    back = predictions.read_predictions(paths.join(run.workdir, "predictions.csv"))
    np.testing.assert_array_equal(back["probs"], probs)
    assert not (tmp_path / "gs:").exists()


def test_tiny_training_reads_its_dataset_from_a_bucket(fake_gcs, no_os_path_on_urls, tmp_path,
                                                       monkeypatch):
    """One epoch of a tiny ResNet on the BUSI builder whose download folder lies in the
    bucket stand-in (data.root=gs://...): listing, the integrity check, decoding and the
    grain pipeline all read through paths; the run directory is local here."""
    from PIL import Image

    from medtransfer_jax import data
    from medtransfer_jax.training import loop, presets

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    root = fake_gcs / "bucket" / "busi" / "Dataset_BUSI_with_GT"
    for folder, n in (("benign", 10), ("malignant", 10), ("normal", 4)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (40, 36), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{folder} ({i + 1}).png")
    cfg = presets.tiny_config(["data.name=breast", "data.root=gs://bucket/busi",
                               "data.num_folds=3", "data.heldout_val_fraction=0.5",
                               "train.batch_size=8", "eval.batch_size=8"])
    splits = data.get_splits(cfg.data)
    assert all(p.startswith("gs://bucket/busi/") for p in splits.train.base.paths)
    res = loop.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert res["status"] == "done"
    assert res["test"]["num_examples"] == len(splits.test) > 0
    assert 0.0 <= res["test"]["auc"] <= 1.0
    assert not (tmp_path / "gs:").exists()


def test_study_preflight_with_workdir_and_data_in_a_bucket(fake_gcs, no_os_path_on_urls,
                                                           tmp_path, monkeypatch):
    """Pre-flight of a gs:// study (it used to loop forever looking for a local disk above
    gs://): no disk-space limit, a data root in the bucket is found, a missing one named."""
    import ml_collections
    from test_study import _tiny_study_config

    from medtransfer_jax.studies import runner

    monkeypatch.chdir(tmp_path)
    (fake_gcs / "bucket" / "busi" / "benign").mkdir(parents=True)
    c = _tiny_study_config()
    c.targets.lesion.overrides = list(c.targets.lesion.overrides) + [
        "data.name=breast", "data.root=gs://bucket/busi"]
    missing = runner.preflight(c, "gs://bucket/study").missing   # the parser lists the bucket
    assert len(missing) == 1 and "gs://bucket/busi does not have the expected layout" in missing[0]
    for folder in ("benign", "malignant", "normal"):   # listed, never decoded
        (fake_gcs / "bucket" / "busi" / folder).mkdir(exist_ok=True)
        (fake_gcs / "bucket" / "busi" / folder / f"{folder} (1).png").write_bytes(b"x")
    pf = runner.preflight(c, "gs://bucket/study")
    assert pf.missing == [] and "a bucket: no disk limit" in pf.text()
    c.targets.lesion.overrides[-1] = "data.root=gs://bucket/nothing"
    c.sources.natural = ml_collections.ConfigDict(dict(kind="convert", format="keras_h5",
                                                       input="gs://bucket/nope.h5"))
    missing = runner.preflight(c, "gs://bucket/study").missing
    assert len(missing) == 2 and "gs://bucket/nope.h5" in missing[0]
    assert "gs://bucket/nothing" in missing[1]
    assert not (tmp_path / "gs:").exists()


def test_study_report_and_figures_land_in_the_bucket(fake_gcs, no_os_path_on_urls, tmp_path,
                                                     monkeypatch):
    """A gs:// study's figures (rendered in memory, one upload each) and report.md /
    report.html are written into the bucket; the Markdown links figures relative to the
    study, the HTML embeds the very bytes stored in the bucket."""
    import base64

    from test_study_report import _study

    from medtransfer_jax.studies import report

    monkeypatch.chdir(tmp_path)
    url = "gs://bucket/study"
    study, _ = _study(url)          # its tables and a similarity figure go to the URL
    out = report.write_report(study)
    assert out == {"markdown": url + "/report.md", "html": url + "/report.html"}
    bucket = fake_gcs / "bucket" / "study"
    png = (bucket / "figures" / "similarity_breast.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    md = (bucket / "report.md").read_text()
    assert "](figures/similarity_breast.png)" in md and "## Headline" in md
    page = (bucket / "report.html").read_text()
    assert base64.b64encode(png).decode() in page
    assert sorted(p.name for p in bucket.iterdir()) == ["figures", "report.html", "report.md",
                                                        "tables"]   # no temporaries
    assert not (tmp_path / "gs:").exists()


def test_data_readers_touch_files_only_through_paths():
    """Static half for the data layer: no disk-touching os/PIL/NumPy/h5py/XML call on a
    path except the named local-only branches (reached after paths.is_remote said no).
    String joins (os.path.join/basename) are fine on URLs and not listed."""
    touching = (r"\bos\.(path\.(isfile|isdir|exists|getsize|abspath|expanduser|realpath|"
                r"relpath)|listdir|walk|makedirs|replace)\([^)]*\)|[^.\w]open\([^)]*\)|"
                r"Image\.open\([^)]*\)|np\.load\([^)]*\)|h5py\.File\([^)]*\)|"
                r"ET\.parse\([^)]*\)")
    allowed = {
        "sources.py": {"Image.open(path)", 'np.load(path, mmap_mode="r")',
                       "os.path.abspath(csv_path)"},
        "integrity.py": {"os.path.isfile(path)"},
        "thyroid.py": {"ET.parse(f)"},   # f = paths.open(path, "rb")
    }
    names = [("data", n) for n in ("sources.py", "splits.py", "integrity.py", "registry.py",
                                   "device_cache.py", "pipeline.py")]
    names += [("data/builders", n) for n in ("_common.py", "breast.py", "chest.py", "isic.py",
                                             "knee.py", "lidc.py", "mammograms.py",
                                             "nih_cxr14.py", "pcam.py", "thyroid.py")]
    for folder, name in names:
        text = open(os.path.join(REPO, "medtransfer_jax", folder, name)).read()
        hits = {m.group(0) for m in re.finditer(touching, text)
                if not re.search(r"paths\.|BytesIO", m.group(0))}   # already through paths
        assert hits <= allowed.get(name, set()), (folder, name, hits - allowed.get(name, set()))


def test_run_and_study_writers_have_no_os_path_left():
    """Static half for the training loop's and the study's files: paths only through
    paths.py. The one exception is named: the study's stage-marker mtime on local disks
    (float precision), reached only after paths.is_remote said no."""
    allowed = {"runner.py": {"os.path.getmtime(path)"}}
    files = [("training", n) for n in ("loop.py", "checkpointing.py", "periodic.py",
                                       "finalize.py")]
    files += [("inference", "predictions.py")]
    files += [("studies", n) for n in ("runner.py", "tables.py", "analyses.py", "report.py")]
    files += [("analysis", "plots.py")]
    for folder, name in files:
        text = open(os.path.join(REPO, "medtransfer_jax", folder, name)).read()
        hits = {m.group(0) for m in re.finditer(
            r"\bos\.(path\.\w+|makedirs|replace)\([^)]*\)|[^.\w]open\([^)]*\)", text)}
        assert hits <= allowed.get(name, set()), (folder, name, hits - allowed.get(name, set()))
