"""The sweep: one override helper, the resolved config both run modes read, runs that did
not finish never enter the table, and SIGTERM / Ctrl-C stop the whole sweep (#10.4)."""
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from _train_utils import REPO, subprocess_env

from absl import flags
from ml_collections import config_flags

from medtransfer_jax import configs
from medtransfer_jax.errors import ConfigError
from medtransfer_jax.training import sweep

BREAST = os.path.join(REPO, "configs", "revisiting", "breast.py")


def test_override_parses_as_the_field_type_and_rejects_unknown_fields():
    c = configs.load(configs.path("demo"))
    configs.override(c, ["train.lr=0.5", "train.batch_size=8", "data.augment.flip=false",
                         "data.synthetic.task='natural'", "data.root=/x", "data.nih_views=AP,PA",
                         "data.max_examples=12", "model.preprocessing=None"])
    assert c.train.lr == 0.5 and isinstance(c.train.lr, float)
    assert c.train.batch_size == 8 and c.data.augment.flip is False
    assert c.data.synthetic.task == "natural" and c.data.root == "/x"
    assert c.data.nih_views == ("AP", "PA") and c.data.max_examples == 12
    assert c.model.preprocessing is None
    with pytest.raises(ConfigError, match="no field 'train.learning_rate'.*lr"):
        configs.override(c, ["train.learning_rate=0.1"])
    with pytest.raises(ConfigError, match="'abc' is not a float"):
        configs.override(c, ["train.lr=abc"])
    with pytest.raises(ConfigError, match="expected key=value"):
        configs.override(c, ["train.lr"])


@pytest.mark.parametrize("spec, overrides", [
    (configs.path("demo"), ["data.fold=1", "train.lr=0.003", "data.synthetic.image_size=32"]),
    (f"{BREAST}:radimagenet,fold=2", ["train.batch_size=64", "model.init=/w"]),
])
def test_resolved_file_gives_the_same_config_as_the_strings(tmp_path, spec, overrides):
    run = sweep.Run("r", spec, str(tmp_path / "r"), overrides)
    path = sweep.write_config(run)
    assert path == os.path.join(run.workdir, "sweep_config.py")
    direct, from_file = sweep.load_config(run), configs.load(path)
    assert from_file.to_dict() == direct.to_dict()
    # The subprocess gets that file, not the strings: both modes read the same values.
    cmd = sweep._command(run, "python")
    assert f"--config={path}" in cmd and not any(a.startswith("--config.") for a in cmd)
    # A remote workdir (written by the run itself) keeps the sweep's files local.
    remote = sweep.Run("r", spec, "gs://bucket/sweep/r", overrides)
    assert sweep.resolved_config_path(remote).startswith(tempfile.gettempdir())
    assert "--workdir=gs://bucket/sweep/r" in sweep._command(remote, "python")


def _fake_results(workdir, status, auc=0.9):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"status": status, "best_step": 4, "val": {"auc": auc},
                   "test": {"auc": auc}}, f)


def test_diverged_runs_are_failed_and_never_averaged(tmp_path):
    runs = sweep.expand_grid("demo", targets=[], folds=[0, 1], root=str(tmp_path))
    _fake_results(runs[0].workdir, "done", 0.8)
    _fake_results(runs[1].workdir, "diverged", float("nan"))
    # Nothing to run: the done run is skipped, the diverged one is not retried.
    status = sweep.run_all(runs, python="/bin/false")
    assert status == {runs[0].name: "skipped", runs[1].name: "failed:diverged"}
    rows = sweep.collect(runs, str(tmp_path / "results.csv"))
    assert [r["status"] for r in rows] == ["done", "diverged"]
    assert rows[0]["test.auc"] == 0.8 and "test.auc" not in rows[1]
    assert sweep.collect(runs, str(tmp_path / "p1.csv"), process_index=1)
    assert not os.path.exists(tmp_path / "p1.csv")  # only process 0 writes shared files


def test_a_finished_run_with_another_config_is_refused_not_reused(tmp_path):
    """A finished run is reused only for the config it was trained with: a changed
    --override (or study setting) would put two configs in one results table."""
    from medtransfer_jax.errors import UserError
    from medtransfer_jax.training import finalize
    run, = sweep.expand_grid("demo", targets=[], folds=[0], root=str(tmp_path))
    _fake_results(run.workdir, "done", 0.8)
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
        json.dump(finalize.json_config(sweep.load_config(run)), f)
    assert sweep.run_all([run], python="/bin/false") == {run.name: "skipped"}
    changed, = sweep.expand_grid("demo", targets=[], folds=[0], root=str(tmp_path),
                                 overrides=["train.lr=0.0005"])
    with pytest.raises(UserError, match=r"finished with another config than this one asks "
                       r"\(train.lr: 0.002 -> 0.0005\).*move .*fold0/seed0 away"):
        sweep.run_all([changed], python="/bin/false")
    # a change a resume accepts too (where the data lives) reuses it
    moved, = sweep.expand_grid("demo", targets=[], folds=[0], root=str(tmp_path),
                               overrides=["data.worker_count=3"])
    assert sweep.run_all([moved], python="/bin/false") == {run.name: "skipped"}


FAKE_TRAIN = """#!{python}
# Stands in for `python -m medtransfer_jax.train`: marks that it started, then waits for
# SIGTERM, "saves" and exits 143 as the real main does.
import os, signal, sys, time
wd = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
open(os.path.join(wd, "started"), "w").close()
def term(signum, frame):
    open(os.path.join(wd, "saved"), "w").close()
    sys.exit(143)
signal.signal(signal.SIGTERM, term)
time.sleep(120)
"""

DRIVER = """
import sys
from medtransfer_jax import cli
from medtransfer_jax.training import sweep

ROOT, FAKE = sys.argv[1:3]

def main(argv):
    runs = sweep.expand_grid("demo", targets=[], folds=[0, 1, 2], root=ROOT)
    sweep.run_all(runs, python=FAKE)

cli.run(main, "sweep", argv=sys.argv[:1])
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_whole_sweep_after_the_running_run_saved(tmp_path, sig):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_TRAIN.format(python=sys.executable))
    fake.chmod(0o755)
    root = tmp_path / "sweep"
    p = subprocess.Popen([sys.executable, "-c", DRIVER, str(root), str(fake)], cwd=REPO,
                         env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    first = root / "demo" / "fold0" / "seed0"
    deadline = time.time() + 120
    while not (first / "started").exists():
        assert p.poll() is None and time.time() < deadline, p.stderr.read()
        time.sleep(0.2)
    t0 = time.time()
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert time.time() - t0 < 20  # visible at once, not after the run's next minute
    assert (first / "saved").exists()  # the running run was asked to save
    assert not (root / "demo" / "fold1").exists()  # and no further run started
    assert "Resume with the same command" in err and "Traceback" not in err
    assert f"received {signal.Signals(sig).name}" in err
    # Only the run that had started is reported stopped; the two others never started.
    assert "(1 run(s) saved and stopped; 2 run(s) not started)" in err, err
    assert "[sweep] demo/fold0/seed0: stopped" in out
    assert "fold1" not in out and "fold2" not in out, out


def test_subprocess_and_inprocess_runs_of_one_grid_point_agree(tmp_path):
    """Both modes train from the same resolved sweep_config.py: same config, same results."""
    from _train_utils import TINY_CONFIG
    ov = ["train.num_steps=4", "eval.every_steps=4", "checkpoint.every_steps=4"]
    sub = sweep.Run("a", TINY_CONFIG, str(tmp_path / "sub"), ov)
    inp = sweep.Run("a", TINY_CONFIG, str(tmp_path / "inp"), ov)
    assert sweep.run_all([sub], mode="subprocess", env=subprocess_env()) == {"a": "done"}
    assert sweep.run_all([inp], mode="inprocess") == {"a": "done"}
    with open(sweep.resolved_config_path(sub)) as f1, open(sweep.resolved_config_path(inp)) as f2:
        assert f1.read() == f2.read()
    r1, r2 = sweep.read_results(sub.workdir), sweep.read_results(inp.workdir)
    assert r1["best_step"] == r2["best_step"] == 4
    for split in ("val", "test"):
        assert r1[split] == r2[split], split


FAKE_DONE = """#!{python}
# Stands in for `python -m medtransfer_jax.train`: writes a finished results.json.
import json, os, sys
wd = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
with open(os.path.join(wd, "results.json"), "w") as f:
    json.dump({{"status": "done", "best_step": 4, "val": {{"auc": 0.9, "num_examples": 16}},
               "test": {{"auc": 0.875, "num_examples": 16}}}}, f)
"""


def _fake(tmp_path, text, name):
    fake = tmp_path / name
    fake.write_text(text.format(python=sys.executable))
    fake.chmod(0o755)
    return str(fake)


def test_on_done_gets_each_started_run_and_a_timeout_is_a_failure(tmp_path):
    runs = sweep.expand_grid("demo", targets=[], folds=[0, 1], root=str(tmp_path / "a"))
    seen = []
    status = sweep.run_all(runs, python=_fake(tmp_path, FAKE_DONE, "done_python"),
                           on_done=lambda run, st, secs: seen.append((run.name, st, secs)))
    assert status == {r.name: "done" for r in runs}
    assert [(n, st) for n, st, _ in seen] == [(r.name, "done") for r in runs]
    assert all(0 < secs < 60 for _, _, secs in seen)
    assert sweep.run_detail(runs[0], "done") == "test AUC 0.875 (n=16)"
    assert sweep.run_detail(runs[0], "failed:diverged") == "failed:diverged"
    # A run still going at --timeout is stopped (it saves) and listed as failed.
    slow = sweep.expand_grid("demo", targets=[], folds=[0], root=str(tmp_path / "b"))
    t0 = time.time()
    status = sweep.run_all(slow, python=_fake(tmp_path, FAKE_TRAIN, "slow_python"), timeout=3)
    assert status == {slow[0].name: "failed:timeout"}
    assert time.time() - t0 < 60
    assert os.path.exists(os.path.join(slow[0].workdir, "saved"))


FAKE_ENV = """#!{python}
# Stands in for `python -m medtransfer_jax.train`: records the GPU env it was given.
import json, os, sys
wd = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
env = {{k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                                      "XLA_CLIENT_MEM_FRACTION")}}
with open(os.path.join(wd, "results.json"), "w") as f:
    json.dump({{"status": "done", "best_step": 1, "env": env, "val": {{"auc": 0.9}},
               "test": {{"auc": 0.875}}}}, f)
"""


def test_runs_sharing_a_gpu_split_its_memory(tmp_path, monkeypatch):
    """JAX preallocates 75 % of a GPU per process, so a second run on it could not start:
    runs at once on one GPU (a repeated slot, or --parallel without slots) each get
    SHARED_GPU_MEMORY / (runs on it); a GPU of its own keeps JAX's default; a fraction the
    user set is kept."""
    assert sweep.gpu_sharing(["0", "0", "1", "2,0"]) == {"0": 3, "1": 1, "2,0": 3}
    fake = _fake(tmp_path, FAKE_ENV, "env_python")
    for name in sweep.MEM_FRACTION_ENVS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)

    def envs(root, **kw):
        runs = sweep.expand_grid("demo", targets=[], folds=[0, 1, 2, 3], root=str(root))
        assert set(sweep.run_all(runs, python=fake, **kw).values()) == {"done"}
        return [sweep.read_results(r.workdir)["env"] for r in runs]

    got = envs(tmp_path / "slots", gpu_slots=["0", "0", "1"])
    assert {e["CUDA_VISIBLE_DEVICES"] for e in got} <= {"0", "1"}
    for e in got:
        assert e["XLA_PYTHON_CLIENT_MEM_FRACTION"] == e["XLA_CLIENT_MEM_FRACTION"] == (
            "0.450" if e["CUDA_VISIBLE_DEVICES"] == "0" else None), e
    assert all(e["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.300"
               for e in envs(tmp_path / "par", parallel=3))
    assert all(e["XLA_PYTHON_CLIENT_MEM_FRACTION"] is None
               for e in envs(tmp_path / "one", parallel=1))
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.2")  # the user's, by either name
    assert all(e["XLA_CLIENT_MEM_FRACTION"] == "0.2"
               and e["XLA_PYTHON_CLIENT_MEM_FRACTION"] is None
               for e in envs(tmp_path / "user", gpu_slots=["0", "0"]))


def _main(*args):
    return subprocess.run([sys.executable, "-m", "medtransfer_jax.sweep", *args], cwd="/",
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_exit_status_is_0_only_when_every_run_is_done(tmp_path):
    root = tmp_path / "s"
    grid = ["--study=demo", "--folds=0,1", f"--output_dir={root}"]
    runs = sweep.expand_grid("demo", targets=[], folds=[0, 1], root=str(root))
    _fake_results(runs[0].workdir, "done", 0.8)
    _fake_results(runs[1].workdir, "done", 0.7)
    p = _main(*grid)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2/2 runs done; table:" in p.stdout
    _fake_results(runs[1].workdir, "diverged", float("nan"))
    p = _main(*grid)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "1/2 runs done; failed: demo/fold1/seed0 (diverged)" in p.stdout
    p = _main(*grid, "--collect_only")  # the table alone says the same
    assert p.returncode == 1 and "failed: demo/fold1/seed0 (diverged)" in p.stdout
    assert "Exit status: 0 when every run of the grid is done, 1 when any run failed" in \
        " ".join(_main("--help").stdout.split())


def test_dry_run_prints_a_command_that_works_as_printed(tmp_path, monkeypatch):
    root = tmp_path / "s"
    ov = ["model.width=8", "data.nih_views=AP,PA", "data.synthetic.task='natural'",
          "data.augment.flip=false", "train.lr=1e-3", "data.max_examples=12"]
    p = _main("--study=demo", "--folds=1", f"--output_dir={root}", "--dry_run",
              *[f"--override={o}" for o in ov])
    assert p.returncode == 0, p.stderr[-3000:]
    assert not root.exists()  # a dry run writes nothing
    cmd = shlex.split([ln for ln in p.stdout.splitlines() if "medtransfer_jax.train" in ln][0])
    assert cmd[1:3] == ["-m", "medtransfer_jax.train"]
    assert f"--workdir={root}/demo/fold1/seed0" in cmd
    assert not any("sweep_config.py" in a for a in cmd)
    # What train's --config flag makes of that command line is the run's resolved config.
    argv = ["train"] + [a for a in cmd[3:] if a.startswith("--config")]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads overrides at definition
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv)
    fv(argv)
    want = configs.resolve(configs.path("demo"), ["data.fold=1", "seed=0"] + ov)
    assert fv.config.to_dict() == want.to_dict()
    assert fv.config.data.nih_views == ("AP", "PA") and fv.config.data.synthetic.task == "natural"
