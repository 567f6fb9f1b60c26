"""Similarity/scaling benchmarks at tiny sizes: the NumPy reference, rows, the CLI."""
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from _train_utils import REPO, subprocess_env
from _numpy_oracle import numpy_similarity
from medtransfer_jax.analysis import compare
from medtransfer_jax.analysis import similarity as S
from medtransfer_jax.bench import scaling
from medtransfer_jax.bench import similarity as B

ROW_KEYS = set(B.COLUMNS)


@pytest.mark.parametrize("n,p,q", [(500, 12, 12), (300, 8, 16)])
def test_svcca_baseline_matches_oracle_and_kernels(n, p, q):
    """The google/svcca-algorithm baseline the bench times computes the same quantities as
    the float64 test oracle and the kernels (three independent formulations)."""
    X, Y = B.make_data(n, p, q, seed=3)
    for m in B.BASELINE_METHODS:
        want = numpy_similarity(X, Y, m)
        assert B.svcca_baseline(X, Y, m) == pytest.approx(want, abs=1e-6), m
        assert float(S.similarity(X, Y, m)) == pytest.approx(want, abs=1e-5), m
    ref = {m: B.svcca_baseline(X, Y, m) for m in B.BASELINE_METHODS}
    # the data are partly shared, so the methods give distinct, non-trivial values
    assert 0.05 < ref["mean_cca"] < 0.95
    assert abs(ref["pwcca"] - ref["mean_cca"]) > 1e-3  # the weights matter
    assert abs(ref["svcca"] - ref["mean_cca"]) > 1e-3  # the 99% cut drops directions


def test_svcca_baseline_identities_and_errors():
    X, _ = B.make_data(400, 10, seed=1)
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(10, 10)))[0]
    Y = (3.0 * X @ rot + 5.0).astype(np.float32)  # rotation + scale + shift of X
    for m in B.BASELINE_METHODS:
        assert B.svcca_baseline(X, Y, m) == pytest.approx(1.0, abs=1e-6), m
    Z = np.random.default_rng(2).normal(size=X.shape).astype(np.float32)
    assert B.svcca_baseline(X, Z, "linear_cka") < 0.1
    with pytest.raises(ValueError, match="No NumPy baseline"):
        B.svcca_baseline(X, Y, "rbf_cka")


def test_run_rows():
    methods = ["mean_cca", "pwcca", "linear_cka", "rbf_cka"]
    rows = B.run(neurons=[8, 16], datapoints=[300], methods=methods, repeats=1,
                 routes=["qr", "covariance"])
    assert [(r["method"], r["p"], r["n"]) for r in rows] == [
        (m, p, 300) for p in (8, 16) for m in methods for _ in range(2)]
    assert [r["route"] for r in rows[:2]] == ["qr->qr", "covariance->covariance"]
    assert "no covariance form" in rows[7]["note"]  # rbf_cka, forced covariance
    for r in rows:
        assert set(r) == ROW_KEYS
        if r["note"].startswith("skipped"):
            continue
        assert math.isfinite(r["jax_s"]) and r["jax_s"] > 0 and r["compile_s"] >= 0
        assert math.isfinite(r["value"])
        if r["method"] == "rbf_cka":
            assert math.isnan(r["numpy_s"]) and "no NumPy" in r["note"]
        else:
            assert r["numpy_s"] > 0 and r["speedup"] == pytest.approx(r["numpy_s"] / r["jax_s"])
            assert r["abs_diff"] < 1e-5
    # CCA with n <= p is skipped with a note, not an exception
    skipped = B.run(neurons=[16], datapoints=[10], methods=["mean_cca"], repeats=1)
    assert "n > p" in skipped[0]["note"] and math.isnan(skipped[0]["jax_s"])
    with pytest.raises(ValueError, match="unknown method"):
        B.run(neurons=[8], datapoints=[100], methods=["magic"])


def test_run_network_tiny(capsys, monkeypatch):
    from medtransfer_jax import ticker
    monkeypatch.setattr(ticker, "INTERVAL_S", 0.0)   # every throttled line
    proto = compare.PaperCCAProtocol(positions=200, num_channels=8, repeats=2, batch_size=4)
    rows = B.run_network(num_images=4, image_size=64, depth=18, width=8, protocol=proto)
    # progress on stderr (minutes per part for ResNet50 on a CPU): each of the three parts
    # when it starts and ends, and its forward passes batch by batch (4 images a repeat)
    err = capsys.readouterr().err.splitlines()
    ticks = [l for l in err if re.search(r": \d+/\d+ images, ", l)]
    assert [l.split(": ")[1] for l in err if l not in ticks] == [
        "1/3 cold run (compiles included) ...", "1/3 cold run", "2/3 warm run ...",
        "2/3 warm run", "3/3 split run (extract, then similarity per layer) ...",
        "3/3 extract", "3/3 similarity"], err
    assert [l.split(": ")[2].split(", ")[:2] for l in ticks] == [
        ["4/8 images", "repeat 1/2"], ["8/8 images", "repeat 2/2"]] * 3, err
    layers = [r for r in rows if r["what"] == "similarity"]
    assert [r["layer"] for r in layers] == [
        "conv1_relu", "conv2_block2_out", "conv3_block2_out", "conv4_block2_out",
        "conv5_block2_out"]
    for r in layers:
        assert 0.0 < r["value"] < 1.0 and r["channels"] == 8 and r["datapoints"] > 8
    by = {r["what"]: r["seconds"] for r in rows if r["what"] != "similarity"}
    assert set(by) == {"extract (warm)", "similarity (warm)", "other (warm)",
                       "end to end (warm)", "end to end (first, incl. compile)"}
    assert all(math.isfinite(s) for s in by.values()), by
    assert min(by["extract (warm)"], by["similarity (warm)"], by["end to end (warm)"]) > 0
    assert by["end to end (first, incl. compile)"] > by["end to end (warm)"]


def test_scaling_cca_sweeps():
    rows = scaling.run(width=8, batch_sizes=(), image_sizes=(), neurons=(8, 16),
                       datapoints=(200, 400), base_neurons=8, base_datapoints=200, repeats=1)
    assert [(r["varied"], r["neurons"], r["datapoints"]) for r in rows] == [
        ("neurons", 8, 200), ("neurons", 16, 200), ("datapoints", 8, 200),
        ("datapoints", 8, 400)]
    for r in rows:
        assert r["what"].startswith("cca") and r["time_ms"] > 0 and math.isfinite(r["per_s"])
    assert rows[0]["rel_time"] == 1.0 and rows[1]["flop_ratio"] == 4.0
    assert rows[3]["flop_ratio"] == 2.0


def test_cli_similarity_prints_table():
    cmd = [sys.executable, "-m", "medtransfer_jax.bench", "similarity", "--neurons=8",
           "--datapoints=300", "--methods=mean_cca,linear_cka", "--repeats=1"]
    out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    # stdout is the labelled report alone; the rows measured along the way went to stderr
    # under their own header
    assert text.strip().startswith("## Similarity kernels vs the google/svcca NumPy")
    assert "- backend:" in text
    progress = [ln for ln in out.stderr.splitlines() if ln.startswith("|")]
    assert progress[0].startswith("| method | route |") and len(progress) == 4, out.stderr
    table = text[text.index("| method |"):].strip().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:12] == ["method", "route", "svd", "p", "n", "jax_s", "compile_s",
                           "numpy_s", "speedup", "value", "abs_diff", "diff_vs_default"]
    body = [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in table[2:]]
    assert [(r["method"], r["p"], r["n"]) for r in body] == [
        ("mean_cca", "8", "300"), ("linear_cka", "8", "300")]
    for r in body:
        assert float(r["jax_s"]) > 0 and float(r["numpy_s"]) > 0
        assert float(r["abs_diff"]) < 1e-4


def test_train_bench_counts_the_whole_mesh_flops():
    """FLOPs per image must not depend on how many devices share the batch (XLA's cost
    analysis describes the per-device program; unscaled, 2 devices would show half)."""
    from medtransfer_jax.bench import train_throughput as tt
    rows = [tt.bench_jax_step(depth=18, width=8, image_size=32, batch_size=8, num_devices=n,
                              iters=1, repeats=1) for n in (1, 2)]
    one, two = (r["gflop_per_img"] for r in rows)
    assert np.isfinite(one) and one > 0
    # The gradient all-reduce adds a little arithmetic at this tiny size (~11%).
    assert two == pytest.approx(one, rel=0.25)
    assert all(r["img_per_s"] > 0 and r["devices"] == n for r, n in zip(rows, (1, 2)))


def test_train_bench_flops_are_the_models_arithmetic(caplog):
    """The FLOP count is the jaxpr's (jax.experimental.roofline), the same on any backend.
    On CPU, where XLA's compiled program still shows its convolutions, XLA's own count is
    an independent check; on GPU XLA hides them in cuDNN custom calls (22.2 -> 0.40 GFLOP
    per 224 px ResNet50 image on an H200, lowered and compiled alike with jax 0.11.2)."""
    import jax
    from medtransfer_jax import sharding
    from medtransfer_jax.bench import train_throughput as tt
    mesh = sharding.make_mesh(1)
    state, step = tt.make_train_state_and_step(mesh, depth=18, image_size=32,
                                               dtype="float32", width=8)
    rng = np.random.default_rng(0)
    batch = sharding.make_global_batch(mesh, {
        "image": rng.standard_normal((4, 32, 32, 3)).astype(np.float32),
        "label": np.zeros(4, np.int32), "weight": np.ones(4, np.float32)})
    counted = tt.model_flops(step, state, batch)
    lowered = step.lower(state, batch)
    low, comp = tt.program_flops(lowered), tt.program_flops(lowered.compile())
    assert counted and low and comp and jax.default_backend() == "cpu"
    assert counted == pytest.approx(comp, rel=0.1) and counted == pytest.approx(low, rel=0.1)
    # forward convolutions alone (2 x MACs of the stem and the 3x3 blocks) are a floor
    assert counted > 2 * 4 * (16 * 16 * 7 * 7 * 3 * 8)
    # the count does not depend on the batch's values, and the bench's row is this count
    row = tt.bench_jax_step(depth=18, width=8, image_size=32, batch_size=4, num_devices=1,
                            iters=1, repeats=1)
    assert row["gflop_per_img"] == pytest.approx(counted / 4 / 1e9, rel=1e-6)
    # roofline's warning for primitives without a rule stays out of the output
    assert not [r for r in caplog.records if "roofline" in r.getMessage()]


def test_grid_mfu_uses_the_train_benchs_count_for_resnet50():
    """The grid bench's per-image constant is the train bench's count of the real step
    (ResNet50, 224 px, width 64): traced, not compiled, so cheap on a CPU."""
    import jax
    from medtransfer_jax import sharding
    from medtransfer_jax.bench import grid, train_throughput as tt
    mesh = sharding.make_mesh(1)
    state, step = tt.make_train_state_and_step(mesh, depth=50, image_size=224,
                                               dtype="bfloat16", width=64)
    batch = {"image": jax.ShapeDtypeStruct((8, 224, 224, 3), np.float32),
             "label": jax.ShapeDtypeStruct((8,), np.int32),
             "weight": jax.ShapeDtypeStruct((8,), np.float32)}
    assert tt.model_flops(step, state, batch) / 8 / 1e9 == pytest.approx(
        grid.TRAIN_GFLOP_224, rel=0.01)


def test_streaming_route_rows_agree_with_numpy():
    rows = B.run(neurons=[16], datapoints=[3000], methods=["streaming:mean_cca", "mean_cca"],
                 repeats=1)
    assert [r["method"] for r in rows] == ["streaming:mean_cca", "mean_cca"]
    for r in rows:
        assert np.isfinite(r["jax_s"]) and r["abs_diff"] < 1e-4, r
    assert rows[0]["value"] == pytest.approx(rows[1]["value"], abs=1e-4)
    with pytest.raises(ValueError, match="streaming:"):
        B.run(neurons=[8], datapoints=[100], methods=["streaming:rbf_cka"])


def test_train_bench_times_torch_compile_after_every_other_cell(monkeypatch):
    """torch.compile is the slowest thing the GPU script times: it goes last, so a timeout
    loses only its rows; each torch row carries its ratio to the matching JAX row."""
    from medtransfer_jax.bench import train_throughput as tt
    calls = []

    def fake_jax(*, batch_size, image_size, dtype, **_):
        calls.append(("jax", batch_size))
        return dict(framework="jax", image_size=image_size, batch=batch_size, dtype=dtype,
                    img_per_s=100.0 * batch_size)

    def fake_torch(*, batch_size, image_size, dtype, compile, **_):
        calls.append(("torch.compile" if compile else "torch", batch_size))
        return dict(framework="torch.compile" if compile else "torch", image_size=image_size,
                    batch=batch_size, dtype=dtype, img_per_s=50.0 * batch_size * (1 + compile))

    monkeypatch.setattr(tt, "bench_jax_step", fake_jax)
    monkeypatch.setattr(tt, "bench_torch_step", fake_torch)
    rows = tt.run(image_sizes=(32,), batch_sizes=(8, 16), dtypes=("bfloat16",),
                  torch_compile=True)
    assert calls == [("jax", 8), ("torch", 8), ("jax", 16), ("torch", 16),
                     ("torch.compile", 8), ("torch.compile", 16)]
    by = {(r["framework"], r["batch"]): r for r in rows}
    assert by[("jax", 8)]["jax_speedup"] == pytest.approx(2.0)        # vs eager torch
    assert by[("torch.compile", 16)]["jax_speedup"] == pytest.approx(1.0)


def _table(stdout, first_column):
    """The report's table as dicts (the stdout of a bench CLI run)."""
    table = stdout[stdout.index(f"| {first_column} |"):].strip().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in table[2:] if line.startswith("|")]


def test_cli_pipeline_with_default_workers_and_two_sizes():
    """The default --workers (0,1,2: 0 = in-process) run; every --image_sizes value gets
    rows; 'images' is the --num_images timed."""
    cmd = [sys.executable, "-m", "medtransfer_jax.bench", "pipeline", "--image_sizes=32,48",
           "--num_images=64"]
    out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith("## Input pipeline throughput")
    rows = _table(out.stdout, "workers")
    assert [(r["image_size"], r["workers"]) for r in rows] == [
        (s, w) for s in ("32", "48") for w in ("0", "1", "2")]
    for r in rows:
        assert r["images"] == "64" and float(r["images_per_s"]) > 0
        assert float(r["images_per_s"]) == pytest.approx(64 / float(r["seconds"]), rel=0.02)


@pytest.mark.parametrize("num_images, batch, timed", [(40, 32, 32), (16, 32, 16)])
def test_pipeline_times_num_images_in_whole_batches(monkeypatch, num_images, batch, timed):
    """Counts the batches the timed loop really draws (after 2 warm-up batches)."""
    from medtransfer_jax.bench import pipeline as P
    drawn = []
    real = P.pipeline.make_train_iter

    def counting(*args, **kw):
        it = real(*args, **kw)

        class Counted:
            def __next__(self):
                b = next(it)
                drawn.append(len(b["label"]))
                return b
        return Counted()

    monkeypatch.setattr(P.pipeline, "make_train_iter", counting)
    rows = P.run(image_size=32, worker_counts=(0,), num_images=num_images, fmt="png",
                 source_size=48, batch_size=batch)
    assert sum(drawn[2:]) == timed == rows[0]["images"]


def test_a_stopped_bench_promises_no_resume(tmp_path):
    """SIGTERM (a timeout) mid-benchmark: exit 143, the measured rows are on stderr and
    the message does not claim a saved checkpoint (benchmarks keep none)."""
    import signal
    import subprocess
    import sys
    import time
    from _train_utils import REPO, subprocess_env
    p = subprocess.Popen(
        [sys.executable, "-m", "medtransfer_jax.bench", "train", "--depth=18", "--width=8",
         "--image_sizes=32", "--batch_sizes=4,8,16,32", "--iters=400", "--repeats=9",
         "--dtypes=float32", "--nocompare_torch"],
        # one device: XLA:CPU's 8 fake devices can deadlock in an all-reduce under
        # hundreds of queued steps on 2 cores, with or without a signal
        cwd=tmp_path, env=dict(subprocess_env(), XLA_FLAGS=""), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 240
    while time.time() < deadline:
        line = p.stderr.readline()
        lines.append(line)
        if line.startswith("| jax |") or not line:  # the first measured row, or an exit
            break
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=240)
    err = "".join(lines) + err
    assert p.returncode == 143, err[-2000:]
    assert "| jax | 18 | 32 | 4 |" in err
    assert "bench: stopped (SIGTERM); the rows above are what was measured" in err
    assert "checkpoint" not in err and "saving" not in err and "Resume" not in err


def test_similarity_routes_alone_without_numpy():
    """--nocompare_numpy times the device routes only (GPU sizes, where the NumPy side
    takes seconds per call); both routes agree."""
    import subprocess
    import sys
    from _train_utils import REPO, subprocess_env
    p = subprocess.run([sys.executable, "-m", "medtransfer_jax.bench", "similarity",
                        "--neurons=16", "--datapoints=400", "--routes=qr,covariance",
                        "--methods=mean_cca", "--nocompare_numpy", "--repeats=1"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = _report_rows(p.stdout, "| mean_cca")
    assert [r["route"] for r in rows] == ["qr->qr", "covariance->covariance"]
    assert all(r["numpy_s"] == "nan" and "NumPy not run" in r["note"] for r in rows)
    assert abs(float(rows[0]["value"]) - float(rows[1]["value"])) < 1e-5


def _report_rows(stdout, prefix):
    """The similarity report's rows starting with ``prefix`` as {column: cell} dicts."""
    lines = stdout.splitlines()
    header = [c.strip() for c in next(x for x in lines if x.startswith("| method")).split("|")[1:-1]]
    return [dict(zip(header, (c.strip() for c in x.split("|")[1:-1])))
            for x in lines if x.startswith(prefix)]


def test_similarity_gpu_svd_algorithms_are_refused_on_cpu_before_any_work():
    """--svd_algorithms=jacobi on a CPU, or polar anywhere: one line naming the flag and
    why, exit 2."""
    import subprocess
    import sys
    from _train_utils import REPO, subprocess_env
    p = subprocess.run([sys.executable, "-m", "medtransfer_jax.bench", "similarity",
                        "--neurons=16", "--datapoints=400", "--svd_algorithms=default,jacobi"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2
    assert "--svd_algorithms: svd='jacobi' is a cuSOLVER algorithm" in p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "medtransfer_jax.bench", "similarity",
                        "--neurons=16", "--datapoints=400", "--svd_algorithms=polar"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--svd_algorithms: svd='polar' (cuSOLVER gesvdp) is not offered" in p.stderr


def test_step_profile_sums_the_traced_ops_per_step():
    """bench step_profile on a tiny ResNet: the trace is read back and summed per op."""
    from medtransfer_jax.bench import step_profile
    rows = step_profile.run(depth=18, width=8, image_size=32, batch_size=8,
                            dtype="float32", steps=2)
    by = {r["what"]: r for r in rows}
    wall = by["wall"]["ms"]
    assert wall > 0 and by["wall"]["share_of_wall"] == pytest.approx(1.0)
    cats = [r for r in rows if r["what"].startswith("category: ")]
    ops = [r for r in rows if r["what"].startswith("op: ")]
    assert cats and ops and len(ops) <= 12
    busy = by["device busy (sum of ops)"]["ms"]
    assert busy == pytest.approx(sum(r["ms"] for r in cats))
    assert busy > 0 and all(r["calls"] > 0 for r in cats + ops)
    assert [r["ms"] for r in ops] == sorted((r["ms"] for r in ops), reverse=True)


def test_step_profile_categories():
    from medtransfer_jax.bench import step_profile as sp
    assert sp.category("cudnn-conv-bias-activation.3") == "convolution"
    assert sp.category("input_reduce_fusion.7") == "reduction fusion"
    assert sp.category("loop_multiply_fusion") == "elementwise fusion"
    assert sp.category("cublas-gemm.1") == "matmul"
    assert sp.category("copy.4") == "copy/transpose"
    assert sp.category("all-reduce.1") == "collective"
    assert sp.category("rng-bit-generator.2") == "other"
    assert sp.category("custom-call.5 sm90_xmma_fprop_implicit_gemm_bf16") == "convolution"
    rows = sp.summarize([("conv.1", 0.004, "conv.1"), ("fusion.2", 0.002, "fusion.2"),
                         ("conv.1", 0.004, "conv.1")], steps=2, wall_s=0.02)
    by = {r["what"]: r for r in rows}
    assert by["wall"]["ms"] == pytest.approx(10.0)
    assert by["device busy (sum of ops)"]["ms"] == pytest.approx(5.0)
    assert by["idle (wall - busy)"]["share_of_wall"] == pytest.approx(0.5)
    assert by["category: convolution"]["calls"] == 1.0
    assert [r["what"] for r in rows][3:5] == ["category: convolution",
                                              "category: elementwise fusion"]


def test_similarity_svd_rows_reuse_the_default_rows_numpy_run(monkeypatch):
    """Other SVD algorithms (GPU only) are timed beside the default one: NumPy runs once,
    beside 'default', and their speedup / abs_diff / diff_vs_default use that run."""
    from medtransfer_jax.bench import similarity as bs
    calls = []

    def fake(X, Y, Xd, Yd, method, route="auto", *, repeats=3, baseline=True, svd="default"):
        calls.append((method, svd, baseline))
        value = {"default": 0.5, "jacobi": 0.5 + 1e-6}[svd]
        return dict(jax_s={"default": 1.0, "jacobi": 0.25}[svd],
                    compile_s=0.0, value=value, numpy_s=8.0 if baseline else float("nan"),
                    ref=0.5 + 1e-7 if baseline else float("nan"))

    monkeypatch.setattr(bs, "time_pair", fake)
    rows = bs.run(neurons=(8,), datapoints=(200,), methods=("mean_cca", "linear_cka"),
                  routes=("qr",), svd_algorithms=("default", "jacobi"), repeats=1)
    assert calls == [("mean_cca", "default", True), ("mean_cca", "jacobi", False),
                     ("linear_cka", "default", True), ("linear_cka", "jacobi", False)]
    jacobi = rows[1]
    assert jacobi["svd"] == "jacobi" and jacobi["speedup"] == pytest.approx(32.0)
    assert jacobi["diff_vs_default"] == pytest.approx(1e-6)
    assert jacobi["abs_diff"] == pytest.approx(9e-7)
    assert math.isnan(rows[0]["diff_vs_default"]) and rows[0]["speedup"] == 8.0


def test_any_bench_profiled_prints_its_op_table():
    """--profile_ops: the benchmark's own table, then its device time by op category."""
    p = subprocess.run([sys.executable, "-m", "medtransfer_jax.bench", "similarity",
                        "--neurons=8", "--datapoints=300", "--methods=mean_cca",
                        "--repeats=1", "--profile_ops"], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    first = p.stdout.index("## Similarity kernels")
    second = p.stdout.index("## Device time by op category over the whole similarity")
    assert first < second
    rows = [ln for ln in p.stdout[second:].splitlines() if ln.startswith("| category: ")]
    assert rows and "| device busy (sum of ops) |" in p.stdout[second:]


def test_cli_decode_times_each_store_mode_as_a_new_process_and_restores_the_state():
    """Three rows per size (off, empty, filled); the filled store reads every image (the
    store's counters, not the timings, say so); the caller's memo/store come back."""
    from medtransfer_jax.bench import decode
    from medtransfer_jax.data import decode_memo, decode_store, integrity
    before = (decode_memo.MEMO, decode_store.STORE)
    checked_before = set(integrity._CHECKED_GOOD)
    stores = []
    real_start = decode._start

    def spy(splits, size):
        out = real_start(splits, size)
        stores.append((decode_store.STORE.reads, decode_store.STORE.writes,
                       decode_store.STORE.folder is None))
        return out

    decode._start = spy
    try:
        rows = decode.run(num_images=20, source_size=48, image_sizes=(16, 24), repeats=1)
    finally:
        decode._start = real_start
    assert (decode_memo.MEMO, decode_store.STORE) == before
    assert integrity._CHECKED_GOOD == checked_before
    assert [(r["image_size"], r["store"]) for r in rows] == [
        (s, m) for s in (16, 24) for m in decode.MODES]
    assert stores == [(0, 0, True), (0, 20, False), (20, 0, False)] * 2
    for r in rows:
        assert set(r) == set(decode.COLUMNS) and r["images"] == 20
        assert r["total_s"] == pytest.approx(r["check_s"] + r["decode_s"], abs=2e-3)
    cmd = [sys.executable, "-m", "medtransfer_jax.bench", "decode", "--source_size=0"]
    out = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "--source_size" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_filters_times_the_study_basis_and_the_pair(monkeypatch, capsys):
    """bench filters: the basis over N weights dirs (2 passes, counted through the stream),
    and one pair in its own and the study's basis; refuses an image-size flag."""
    from medtransfer_jax.analysis import filters as F
    from medtransfer_jax.bench import filters as filters_bench
    loads = []
    real = F.scaled_filters
    monkeypatch.setattr(F, "scaled_filters", lambda p: loads.append(1) or real(p))
    rows = filters_bench.run(models=3, depth=18, width=8, repeats=2)
    err = [l.split(" in ")[0].split(": basis ")[0] for l in capsys.readouterr().err.splitlines()]
    assert err == ["filters: wrote 3 models", "filters: repeat 1/2", "filters: repeat 2/2"]
    assert [r["what"].split(":")[0].split(",")[0] for r in rows] == [
        "study basis", "one (pre", "one (pre"]
    assert len(loads) == 2 * 3 * 2      # two passes over three models, two rounds
    basis, own, study = rows
    # ResNet18 width 8: per stage of widths 8, 16, 32, 64, two blocks of two 3x3 convs
    # (in x out filters each; a stage's first conv reads the previous width)
    per_model = sum(w_in * w + 3 * w * w for w_in, w in ((8, 8), (8, 16), (16, 32), (32, 64)))
    assert per_model == 19072
    assert basis["models"] == 3 and basis["filters"] == 3 * per_model
    assert basis["s_per_model_pass"] == pytest.approx(basis["seconds"] / 6, abs=1e-3)
    assert study["vs_own_basis"] == pytest.approx(study["seconds"] / own["seconds"], rel=0.02)
    p = subprocess.run([sys.executable, "-m", "medtransfer_jax.bench", "filters", "--depth=18",
                        "--width=8", "--models=2", "--repeats=1", "--image_sizes=64"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "--image_sizes: bench filters does not read it" in p.stderr
