"""Two local processes as two JAX hosts (1 CPU device each) train like one process, in one
shared workdir where every shared file has exactly one writer (process 0).

The processes run under tests/_write_audit.py, which records every write through
medtransfer_jax.paths and every ``open`` for writing, with the writer's process index.
"""
import json
import os
import subprocess
import sys

import _train_utils
import jax
import numpy as np
import pytest

from medtransfer_jax.training import loop, sweep
from medtransfer_jax.weights.checkpoint import load_weights

CONFIG = _train_utils.TINY_CONFIG + ":multihost"


@pytest.mark.multiprocess
def test_two_hosts_match_single_process(tmp_path):
    if jax.device_count() < 2:
        pytest.skip("needs 2 local devices for the single-process reference")
    wd = str(tmp_path / "mh")
    env = _train_utils.subprocess_env()
    env.pop("XLA_FLAGS", None)  # each process: exactly one CPU device
    audit = str(tmp_path / "writes.jsonl")
    outs = _two_hosts(wd, audit, env)
    assert "mesh {'data': 2}" in outs[0]
    with open(os.path.join(wd, "results.json")) as f:
        res = json.load(f)
    assert res["num_processes"] == 2 and res["num_devices"] == 2
    # Each host saved its own data-iterator position.
    it_dir = os.path.join(wd, "checkpoints", "6", "data_iter")
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(it_dir))

    # Reference: one process, a 2-device mesh, the same global batches.
    ref_wd = str(tmp_path / "ref")
    cfg = sweep.load_config(sweep.Run("ref", CONFIG, ref_wd, ["sharding.num_devices=2"]))
    ref = loop.train_and_evaluate(cfg, ref_wd)
    for split in ("val", "test"):
        assert res[split]["num_examples"] == ref[split]["num_examples"]
        assert res[split]["loss"] == pytest.approx(ref[split]["loss"], rel=1e-4)
        assert res[split]["auc"] == pytest.approx(ref[split]["auc"], abs=1e-3)

    def train_losses(d):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]

    got, want = train_losses(wd), train_losses(ref_wd)
    assert [s for s, _ in got] == [s for s, _ in want] == [2, 4, 6]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in want], rtol=1e-4)
    a, _ = load_weights(os.path.join(wd, "export", "last"))
    b, _ = load_weights(os.path.join(ref_wd, "export", "last"))
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, atol=2e-4, rtol=1e-3)
    _assert_one_writer(audit, wd, ref_wd)

    # The done run called again without keep_when_done: both hosts meet, process 0 deletes.
    outs = _two_hosts(wd, str(tmp_path / "writes2.jsonl"), env,
                      "--config.checkpoint.keep_when_done=False")
    assert "removed its training checkpoints" in outs[0]
    assert not os.path.exists(os.path.join(wd, "checkpoints"))
    assert os.path.isfile(os.path.join(wd, "export", "best", "metadata.json"))


def _two_hosts(wd, audit, env, *extra):
    """``train`` as processes 0 and 1 of a 2-host job (one CPU device each); their outputs."""
    return _as_two_hosts(lambda i, port: [
        sys.executable, os.path.join(_train_utils.REPO, "tests", "_write_audit.py"), audit,
        f"--config={CONFIG}", f"--workdir={wd}",
        f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
        "--num_cpu_devices=1", "--xla_cache_dir=", *extra], env, _train_utils.REPO)


def _as_two_hosts(command, env, cwd):
    """Runs ``command(process_id, port)`` as processes 0 and 1 of a 2-host job; asserts
    both exit 0; their outputs."""
    port = _train_utils.free_port()
    procs = [subprocess.Popen(command(i, port), env=env, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=400)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


SHARED = ("config.json", "results.json", "metrics.jsonl", "predictions.csv",
          "predictions/val.csv", "predictions/test.csv", "export/best/metadata.json",
          "export/last/metadata.json")


def _target(path: str, wd: str) -> str:
    """Workdir-relative name of a written file; an atomic write's temporary file
    (``.NAME.tmp-PID-XXXX``) counts as NAME."""
    rel = os.path.relpath(path, wd)
    head, name = os.path.split(rel)
    if name.startswith(".") and ".tmp-" in name:
        rel = os.path.join(head, name[1:name.index(".tmp-")])
    return rel


def _assert_one_writer(audit: str, wd: str, ref_wd: str) -> None:
    """Shared files: written by process 0 only, each whole file once (metrics.jsonl: one
    append per event), the same rows as the one-process run's; process 1 writes nothing
    outside the checkpoints (collective, orbax) and its own lock file."""
    with open(audit) as f:
        recs = [json.loads(line) for line in f]
    mine = [(r["process"], _target(r["path"], wd), r["how"]) for r in recs
            if os.path.abspath(r["path"]).startswith(wd + os.sep)]
    assert {p for p, _, _ in mine} == {0, 1}, "the audit saw both processes"
    by_1 = {t for p, t, _ in mine if p == 1}
    assert all(t.startswith("checkpoints" + os.sep) or t == ".lock.1" for t in by_1), by_1
    for name in SHARED:
        api = [(p, how) for p, t, how in mine if t == name and not how.startswith("open")]
        if name == "metrics.jsonl":
            assert {p for p, _ in api} == {0} and api[0][1] == "write_text_atomic"
        else:
            assert api == [(0, "write_text_atomic")], (name, api)
    assert not any(t.startswith("tb" + os.sep) for t in by_1)
    assert any(p == 0 and t.startswith("tb" + os.sep) for p, t, _ in mine)

    def rows(d, name):
        with open(os.path.join(d, name)) as f:
            return f.read().splitlines()

    events = [json.loads(line) for line in rows(wd, "metrics.jsonl")]  # no cut lines
    ref_events = [json.loads(line) for line in rows(ref_wd, "metrics.jsonl")]
    assert [(e["step"], e["split"]) for e in events] == \
        [(e["step"], e["split"]) for e in ref_events]
    appends = sum(1 for p, t, how in mine if t == "metrics.jsonl" and how == "append_text")
    assert appends == len(events)
    for name in ("predictions.csv", "predictions/test.csv"):
        got, want = rows(wd, name), rows(ref_wd, name)
        assert got[0] == want[0] and len(got) == len(want)
        assert [r.split(",")[:4] for r in got] == [r.split(",")[:4] for r in want]
        np.testing.assert_allclose([[float(x) for x in r.split(",")[4:]] for r in got[1:]],
                                   [[float(x) for x in r.split(",")[4:]] for r in want[1:]],
                                   atol=1e-3)


@pytest.mark.multiprocess
def test_an_inprocess_sweep_joins_the_hosts(tmp_path):
    """``sweep --mode=inprocess --multihost``: the runs train in the sweep's own process,
    so it must join the other hosts (it did not: each host trained alone, 1 process)."""
    env = _train_utils.subprocess_env()
    env.pop("XLA_FLAGS", None)  # each process: exactly one CPU device
    out_dir = tmp_path / "sweep"
    tiny = ["train.num_steps=2", "data.synthetic.num_examples=64", "data.image_size=32",
            "data.synthetic.image_size=32", "model.width=8", "train.batch_size=16",
            "eval.batch_size=16"]
    _as_two_hosts(lambda i, port: [
        sys.executable, "-m", "medtransfer_jax.sweep", "--study=demo", "--folds=0",
        "--mode=inprocess", f"--output_dir={out_dir}", "--xla_cache_dir=",
        f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
        *[f"--override={o}" for o in tiny]], env, "/")
    with open(out_dir / "demo" / "fold0" / "seed0" / "results.json") as f:
        res = json.load(f)
    assert res["num_processes"] == 2 and res["num_devices"] == 2
