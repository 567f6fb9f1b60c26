"""Bad input to every main ends in one line `CMD: error: ...`, exit 2, no traceback, and
nothing created on disk (issue #10.6).

Each case runs the real main as a subprocess (the conftest gives 8 fake CPU devices, so a
batch of 12 does not split). The checks happen before any model is built, so each case
takes a few seconds (mostly Python/JAX import).
"""
import os
import subprocess
import sys

import pytest
from _train_utils import REPO, one_error_line, subprocess_env

BREAST = os.path.join(REPO, "configs", "revisiting", "breast.py")
IS_ROOT = os.geteuid() == 0


def _run(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def _notes_dir(tmp_path):
    """A folder that holds somebody's files (not a weights directory)."""
    d = tmp_path / "my_notes"
    d.mkdir(exist_ok=True)
    (d / "notes.txt").write_text("keep me")
    return d


def _read_only_dir(tmp_path):
    """A directory no process may write into (root ignores chmod; sysfs refuses root)."""
    if IS_ROOT:
        return "/sys/kernel"
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return str(d)




# ------------------------------------------------------------------ train: config errors
@pytest.mark.parametrize("extra, expect", [
    (["--config.train.learning_rate=0.1"], ["train.learning_rate", "lr"]),
    (["--config=no/such/config.py"], ["no/such/config.py", "not found"]),
    (["--config=no/such/config.py", "--config.train.lr=0.1"], ["no/such/config.py"]),
    ([f"--config={BREAST}:imagnet"], ["imagnet", "imagenet"]),
    # A config file with a misspelled field: named with the closest ones, not a KeyError repr.
    ([f"--config={BREAST}:random", "--config.train.epochs=1"],
     ["--config.train.epochs=1: the config has no field 'train.epochs'; did you mean "
      "train.num_epochs"]),
    (["--config.train.batch_size=0"], ["train.batch_size=0", "positive"]),
    (["--config.train.batch_size=-4"], ["train.batch_size=-4", "positive"]),
    (["--config.train.batch_size=12"], ["train.batch_size=12", "8 devices", "multiple of 8"]),
    (["--config.eval.batch_size=10"], ["eval.batch_size=10", "8 devices"]),
    (["--config.train.lr=abc"], ["--config.train.lr=abc"]),
    (["--confg.train.lr=0.1"], ["'confg.train.lr'", "did you mean --config.train.lr?"]),
])
def test_train_config_errors(tmp_path, extra, expect):
    wd = tmp_path / "run"
    p = _run("medtransfer_jax.train", f"--workdir={wd}", *extra)
    one_error_line(p, "train", *expect)
    assert not wd.exists()


# Bad field values (the user audit): each fails in configs.validation before the workdir
# lock, as one line naming the flag and its valid values; the workdir never appears.
@pytest.mark.parametrize("flag, expect", [
    ("model.depth=19", ["18, 34, 50, 101, 152"]),
    ("model.preprocessing=bogus", ["caffe", "unit"]),
    ("model.dropout_rate=2", ["[0, 1)"]),
    ("model.dropout_rate=-0.5", ["[0, 1)"]),
    ("model.width=0", ["an integer >= 1"]),
    ("log.every_secs=-1", [">= 0 seconds"]),
    ("train.optimizer=foo", ["adam, adamw, sgd"]),
    ("train.schedule=foo", ["constant, cosine, linear"]),
    ("train.freeze=bogus", ["linear_probe", "stage:k with k in 1..5"]),
    ("train.num_steps=-1", [">= 0"]),
    ("data.fold=7", ["5 folds", "0..4"]),
    ("data.image_size=-3", [">= 8"]),
    ("data.name=bogus", ["synthetic", "breast"]),
    ("data.cache=bogus", ["none, host, device"]),
    ("eval.monitor=bogus", ["loss, accuracy, auc", "reported_auc"]),
    ("eval.reported_auc=bogus", ["auc_keras"]),
    ("data.confounder.p=1.5", ["in [0, 1]"]),
    ("data.confounder.kind=stamp", ["tag, lowpass, noise, sampled"]),
])
def test_train_bad_field_values(tmp_path, flag, expect):
    wd = tmp_path / "new" / "run"
    p = _run("medtransfer_jax.train", f"--workdir={wd}", f"--config.{flag}")
    one_error_line(p, "train", f"--config.{flag}", *expect)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("extra, expect", [
    (["--config.model.init=/nonexistent"], ["--config.model.init=/nonexistent:", "does not exist"]),
    (["--config.data.folds=paper", "--config.data.fold_csv_dir=/no/such/csvs"],
     ["data.fold_csv_dir='/no/such/csvs'", "is not a folder"]),
])
def test_train_errors_after_the_lock_leave_no_workdir(tmp_path, extra, expect):
    """Errors found inside the run (missing weights / fold CSVs) remove the workdir that
    train created for it (workdir_lock.hold)."""
    wd = tmp_path / "new" / "run"
    p = _run("medtransfer_jax.train", f"--workdir={wd}", *extra)
    one_error_line(p, "train", *expect)
    assert os.listdir(tmp_path) == []


def test_train_workdir_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    p = _run("medtransfer_jax.train", f"--workdir={f}")
    one_error_line(p, "train", str(f), "is a file")


def test_train_read_only_workdir(tmp_path):
    ro = _read_only_dir(tmp_path)
    for wd in (ro, os.path.join(ro, "new_run")):
        p = _run("medtransfer_jax.train", f"--workdir={wd}")
        one_error_line(p, "train", wd, "not writable")
        assert not os.path.exists(os.path.join(ro, "new_run"))


@pytest.mark.parametrize("extra, expect", [
    (["--config.data.root=/no/such/busi"], "data.root folder not found: /no/such/busi"),
    ([], "data.root is not set"),
])
def test_train_missing_dataset_folder(tmp_path, extra, expect):
    p = _run("medtransfer_jax.train", f"--workdir={tmp_path}", "--config.data.name=breast",
             *extra)
    one_error_line(p, "train", expect)
    assert "Expected layout" in p.stderr  # the manual-download instructions follow


def test_train_names_every_missing_input_at_once(tmp_path):
    """A paper run with its data, fold CSVs and weights all missing named only the first
    (fix it, rerun, meet the next): now one line lists all three, and no workdir stays."""
    wd = tmp_path / "new" / "run"
    p = _run("medtransfer_jax.train", f"--workdir={wd}",
             f"--config={REPO}/configs/revisiting/breast.py:imagenet",
             "--config.data.root=/no/such/busi", "--config.data.fold_csv_dir=/no/such/csvs",
             "--config.model.init=/no/such/weights")
    one_error_line(p, "train", "3 inputs missing before the run can start",
                       "data root '/no/such/busi'", "--config.data.root=DIR",
                       "data.fold_csv_dir='/no/such/csvs'", "model.init=/no/such/weights")
    assert os.listdir(tmp_path) == []

def test_verbosity_keeps_the_traceback(tmp_path):
    p = _run("medtransfer_jax.train", f"--workdir={tmp_path / 'r'}",
             "--config=no/such/config.py", "--verbosity=1")
    assert p.returncode != 0 and "Traceback" in p.stderr


# ------------------------------------------------------------------ evaluate
@pytest.mark.parametrize("extra, expect", [
    ([], ["nothing", "metadata.json"]),
    (["--batch_size=0"], ["--batch_size=0", "positive"]),
])
def test_evaluate_errors(tmp_path, extra, expect):
    p = _run("medtransfer_jax.evaluate", f"--checkpoint={tmp_path}/nothing", *extra)
    if "--batch_size=0" in extra:
        p = _run("medtransfer_jax.evaluate", f"--checkpoint={tmp_path}", *extra)
    one_error_line(p, "evaluate", *expect)


def test_evaluate_fold_out_of_range(tmp_path):
    """--fold is checked against the run's data.num_folds before any weights are read
    (the weights here are a stub that would not load)."""
    best = tmp_path / "run" / "export" / "best"
    best.mkdir(parents=True)
    (best / "metadata.json").write_text("{}")
    (tmp_path / "run" / "config.json").write_text('{"data": {"name": "synthetic", "fold": 1}}')
    for fold, folds in (("7", "5 folds"), ("5", "0..4")):
        p = _run("medtransfer_jax.evaluate", f"--checkpoint={tmp_path / 'run'}", f"--fold={fold}")
        one_error_line(p, "evaluate", f"--fold={fold}", folds)


def test_evaluate_batch_not_divisible_and_bad_output(tmp_path):
    p = _run("medtransfer_jax.evaluate", f"--checkpoint={tmp_path}", "--batch_size=12")
    one_error_line(p, "evaluate", "--batch_size=12", "8 devices")
    p = _run("medtransfer_jax.evaluate", f"--checkpoint={tmp_path}",
             f"--output={_read_only_dir(tmp_path)}/p.csv")
    one_error_line(p, "evaluate", "--output", "not writable")
    assert os.listdir(tmp_path) in ([], ["ro"])


# ------------------------------------------------------------------ convert
def test_convert_errors(tmp_path):
    h5 = tmp_path / "w.h5"
    h5.write_bytes(b"not hdf5")
    out = tmp_path / "out"
    cases = [
        ((f"--input={tmp_path}/missing.h5", "--format=keras_h5", f"--output_dir={out}"),
         ["missing.h5", "not a file"]),
        ((f"--input={h5}", f"--output_dir={out}"), ["--format is required"]),
        ((f"--input={h5}", "--format=keras_h5", f"--output_dir={h5}"), ["is a file"]),
        ((f"--input={h5}", "--format=keras_h5",
          f"--output_dir={_read_only_dir(tmp_path)}/w"), ["not writable"]),
        ((f"--input={h5}", "--format=keras_h5", f"--output_dir={out}"), ["Cannot convert"]),
        ((f"--input={h5}", "--format=keras_h5", f"--output_dir={_notes_dir(tmp_path)}"),
         ["other files in it", "new or empty directory"]),
    ]
    for args, expect in cases:
        p = _run("medtransfer_jax.convert", *args)
        one_error_line(p, "convert", *expect)
        assert not out.exists()


# ------------------------------------------------------------------ analyze
@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    from medtransfer_jax.models import resnet
    from medtransfer_jax.weights.checkpoint import WeightsMetadata, save_weights
    d = str(tmp_path_factory.mktemp("w") / "r18")
    model = resnet.ResNet(depth=18, width=8, num_classes=None)
    save_weights(d, resnet.random_variables(model, 0),
                 WeightsMetadata(source="random", layout="keras_v1", depth=18, width=8,
                                 num_classes=None, preprocessing="unit", image_size=32))
    return d


def test_analyze_errors(tmp_path, weights_dir):
    out = tmp_path / "out"
    pair = [f"--weights_a={weights_dir}", f"--weights_b={weights_dir}", "--images=random"]
    cases = [
        (["cca", f"--output_dir={out}", "--protocol=custom", "--layers=conv9_block1_out",
          *pair], ["conv9_block1_out", "unknown layer"]),
        (["cca", f"--output_dir={out}", "--batch_size=0", *pair], ["--batch_size=0"]),
        (["cca", f"--output_dir={tmp_path / 'f'}", *pair], ["is a file"]),
        (["cca", f"--output_dir={_read_only_dir(tmp_path)}/o", *pair], ["not writable"]),
        (["frobnicate", f"--output_dir={out}"], ["Unknown analysis"]),
        (["cca", f"--output_dir={out}", "--streaming", *pair], ["--streaming", "custom"]),
        (["cca", f"--output_dir={out}", "--spatial=pool", *pair], ["--spatial", "custom"]),
        (["cca", f"--output_dir={out}", "--label_a=x", "--images=random",
          f"--pair={weights_dir},{weights_dir}"], ["--label_a", "DIR_A,DIR_B,LABEL"]),
    ]
    (tmp_path / "f").write_text("x")
    for args, expect in cases:
        p = _run("medtransfer_jax.analyze", *args)
        one_error_line(p, "analyze", *expect)
        assert not out.exists()


# ------------------------------------------------------------------ study
def test_study_errors(tmp_path):
    wd = tmp_path / "study"
    bad_run = tmp_path / "bad_study.py"
    bad_run.write_text(
        "from medtransfer_jax.configs import study_demo\n"
        "def get_config(arg=None):\n"
        "    c = study_demo.get_config()\n"
        "    c.targets.lesion.overrides = list(c.targets.lesion.overrides) + "
        "['train.batch_size=0']\n"
        "    return c\n")
    (tmp_path / "f").write_text("x")
    cases = [
        (["--config.analysis.cca.metods=x"], ["analysis.cca.metods", "methods"]),
        (["--config=no/such/study.py"], ["no/such/study.py", "not found"]),
        ([f"--config={REPO}/configs/study_demo.py:imagnet"], ["takes no argument"]),
        ([f"--config={bad_run}"], ["train.batch_size=0", "positive"]),
        (["--stages=finetune,frobnicate"], ["frobnicate"]),
        (["--stages=robustness"], ["robustness stage needs the sources and finetune stages",
                                   "--stages=sources,finetune,robustness"]),
        (["--dry_run", "--stages=finetune"], ["sources", "--stages=sources,finetune"]),
        ([f"--workdir={tmp_path / 'f'}"], ["is a file"]),
        ([f"--workdir={_read_only_dir(tmp_path)}/s"], ["not writable"]),
        (["--gpu_slots=0,1"], ["--gpu_slots", "--mode=subprocess"]),
        (["--mode=subprocess", "--gpu_slots=0,1", "--parallel=2"], ["--parallel", "one"]),
        (["--multihost"], ["--multihost", "one host", "sweep --multihost"]),
    ]
    for extra, expect in cases:
        p = _run("medtransfer_jax.study", f"--workdir={wd}", *extra)
        one_error_line(p, "study", *expect)
        assert not wd.exists()


# ------------------------------------------------------------------ sweep
def test_sweep_errors(tmp_path):
    root = tmp_path / "sweep"
    (tmp_path / "f").write_text("x")
    demo = ["medtransfer_jax.sweep", "--study=demo", "--folds=0"]
    cases = [
        ([f"--output_dir={root}", "--override=train.learning_rate=0.1"],
         ["train.learning_rate", "lr"]),
        ([f"--output_dir={root}", "--override=train.batch_size=0"], ["positive"]),
        ([f"--output_dir={root}", "--override=train.batch_size=12"],
         ["demo/fold0/seed0", "train.batch_size=12", "8 devices"]),
        ([f"--output_dir={root}", "--folds=one"], ["--folds=one"]),
        ([f"--output_dir={tmp_path / 'f'}"], ["is a file"]),
        ([f"--output_dir={_read_only_dir(tmp_path)}/s"], ["not writable"]),
        ([f"--output_dir={root}", "--timeout=-1"], ["--timeout=-1", "positive"]),
        ([f"--output_dir={root}", "--timeout=0"], ["--timeout=0", "positive"]),
        ([f"--output_dir={root}", "--targets=foo"], ["--targets", "--study=demo"]),
        ([f"--output_dir={root}", "--sources=foo"], ["--sources", "--study=demo"]),
        ([f"--output_dir={root}", "--mode=inprocess", "--timeout=60"],
         ["--timeout", "--mode=subprocess"]),
        ([f"--output_dir={root}", "--gpu_slots=0,1", "--parallel=2"], ["--parallel", "one"]),
        ([f"--output_dir={root}", "--collect_only"], ["nothing to collect", str(root)]),
    ]
    for extra, expect in cases:
        p = _run(*demo, *extra)
        one_error_line(p, "sweep", *expect)
        assert not root.exists()
    revisiting = ["medtransfer_jax.sweep", "--study=revisiting", f"--output_dir={root}"]
    for extra, expect in [
        (["--targets=breast,foo"], ["--targets", "'foo'", "breast, chest", "pcam"]),
        (["--targets=breast", "--sources=imagenet,foo"],
         ["--sources", "'foo'", "imagenet, radimagenet, random"]),
        (["--targets=breast", "--ps=0.1"], ["--ps", "--study=revisiting"]),
    ]:
        one_error_line(_run(*revisiting, *extra), "sweep", *expect)
        assert not root.exists()
    p = _run("medtransfer_jax.sweep", "--study=revisiting", "--targets=breast",
             f"--config_dir={tmp_path}/nope", f"--output_dir={root}")
    one_error_line(p, "sweep", "no config file", "nope")
    assert not root.exists()


# ------------------------------------------------------------------ bench
@pytest.mark.parametrize("args, expect", [
    (["frobnicate"], ["usage"]),
    (["train", "--batch_sizes=0"], ["--batch_sizes=0", "positive"]),
    (["train", "--batch_sizes=12", "--depth=18"], ["--batch_sizes=12", "8 devices"]),
    (["similarity", "--neurons=a"], ["--neurons=a"]),
    (["pipeline", "--workers=-1"], ["--workers=-1", ">= 0"]),
    (["pipeline", "--image_sizes=64,0"], ["--image_sizes=64,0", "positive"]),
    (["similarity", "--methods=foo"], ["--methods", "'foo'", "mean_cca"]),
    (["similarity", "--routes=foo"], ["--routes=foo", "covariance"]),
    (["network_scale", "--methods=streaming:mean_cca"], ["streaming:mean_cca"]),
    (["network_scale", "--parts=gpu"], ["--parts=gpu", "kernels"]),
    (["network", "--image_sizes=64,32"], ["--image_sizes=64,32", "one value"]),
    (["step_profile", "--batch_sizes=4,8"], ["--batch_sizes=4,8", "one value"]),
    (["scaling", "--image_sizes=32"], ["--image_sizes", "does not read it"]),
    (["network", "--network_images=16", "--image_sizes=32", "--depth=18", "--width=8"],
     ["random_a vs random_b", "needs more datapoints than neurons"]),
    (["train", "--dtypes=float16"], ["--dtypes=float16", "bfloat16"]),
    (["grid", "--scale=0", "--targets=thyroid"], ["--scale=0", "(0, 1]"]),
    (["grid", "--targets=lung"], ["--targets=lung", "thyroid"]),
    (["grid", "--runs_at_once=0"], ["--runs_at_once", "positive"]),
])
def test_bench_errors(args, expect):
    one_error_line(_run("medtransfer_jax.bench", *args), "bench", *expect)


def test_every_command_drops_the_absent_platform_lines_not_warnings():
    """JAX's 'Unable to initialize backend tpu' INFO line opened every command's output."""
    import logging as pylogging
    from medtransfer_jax import cli

    def record(level, path, msg):
        return pylogging.LogRecord("jax", level, path, 1, msg, (), None)

    quiet = cli.QuietLibraries()
    bridge = "/site-packages/jax/_src/xla_bridge.py"
    assert not quiet.filter(record(pylogging.INFO, bridge, "Unable to initialize backend "
                                   "'tpu': INTERNAL: Failed to open libtpu.so"))
    assert quiet.filter(record(pylogging.INFO, bridge, "something else"))
    assert quiet.filter(record(pylogging.WARNING, bridge, "Unable to initialize backend 'cuda'"))
    assert not quiet.filter(record(pylogging.INFO, "/site-packages/orbax/x.py", "saved"))
