"""Files of a finished run damaged after the fact (0 bytes, random non-UTF-8 bytes, valid
JSON without a key, deleted), as the corruption audit did them: each command either
recovers (the run is redone) or stops with one line ``CMD: error: ...`` that names the
damaged file and the command that rewrites it, exit 2, no traceback, and nothing written.

One tiny training run (ResNet18 width 8, 32 px, 12 steps; ~10 s) is made per module and
copied for every case, so each case damages exactly one file of an intact run.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
from _train_utils import REPO, TINY_CONFIG, one_error_line, subprocess_env

from medtransfer_jax import configs
from medtransfer_jax.data.base import DataError
from medtransfer_jax.inference import predictions
from medtransfer_jax.training import finalize, loop
from medtransfer_jax.weights import checkpoint

#: 300 bytes that are not UTF-8 (0xff never occurs in UTF-8), like `head -c 300 /dev/urandom`.
GARBAGE = bytes([0xFF, 0xFE, 0x00, 0x9C]) + bytes(range(128, 256)) * 2 + b"\x80" * 40


def _garble(path):
    with open(path, "wb") as f:
        f.write(GARBAGE)


def _zero(path):
    open(path, "wb").close()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)




@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A done tiny run that keeps its checkpoints (the tiny config's keep_when_done)."""
    wd = str(tmp_path_factory.mktemp("finished") / "run")
    loop.train_and_evaluate(configs.resolve(TINY_CONFIG, []), wd)
    return wd


@pytest.fixture
def run(finished_run, tmp_path):
    """A fresh copy of the finished run, for one case to damage."""
    wd = str(tmp_path / "run")
    shutil.copytree(finished_run, wd)
    return wd


# -------------------------------------------------------------------- results.json
def test_read_results_treats_undecodable_or_non_object_json_as_no_results(run):
    path = os.path.join(run, "results.json")
    assert finalize.read_results(run)["status"] == "done"
    good = json.load(open(path))
    for damage in (_garble, _zero, lambda p: open(p, "w").write("[1, 2]")):
        damage(path)
        assert finalize.read_results(run) is None
    # 'done' with its metrics missing, empty, or not numbers (NaN is a number: one class)
    for test in (None, {}, dict(good["test"], auc=None), dict(good["test"], auc="0.9")):
        with open(path, "w") as f:
            json.dump(dict(good, test=test) if test is not None else
                      {k: v for k, v in good.items() if k != "test"}, f)
        assert finalize.read_results(run) is None, test
    with open(path, "w") as f:
        json.dump(dict(good, test=dict(good["test"], auc=float("nan"))), f)
    assert finalize.read_results(run)["status"] == "done"


def test_train_redoes_a_run_whose_results_json_is_not_utf8(run):
    _garble(os.path.join(run, "results.json"))
    p = _cli("medtransfer_jax.train", f"--config={TINY_CONFIG}", f"--workdir={run}")
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(run, "results.json")) as f:
        res = json.load(f)
    assert res["status"] == "done" and res["last_step"] == 12 and "auc" in res["test"]


# -------------------------------------------------------------------- config.json (train)
@pytest.mark.parametrize("damage", [_zero, _garble], ids=["zero", "garbage"])
def test_train_resume_refuses_a_damaged_config_json(run, damage):
    """A run with checkpoints but no results: resuming would check the config against
    config.json. Damaged, it is the only record of the run's settings, so it is kept and
    the user is told to restore it or start over, not silently overwritten."""
    os.remove(os.path.join(run, "results.json"))
    cfg = os.path.join(run, "config.json")
    damage(cfg)
    before = open(cfg, "rb").read()
    p = _cli("medtransfer_jax.train", f"--config={TINY_CONFIG}", f"--workdir={run}")
    one_error_line(p, "train", f"{cfg} is damaged", "restore that file",
                "move the workdir away", "fresh --workdir")
    assert open(cfg, "rb").read() == before
    assert not os.path.exists(os.path.join(run, "results.json"))


# -------------------------------------------------------------------- config.json (evaluate)
def _nokey(path):
    with open(path) as f:
        cfg = json.load(f)
    del cfg["data"]
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("damage, problem", [
    (_zero, "is damaged (JSONDecodeError"),
    (_garble, "is damaged (UnicodeDecodeError"),
    (os.remove, "does not exist"),
    (_nokey, "has no 'data' section"),
], ids=["zero", "garbage", "deleted", "no-data"])
def test_evaluate_refuses_a_run_whose_data_config_is_lost(run, damage, problem):
    """Without the run's data config the defaults would test other images (the audit:
    n=77 instead of the run's 16/64) and say nothing."""
    cfg = os.path.join(run, "config.json")
    damage(cfg)
    before = sorted(os.listdir(run))
    for given in (run, os.path.join(run, "export", "best")):
        p = _cli("medtransfer_jax.evaluate", f"--checkpoint={given}")
        one_error_line(p, "evaluate", f"{cfg} {problem}", "restore that file", "--dataset")
    assert sorted(os.listdir(run)) == before   # no predictions file written


def test_evaluate_with_dataset_given_goes_on_without_the_run_config(run):
    cfg = os.path.join(run, "config.json")
    _garble(cfg)
    out = os.path.join(run, "p.csv")
    p = _cli("medtransfer_jax.evaluate", f"--checkpoint={run}", "--dataset=synthetic",
             f"--output={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{cfg} is damaged" in p.stderr   # said as a warning
    assert len(predictions.read_predictions(out)["label"]) > 0


# -------------------------------------------------------------------- predictions.csv
@pytest.mark.parametrize("damage, problem", [(_zero, "is empty"),
                                             (_garble, "is damaged (not CSV text")],
                         ids=["zero", "garbage"])
def test_damaged_predictions_csv_names_the_command_that_rewrites_it(run, damage, problem):
    path = os.path.join(run, "predictions.csv")
    original = predictions.read_predictions(path)
    damage(path)
    with pytest.raises(DataError) as e:
        predictions.read_predictions(path)
    msg = str(e.value)
    assert f"predictions file {path} {problem}" in msg and "\n" not in msg
    # The fix the message gives really rewrites the file: same val/test rows as the run's.
    fix = msg.split("`")[1].split()
    assert fix[:3] == ["python", "-m", "medtransfer_jax.evaluate"]
    p = _cli(*fix[2:])
    assert p.returncode == 0, p.stderr[-3000:]
    again = predictions.read_predictions(path)
    assert "--splits=val,test " in msg              # the file's splits, not the train pass
    assert sorted(set(again["split"])) == sorted(set(original["split"]))
    for split in ("val", "test"):
        a, b = original["split"] == split, again["split"] == split
        assert list(original["id"][a]) == list(again["id"][b])
        assert (original["probs"][a] == again["probs"][b]).all()
    # a per-split file of the run: that split only
    per_split = os.path.join(run, "predictions", "test.csv")
    _zero(per_split)
    with pytest.raises(DataError, match=f"--checkpoint={run} --splits=test --output="):
        predictions.read_predictions(per_split)


def test_a_predictions_file_outside_a_run_gets_the_generic_fix(tmp_path):
    path = tmp_path / "preds.csv"
    path.write_text("")
    with pytest.raises(DataError, match="evaluate --checkpoint=WEIGHTS --output="):
        predictions.read_predictions(str(path))


def test_analyze_predictions_names_an_undecodable_file(run, tmp_path):
    """The audit: `analyze: error: 'utf-8' codec can't decode byte 0xff ...`, no file."""
    path = os.path.join(run, "predictions.csv")
    _garble(path)
    out = tmp_path / "o"
    p = _cli("medtransfer_jax.analyze", "predictions", f"--predictions_a={path}",
             f"--predictions_b={path}", f"--output_dir={out}")
    one_error_line(p, "analyze", f"predictions file {path} is damaged", "evaluate --checkpoint=")
    assert not out.exists()


# -------------------------------------------------------------------- export/best/metadata.json
def test_damaged_export_metadata_tells_how_the_run_rewrites_it(run, tmp_path):
    meta = os.path.join(run, "export", "best", "metadata.json")
    _garble(meta)
    p = _cli("medtransfer_jax.evaluate", f"--checkpoint={run}")
    line = one_error_line(p, "evaluate", f"Cannot read {meta}", "UnicodeDecodeError",
                       f"move {run}/results.json away",
                       f"python -m medtransfer_jax.train --workdir={run}")
    assert "convert" not in line   # a training export is not made by convert
    out = tmp_path / "o"
    p = _cli("medtransfer_jax.analyze", "weights", f"--weights_a={run}/export/best",
             f"--weights_b={run}/export/last", f"--output_dir={out}")
    one_error_line(p, "analyze", f"Cannot read {meta}", "results.json away")
    assert not out.exists()


def test_damaged_export_metadata_is_rewritten_by_the_fix_it_names(run):
    _zero(os.path.join(run, "export", "best", "metadata.json"))
    with pytest.raises(checkpoint.CheckpointError, match="results.json away"):
        checkpoint.load_metadata(os.path.join(run, "export", "best"))
    os.rename(os.path.join(run, "results.json"), os.path.join(run, "results.old"))
    p = _cli("medtransfer_jax.train", f"--config={TINY_CONFIG}", f"--workdir={run}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert checkpoint.load_metadata(os.path.join(run, "export", "best")).source == "finetuned"


@pytest.mark.parametrize("layout, expect", [
    (("study", "sources", "random", "weights"),
     "delete {d} and rerun the study's own command (`python -m medtransfer_jax.study "
     "--workdir={root}/study --config=...` with its --config) adding --stages=sources "
     "--force"),
    (("converted", "imagenet"), "python -m medtransfer_jax.convert --output_dir={d}"),
])
def test_damaged_metadata_hint_follows_what_the_directory_is(tmp_path, layout, expect):
    d = tmp_path.joinpath(*layout)
    d.mkdir(parents=True)
    (d / "metadata.json").write_text('{"layout": "keras_v1"}')   # valid JSON, no 'source'
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_metadata(str(d))
    assert "TypeError" in str(e.value) and str(d / "metadata.json") in str(e.value)
    assert expect.format(d=d, root=tmp_path) in str(e.value)


def test_metadata_with_a_bad_value_keeps_its_own_message(tmp_path):
    (tmp_path / "metadata.json").write_text('{"source": "x", "layout": "keras_v9"}')
    with pytest.raises(checkpoint.CheckpointError, match="^metadata layout='keras_v9'"):
        checkpoint.load_metadata(str(tmp_path))


# -------------------------------------------------------------------- auc_vs_similarity
def _auc_vs_similarity_runs(tmp_path, sim_text):
    rand = tmp_path / "random.json"
    rand.write_text(json.dumps({"status": "done", "test": {"auc": 0.6}}))
    runs = []
    for i in range(2):
        sim, res = tmp_path / f"sim{i}.csv", tmp_path / f"res{i}.json"
        sim.write_text("layer,method,value\nconv1_relu,paper_cca,0.%d\n" % (i + 3))
        res.write_text(json.dumps({"status": "done", "test": {"auc": 0.7 + i / 10}}))
        runs.append(f"--run={sim},{res},{rand}")
    bad = tmp_path / "sim0.csv"
    if isinstance(sim_text, bytes):
        bad.write_bytes(sim_text)
    else:
        bad.write_text(sim_text)
    return str(bad), runs


@pytest.mark.parametrize("text, expect", [
    ("lyr,method,value\nconv1_relu,paper_cca,0.3\n",
     ["no column(s) ['layer'] (it has ['lyr', 'method', 'value'])"]),
    (GARBAGE, ["not UTF-8 text"]),
    ("layer,method,value\nconv1_relu,paper_cca,0.3\nconv2_relu,pap",
     ["line 3 has 2 fields, the header 3"]),
    ("layer,method,value\nconv1_relu,paper_cca,high\n",
     ["column 'value' holds 'high', not a number"]),
], ids=["no-layer-column", "garbage", "cut-short", "not-a-number"])
def test_auc_vs_similarity_names_a_damaged_similarity_table(tmp_path, text, expect):
    bad, runs = _auc_vs_similarity_runs(tmp_path, text)
    out = tmp_path / "o"
    p = _cli("medtransfer_jax.analyze", "auc_vs_similarity", *runs, f"--output_dir={out}")
    one_error_line(p, "analyze", f"{bad}: ", "analyze similarity", *expect)
    assert not out.exists()


@pytest.mark.parametrize("damage, expect", [(b"", "not JSON"), (GARBAGE, "not UTF-8 text")],
                         ids=["empty", "garbage"])
def test_auc_vs_similarity_names_a_damaged_results_file(tmp_path, damage, expect):
    _, runs = _auc_vs_similarity_runs(tmp_path, "layer,method,value\nconv1_relu,paper_cca,0.3\n")
    bad = tmp_path / "res1.json"
    bad.write_bytes(damage)
    out = tmp_path / "o"
    p = _cli("medtransfer_jax.analyze", "auc_vs_similarity", *runs, f"--output_dir={out}")
    one_error_line(p, "analyze", f"{bad}: {expect}", "results.json a finished run wrote")
    assert not out.exists()


def test_the_retrain_hint_names_the_config_a_sweep_run_ran_with(tmp_path):
    """A bare `train --workdir=RUN` would train the default config into a study's run (and
    the study would average it in): the hint names the run's own sweep_config.py."""
    for with_sweep_config, expect in ((True, "--config={run}/sweep_config.py`"),
                                      (False, "--config=<the config it was trained with")):
        run = tmp_path / f"run{int(with_sweep_config)}"
        best = run / "export" / "best"
        best.mkdir(parents=True)
        (best / "metadata.json").write_bytes(GARBAGE)
        if with_sweep_config:
            (run / "sweep_config.py").write_text("def get_config(arg=None): ...\n")
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load_metadata(str(best))
        assert f"python -m medtransfer_jax.train --workdir={run} " + expect.format(
            run=run) in str(e.value)
