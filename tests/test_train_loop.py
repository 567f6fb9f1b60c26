"""End-to-end fine-tuning runs on a tiny model: outputs, evaluation, early stopping,
checkpoint errors, configs and the sweep."""
import json
import os
import re
import shutil
import subprocess
import sys

import _train_utils  # (persistent XLA cache)
import numpy as np
import pytest

from medtransfer_jax.errors import ConfigError
from medtransfer_jax.inference import evaluation as evaluate
from medtransfer_jax.training import loop, presets, sweep
from medtransfer_jax.inference import metrics, predictions
from medtransfer_jax.errors import WorkdirError
from medtransfer_jax.weights.checkpoint import CheckpointError, load_weights


def _tiny(**kw):
    c = presets.tiny_config()
    c.sharding.num_devices = 2
    c.train.num_steps = 8
    c.eval.every_steps = 4
    c.eval.monitor = "auc"
    for k, v in kw.items():
        sweep.apply_overrides(c, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"])
    return c


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("run"))
    # checkpoint.every_secs=0: a checkpoint at each evaluation (steps 4 and 8), whichever
    # step is best: the damaged-checkpoint tests below need the earlier one on disk
    cfg = _tiny(**{"log.profile_steps": 2, "log.profile_start": 5,
                   "checkpoint.keep_when_done": True,    # the tests below copy them
                   "checkpoint.every_secs": 0.0})
    return cfg, wd, loop.train_and_evaluate(cfg, wd)


def test_results_predictions_exports(run_dir):
    cfg, wd, res = run_dir
    assert res["status"] == "done" and res["last_step"] == 8
    assert res["best_step"] in (4, 8)
    assert res["num_devices"] == 2
    with open(os.path.join(wd, "results.json")) as f:
        on_disk = json.load(f)
    assert on_disk["test"]["auc"] == res["test"]["auc"]
    for split in ("val", "test"):
        for key in ("loss", "accuracy", "auc", "auc_ovr_weighted", "auc_micro"):
            assert key in res[split]
        # The predictions file reproduces the reported metrics (independent recomputation).
        p = predictions.read_predictions(os.path.join(wd, "predictions", f"{split}.csv"))
        assert len(p["id"]) == res[f"num_{split}"] == len(set(p["id"]))
        m = metrics.classification_metrics(p["label"], p["probs"])
        assert m["auc"] == pytest.approx(res[split]["auc"], abs=1e-9)
        assert m["accuracy"] == pytest.approx(res[split]["accuracy"], abs=1e-9)
        np.testing.assert_allclose(p["probs"].sum(1), 1.0, atol=1e-5)
    both = predictions.read_predictions(os.path.join(wd, "predictions.csv"))
    assert set(both["split"]) == {"val", "test"}
    # Exported weights in the shared weights format.
    for sub in ("best", "last"):
        variables, md = load_weights(os.path.join(wd, "export", sub))
        assert md.source == "finetuned" and md.extra["init"] == "random"
        assert md.num_classes == 2 and md.preprocessing == "unit"
        assert variables["params"]["predictions"]["kernel"].shape == (64, 2)
    # Logs: JSONL with train/val events, TensorBoard event file.
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    train = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) and "img_per_s" in r for r in train)
    assert [r["step"] for r in recs if r["split"] == "val"] == [4, 8]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(wd, "tb")))
    # log.profile_steps: a jax.profiler trace of steps 6..7 for TensorBoard / Perfetto.
    traces = [f for _, _, fs in os.walk(os.path.join(wd, "profile")) for f in fs]
    assert any(f.endswith(".xplane.pb") for f in traces), traces
    # The best checkpoint is kept next to the latest ones.
    steps = [int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()]
    assert res["best_step"] in steps and 8 in steps
    # A finished workdir is not trained again.
    again = loop.train_and_evaluate(cfg, wd)
    assert again["wall_time_s"] == res["wall_time_s"]


def test_evaluate_command_reproduces_test_metrics(run_dir, tmp_path):
    _, wd, res = run_dir
    out, mets = evaluate.evaluate_checkpoint(wd, splits=["test"],
                                             output=str(tmp_path / "preds.csv"))
    assert mets["test"]["auc"] == pytest.approx(res["test"]["auc"], abs=1e-6)
    p = predictions.read_predictions(out)
    assert set(p["split"]) == {"test"} and len(p["id"]) == res["num_test"]
    with open(tmp_path / "preds.metrics.json") as f:
        summary = json.load(f)
    assert summary["metrics"]["test"]["auc"] == pytest.approx(mets["test"]["auc"])
    assert summary["checkpoint"] == os.path.join(wd, "export", "best")
    with pytest.raises(ValueError, match="not available"):
        evaluate.evaluate_checkpoint(wd, splits=["nope"])
    # without --output: next to the run's own predictions, as `evaluate --help` says
    default_out, _ = evaluate.evaluate_checkpoint(os.path.join(wd, "export", "best"),
                                                  splits=["test"])
    assert default_out == os.path.join(wd, "predictions_synthetic_fold0.csv")
    for f in (default_out, default_out[:-4] + ".metrics.json"):
        os.remove(f)


def test_bad_monitor_fails_before_any_step(tmp_path):
    """eval.monitor used to fail in the first evaluation (after an epoch of training);
    train_and_evaluate now refuses the config before touching the workdir."""
    class Count:
        steps = 0

        def after_step(self, step, state):
            Count.steps += 1

    for field, value in (("eval.monitor", "bogus"), ("train.head_phase.monitor", "auc_x")):
        c = _tiny(**{field: value, "train.freeze": "two_phase"})
        with pytest.raises(ConfigError, match=re.escape(f"--config.{field}={value} is not")):
            loop.train_and_evaluate(c, str(tmp_path / "run"), hooks=[Count()])
    assert Count.steps == 0 and not os.path.exists(tmp_path / "run")


def _train_main(wd, *flags):
    return subprocess.run([sys.executable, "-m", "medtransfer_jax.train", f"--workdir={wd}",
                           f"--config={_train_utils.TINY_CONFIG}", *flags],
                          cwd=_train_utils.REPO, env=_train_utils.subprocess_env(),
                          capture_output=True, text=True, timeout=600)


def test_done_line_names_the_reported_auc(tmp_path):
    """train's last line prints the AUC the protocol reports, by its metric name."""
    wd = tmp_path / "run"
    p = _train_main(wd, "--config.eval.reported_auc=auc_keras", "--config.train.num_steps=4")
    assert p.returncode == 0, p.stderr[-3000:]
    with open(wd / "results.json") as f:
        res = json.load(f)
    assert res["reported_auc"] == "auc_keras"
    done = p.stdout.strip().splitlines()[-1]
    val, test = res["val"]["auc_keras"], res["test"]["auc_keras"]
    assert done.startswith(f"done: best step {res['best_step']} | val auc_keras {val:.4f} acc ")
    assert f"| test auc_keras {test:.4f} acc {res['test']['accuracy']:.4f} |" in done
    # The demo's metric stays 'auc' (and a results file without the key reads as 'auc').
    demo = dict(res, reported_auc="auc")
    for r in (demo, {k: v for k, v in res.items() if k != "reported_auc"}):
        code = ("import json, sys; from medtransfer_jax.train import done_line; "
                "print(done_line(json.loads(sys.stdin.read()), 'R'))")
        q = subprocess.run([sys.executable, "-c", code], input=json.dumps(r),
                           capture_output=True, text=True, env=_train_utils.subprocess_env(),
                           cwd=_train_utils.REPO, timeout=120)
        assert q.stdout.strip() == (
            f"done: best step {res['best_step']} | val auc {res['val']['auc']:.4f} acc "
            f"{res['val']['accuracy']:.4f} | test auc {res['test']['auc']:.4f} acc "
            f"{res['test']['accuracy']:.4f} | results in R"), q.stderr[-2000:]


def test_a_finished_run_keeps_its_outputs_not_its_checkpoints(tmp_path, caplog):
    """checkpoint.keep_when_done=False (the default): a done run's checkpoints, needed only
    to resume, are deleted; its results, predictions and exports stay. A deletion a kill
    cut short is finished by the next call; True keeps them."""
    wd = str(tmp_path / "run")
    cfg = _tiny(**{"train.num_steps": 4, "eval.every_steps": 2})
    assert cfg.checkpoint.keep_when_done is False
    with caplog.at_level("INFO"):
        res = loop.train_and_evaluate(cfg, wd)
    assert res["status"] == "done"
    assert not os.path.exists(os.path.join(wd, "checkpoints"))
    assert re.search(r"run done: removed its training checkpoints \([\d.]+ MB", caplog.text)
    for name in ("results.json", "config.json", "predictions.csv", "predictions/test.csv"):
        assert os.path.isfile(os.path.join(wd, name)), name
    for sub in ("best", "last"):
        variables, md = load_weights(os.path.join(wd, "export", sub))
        assert md.extra["step"] == (res["best_step"] if sub == "best" else 4)
    left = os.path.join(wd, "checkpoints", "4")
    os.makedirs(left)
    with open(os.path.join(left, "half"), "wb") as f:
        f.write(b"x" * 1000)
    again = loop.train_and_evaluate(cfg, wd)
    assert again["test"] == res["test"] and not os.path.exists(os.path.join(wd, "checkpoints"))
    os.makedirs(left)
    loop.train_and_evaluate(_tiny(**{"train.num_steps": 4, "eval.every_steps": 2,
                                     "checkpoint.keep_when_done": True}), wd)
    assert os.path.isdir(left)
    # A folder that cannot be deleted is a warning naming it: the run's outputs are there.
    from medtransfer_jax.training import checkpointing

    real = checkpointing.paths.as_path

    class Stuck:
        def __init__(self, path):
            self.path = real(path)

        def __getattr__(self, name):
            return getattr(self.path, name)

        def rmtree(self):
            raise PermissionError(13, "Permission denied")

    checkpointing.paths.as_path = lambda p: Stuck(p) if str(p).endswith("checkpoints") else real(p)
    try:
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert loop.train_and_evaluate(cfg, wd)["status"] == "done"
    finally:
        checkpointing.paths.as_path = real
    assert "could not remove the finished run's checkpoints" in caplog.text
    assert os.path.join(wd, "checkpoints") in caplog.text and os.path.isdir(left)


def test_runs_in_one_process_leave_no_device_arrays_behind(tmp_path):
    """A study runs 175 fine-tunes in one process: each run's split, state and best
    snapshot must be freed when it ends, or device memory grows run by run."""
    import gc

    import jax

    def live():
        gc.collect()
        return sorted((a.shape, str(a.dtype)) for a in jax.live_arrays())

    before = live()
    for i in range(2):
        cfg = _tiny(**{"data.cache": "device", "train.num_steps": 4, "eval.every_steps": 2,
                       "seed": i})
        loop.train_and_evaluate(cfg, str(tmp_path / f"run{i}"))
        assert live() == before, i


def _copy_unfinished(wd, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(wd, dst)
    os.remove(os.path.join(dst, "results.json"))
    return dst


def test_incompatible_checkpoint_names_leaf(run_dir, tmp_path):
    cfg, wd, _ = run_dir
    dst = _copy_unfinished(wd, tmp_path)
    other = _tiny()
    other.model.width = 16
    # The run's config.json names the change first ...
    with pytest.raises(WorkdirError, match=r"model.width: 8 -> 16"):
        loop.train_and_evaluate(other, dst)
    # ... and a checkpoint without one (copied, or from an older version) names the leaf.
    os.remove(os.path.join(dst, "config.json"))
    with pytest.raises(CheckpointError) as e:
        loop.train_and_evaluate(other, dst)
    msg = str(e.value)
    assert "checkpoints/8" in msg and "incompatible" in msg and "params/" in msg


def _garble(folder, text=b"\x00garbage"):
    n = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(text)
            n += 1
    assert n > 0


def test_damaged_latest_checkpoint_is_skipped(run_dir, tmp_path, caplog):
    """A damaged latest checkpoint is moved aside with a warning naming it and the run
    resumes from the previous one, ending with the same results."""
    cfg, wd, res = run_dir
    dst = _copy_unfinished(wd, tmp_path)
    _garble(os.path.join(dst, "checkpoints", "8", "state"))
    with caplog.at_level("WARNING"):
        again = loop.train_and_evaluate(cfg, dst)
    assert re.search(r"checkpoints/8 (is damaged|cannot be restored)", caplog.text)
    assert "previous good checkpoint" in caplog.text and "checkpoints/4" in caplog.text
    assert os.listdir(os.path.join(dst, "checkpoints.damaged"))
    assert again["best_step"] == res["best_step"]
    for split in ("val", "test"):
        assert again[split] == res[split]


def test_all_checkpoints_damaged_clear_error(run_dir, tmp_path):
    cfg, wd, _ = run_dir
    dst = _copy_unfinished(wd, tmp_path)
    for step in os.listdir(os.path.join(dst, "checkpoints")):
        if step.isdigit():
            _garble(os.path.join(dst, "checkpoints", step, "meta"), b"{not json")
    with pytest.raises(CheckpointError, match=r"every checkpoint in .*checkpoints is damaged"):
        loop.train_and_evaluate(cfg, dst)


def _source_weights(path):
    """A 'pre-trained' headless ResNet18/8 in the weights format (caffe preprocessing)."""
    import jax
    from medtransfer_jax.models import resnet
    from medtransfer_jax.weights.checkpoint import WeightsMetadata, save_weights
    model = resnet.ResNet(depth=18, width=8, num_classes=None)
    variables = jax.device_get(resnet.init_variables(model, jax.random.PRNGKey(42), 32))
    save_weights(path, variables, WeightsMetadata(source="imagenet", layout="keras_v1", depth=18,
                                                  width=8, num_classes=None,
                                                  preprocessing="caffe", image_size=32))
    return variables


def test_init_from_weights_linear_probe_and_early_stopping(tmp_path):
    src = _source_weights(str(tmp_path / "src"))
    # Frozen base + lr 0: the val loss never improves after the first evaluation, so with
    # patience 2 the run stops at the third evaluation.
    cfg = _tiny(**{"train.freeze": "linear_probe", "train.lr": 0.0, "train.num_steps": 10,
                   "eval.every_steps": 1, "eval.patience": 2, "eval.monitor": "loss",
                   "model.init": str(tmp_path / "src"), "model.preprocessing": None})
    res = loop.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert res["stopped_early"] and res["last_step"] == 3 and res["best_step"] == 1
    assert res["monitor"] == "loss"
    assert res["init"] == str(tmp_path / "src") and res["preprocessing"] == "caffe"
    out, md = load_weights(str(tmp_path / "run" / "export" / "last"))
    assert md.preprocessing == "caffe" and md.extra["init"] == str(tmp_path / "src")
    for col in ("params", "batch_stats"):  # the base is the source checkpoint, untouched
        for layer, leaves in src[col].items():
            for leaf, value in leaves.items():
                np.testing.assert_array_equal(out[col][layer][leaf], value)
    assert "predictions" in out["params"] and "predictions" not in src["params"]


def test_two_phase_head_phase_early_stops_then_fine_tunes(tmp_path):
    _source_weights(str(tmp_path / "src"))
    cfg = _tiny(**{"train.freeze": "two_phase", "train.head_phase.lr": 0.0,
                   "train.head_phase.num_steps": 10, "train.head_phase.patience": 1,
                   "train.head_phase.monitor": "loss", "train.num_steps": 4,
                   "eval.every_steps": 2, "model.init": str(tmp_path / "src")})
    res = loop.train_and_evaluate(cfg, str(tmp_path / "run"))
    # head phase: evals at 2 (best), 4 (no gain -> stop); full phase: steps 5..8
    assert res["last_step"] == 8 and res["best_step"] in (6, 8)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        vals = [(r["step"], r["phase"]) for r in map(json.loads, f) if r["split"] == "val"]
    assert vals == [(2, 0), (4, 0), (6, 1), (8, 1)]


def test_config_files_exist():
    """(The protocols' values are checked in test_protocols.py.)"""
    cdir = sweep.default_config_dir()
    run = sweep.Run("x", os.path.join(cdir, "revisiting", "breast.py") + ":imagenet,fold=1",
                    "/tmp/unused")
    c = sweep.load_config(run)
    assert (c.data.name, c.data.image_size, c.data.fold, c.model.preprocessing) == (
        "breast", 256, 1, "caffe")
    for sub, names in (("revisiting", presets.REVISITING_TARGETS), ("source_matters",
                                                                    presets.CONFOUNDERS)):
        for name in names:
            assert os.path.exists(os.path.join(cdir, sub, f"{name}.py"))


def test_sweep_grid_run_collect(run_dir, tmp_path):
    runs = sweep.expand_grid("revisiting", targets=["breast", "chest"],
                             sources=["imagenet", "random"], folds=[0, 1], seeds=[0],
                             root=str(tmp_path))
    assert len(runs) == 8 and len({r.workdir for r in runs}) == 8
    sm = sweep.expand_grid("source_matters", targets=["tag"], sources=["imagenet"],
                           folds=[0], ps=[0.0, 0.5])
    assert [r.keys["p"] for r in sm] == [0.0, 0.5]
    assert ":imagenet,fold=0,seed=0,p=0.5" in sm[1].config
    assert set(sweep.run_all(runs[:2], dry_run=True).values()) == {"dry_run"}
    # Resumable: a finished run is skipped; a new one is trained (in-process here).
    _, wd, res = run_dir
    # (its overrides: what run_dir trained with, or the run would be refused as trained
    # with another config)
    done = sweep.Run("done", _train_utils.TINY_CONFIG, wd,
                     ["train.num_steps=8", "eval.every_steps=4", "eval.monitor='auc'"],
                     keys={"target": "a"})
    new = sweep.Run("new", _train_utils.TINY_CONFIG, str(tmp_path / "new"),
                    ["train.num_steps=4", "eval.every_steps=4"], keys={"target": "b"})
    status = sweep.run_all([done, new], mode="inprocess")
    assert status == {"done": "skipped", "new": "done"}
    rows = sweep.collect([done, new], str(tmp_path / "table.csv"))
    assert rows[0]["test.auc"] == res["test"]["auc"] and rows[1]["status"] == "done"
    with open(tmp_path / "table.csv") as f:
        header = f.readline().strip().split(",")
    assert {"name", "target", "status", "val.auc", "test.auc", "best_step"} <= set(header)


def test_preprocessing_that_overrides_the_weights_is_warned_about(tmp_path, caplog):
    """A protocol's preprocessing (caffe) on weights pre-trained with torch inputs is
    used as asked, with a warning naming both; matching settings stay quiet."""
    import jax
    from medtransfer_jax.models import resnet
    from medtransfer_jax.training import model_init
    from medtransfer_jax.weights.checkpoint import WeightsMetadata, save_weights
    model = resnet.ResNet(depth=18, layout="keras_v1", width=8, num_classes=None)
    save_weights(str(tmp_path / "w"), resnet.init_variables(model, jax.random.key(0), 32),
                 WeightsMetadata(source="tv", layout="keras_v1", depth=18, width=8,
                                 preprocessing="torch"))
    cfg = _tiny(**{"model.init": str(tmp_path / "w"), "model.preprocessing": "caffe"})
    model_init._WARNED.clear()
    with caplog.at_level("WARNING"):
        *_, mode, _, _ = model_init.build_model_and_variables(cfg, 2, jax.random.key(1))
    assert mode == "caffe" and "overrides" in caplog.text and "'torch'" in caplog.text
    caplog.clear()
    cfg = _tiny(**{"model.init": str(tmp_path / "w"), "model.preprocessing": "torch"})
    with caplog.at_level("WARNING"):
        model_init.build_model_and_variables(cfg, 2, jax.random.key(1))
    assert "overrides" not in caplog.text


def test_profiler_traces_the_asked_steps_also_after_a_resume(monkeypatch):
    """log.profile_steps=2, profile_start=3: steps 4..5 are traced; a run resumed at step
    4 (past the start) traces from there instead of never; start 0 is refused (the hook
    runs after a step, so it could never start)."""
    from medtransfer_jax.configs import validation
    from medtransfer_jax.training import periodic
    calls = []
    monkeypatch.setattr(periodic.jax.profiler, "start_trace", lambda d: calls.append("start"))
    monkeypatch.setattr(periodic.jax.profiler, "stop_trace", lambda: calls.append("stop"))
    for first_step, want in ((1, [("start", 3), ("stop", 5)]), (4, [("start", 4), ("stop", 5)]),
                             (6, [])):
        calls.clear()
        prof, seen = periodic.Profiler("/nonexistent", start=3, num_steps=2), []
        for step in range(first_step, 9):
            n = len(calls)
            prof.after_step(step, None)
            seen += [(c, step) for c in calls[n:]]
        assert seen == want, (first_step, seen)
    with pytest.raises(ConfigError, match=re.escape("--config.log.profile_start=0")):
        validation.validate(_tiny(**{"log.profile_steps": 2, "log.profile_start": 0}))
    validation.validate(_tiny(**{"log.profile_steps": 0, "log.profile_start": 0}))


def test_keras_epochs_have_ceil_steps_the_default_floor(tmp_path):
    """train.epoch_steps=ceil is the papers' Keras epoch (steps_per_epoch = N/B: a pass
    ends in a partial batch), so a 384-image target at batch 256 takes 2 updates an epoch;
    floor takes 1. The run's phases and results.json follow the rule."""
    from medtransfer_jax.training import phases
    assert [phases.steps_per_epoch(n, 256, "ceil") for n in (384, 512, 100)] == [2, 2, 1]
    assert [phases.steps_per_epoch(n, 256, "floor") for n in (384, 512, 100)] == [1, 2, 1]
    res = {}
    for rule in ("floor", "ceil"):
        c = _tiny(**{"train.epoch_steps": rule, "train.num_steps": 0, "train.num_epochs": 1,
                     "eval.every_steps": 0, "train.batch_size": 24})
        res[rule] = loop.train_and_evaluate(c, str(tmp_path / rule))
    n = res["floor"]["num_train"]
    assert n % 24, "the tiny split must leave a partial batch"
    assert (res["floor"]["steps_per_epoch"], res["ceil"]["steps_per_epoch"]) == (
        n // 24, n // 24 + 1)
    assert res["ceil"]["last_step"] == n // 24 + 1
    with pytest.raises(ConfigError, match="train.epoch_steps=round"):
        loop.train_and_evaluate(_tiny(**{"train.epoch_steps": "round"}), str(tmp_path / "x"))


def test_a_sigmoid_binary_head_trains_exports_and_reloads(tmp_path):
    """model.head=sigmoid_binary (Revisiting Feb-2023's Keras binary head): a 2-class run
    trains a 1-unit head, exports it with head='sigmoid' in its metadata, the export
    reloads as that model, and its predictions are 2-class probabilities."""
    from medtransfer_jax.weights import checkpoint as weights_lib
    wd = tmp_path / "run"
    res = loop.train_and_evaluate(_tiny(**{"model.head": "sigmoid_binary"}), str(wd))
    loaded = weights_lib.load_model(str(wd / "export" / "best"))
    assert loaded.metadata.head == "sigmoid" and loaded.model.head == "sigmoid"
    assert loaded.variables["params"]["predictions"]["kernel"].shape[-1] == 1
    rows = predictions.read_predictions(str(wd / "predictions.csv"))
    assert rows["probs"].shape[1] == 2
    np.testing.assert_allclose(rows["probs"].sum(-1), 1.0, atol=1e-5)
    assert 0.0 <= res["test"]["auc"] <= 1.0
    with pytest.raises(ConfigError, match="model.head=sigmoid"):
        loop.train_and_evaluate(_tiny(**{"model.head": "sigmoid"}), str(tmp_path / "x"))


def test_slow_steps_get_console_lines_that_leave_the_metrics_unchanged(tmp_path, capfd):
    """log.every_secs: a console line when that long passed without one (a CPU step of a
    ResNet50 left minutes of silence between log.every_steps lines), and one when the first
    step (compile + run) is done; the metrics files are those of a run without them."""
    import logging as pylogging
    from absl import logging as absl_logging
    runs = {}
    for secs in (0.0, 1e-9):       # 1e-9: due after every step
        wd = str(tmp_path / f"secs{secs}")
        handler = pylogging.StreamHandler(stream=__import__("io").StringIO())
        absl_logging.get_absl_logger().addHandler(handler)
        old = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.INFO)
        try:
            loop.train_and_evaluate(_tiny(**{"log.every_secs": secs, "log.every_steps": 100,
                                             "sharding.num_devices": 1}), wd)
        finally:
            absl_logging.get_absl_logger().removeHandler(handler)
            absl_logging.set_verbosity(old)
        runs[secs] = wd, handler.stream.getvalue()
    quiet, chatty = runs[0.0][1], runs[1e-9][1]
    beats = re.findall(r"step (\d+)/8 \| phase 0 \| loss [\d.]+ \(mean of the last (\d+) "
                       r"steps\)", chatty)
    assert [int(s) for s, _ in beats] == list(range(2, 8))          # steps 2..7 (8 logs)
    assert [int(n) for _, n in beats] == list(range(2, 8))          # the interval so far
    assert "(mean of the last" not in quiet
    for text in (quiet, chatty):
        assert re.search(r"phase 0: compiling the train step .* running step 1", text)
        assert re.search(r"step 1: compiled and ran in ", text)

    def metrics(wd):   # every logged value but the clock and the speed
        with open(os.path.join(wd, "metrics.jsonl")) as f:
            return [{k: v for k, v in json.loads(l).items() if k not in ("img_per_s", "time")}
                    for l in f]
    a, b = metrics(runs[0.0][0]), metrics(runs[1e-9][0])
    assert a == b and [r["step"] for r in a if r["split"] == "train"] == [8]
