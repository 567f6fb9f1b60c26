"""bench grid, scaled down: the real protocol files through the real loop, projected.

Runs in a fresh process: JAX initialises its persistent compilation cache once per
process, so a test that checks cache hits must own the process.
"""
import json
import math
import os
import subprocess
import sys

import _train_utils
import pytest

from medtransfer_jax.bench import grid
from medtransfer_jax.errors import UserError

_SCRIPT = """
import json, sys, jax
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
from medtransfer_jax.bench import grid
rows = grid.run(targets=("breast", "knee"), scale=0.1, width=8, depth=18, max_image_size=32,
                max_batch=16, dtype="float32", cache="device", workdir=sys.argv[2],
                cfg_dir=sys.argv[3])
print("ROWS=" + json.dumps(rows))
"""


def test_grid_projects_the_full_study_from_measured_epochs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "xla"), str(tmp_path / "w"),
         f"{_train_utils.REPO}/configs"],
        # One device: this checks the projection and the cache, not sharding (8 fake
        # devices' all-reduce rendezvous can time out on an oversubscribed 2-core CI box).
        env=_train_utils.subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=1"),
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("ROWS=")][-1]
    breast, knee, total = json.loads(line[len("ROWS="):])
    assert breast["size"] == 32 and breast["batch"] == 16 and breast["epochs"] == 30
    assert knee["images"] == round(5222 * 0.1)  # the paper's N, scaled
    for r in (breast, knee):
        assert r["epoch_s"] > 0 and r["run_s"] >= r["epochs"] * r["epoch_s"]
        assert r["frz_run_s"] > r["run_s"]
        assert r["target_grid_s"] == pytest.approx(5 * (3 * r["run_s"] + 2 * r["frz_run_s"]))
        # the head phase's epochs are timed (linear-probe runs), not taken at full cost
        assert 0 < r["head_epoch_s"] and r["frz_run_s"] == pytest.approx(
            r["run_s"] + 30 * r["head_epoch_s"])
        # The second run of the same shapes reads its programs from the persistent cache.
        assert r["warm_cache_hits"] > 0
        # ... and decodes no image: the first run's pixels are in the decode memo.
        assert r["warm_decode_misses"] == 0
        # The runs' timing splits: a warm setup includes its split decode.
        assert 0 <= r["data_s"] <= r["setup_s"] and r["finalize_s"] > 0
        assert r["train_epoch_s"] > 0
    assert total["target_grid_s"] == pytest.approx(breast["target_grid_s"] + knee["target_grid_s"])
    assert total["target"].startswith("TOTAL (50 runs)")
    assert "projected to 50 runs (2 of 7 targets)" in grid.title(("breast", "knee"))
    assert any((tmp_path / "xla").iterdir())


def test_projection_uses_the_measured_targets_of_the_nearest_image_size():
    """Small images use a GPU less well (H200: isic at 112 px ran 1.44x the epoch time
    projected from mammograms at 224 px), so a target is projected from the measured
    rows nearest its own size; rows tied in distance are pooled."""
    cfg_dir = f"{_train_utils.REPO}/configs"
    cfgs = {t: grid.target_config(cfg_dir, t, protocol="sep2023", scale=1.0, width=64,
                                  depth=50, max_image_size=4096, max_batch=4096,
                                  dtype="bfloat16", cache="device")
            for t in ("mammograms", "isic", "chest", "pcam", "thyroid")}
    sizes = {t: int(c.data.image_size) for t, c in cfgs.items()}
    assert sizes["isic"] == sizes["chest"] == 112 and sizes["mammograms"] == 224
    assert sizes["pcam"] < 112 < sizes["mammograms"] < sizes["thyroid"]

    def measured(t, per_work, fixed):
        work = grid._epoch_work(cfgs[t])
        return dict(target=t, size=sizes[t], epoch_s=per_work * work, fixed_s=fixed,
                    work=work)
    rows = [measured("mammograms", 1e-9, 3.0), measured("isic", 2e-9, 5.0)]
    for t, per_work, fixed in (("chest", 2e-9, 5.0), ("pcam", 2e-9, 5.0),
                               ("thyroid", 1e-9, 3.0)):
        p = grid.project_target(t, cfgs[t], rows)
        assert p["epoch_s"] == pytest.approx(per_work * grid._epoch_work(cfgs[t])), t
        assert p["run_s"] == pytest.approx(fixed + p["epochs"] * p["epoch_s"]), t
    # two measured rows equally near: pooled (epoch time per image-pixel, mean fixed cost)
    twin = dict(rows[1], target="knee", epoch_s=rows[1]["epoch_s"] * 3, fixed_s=7.0)
    p = grid.project_target("chest", cfgs["chest"], [rows[0], rows[1], twin])
    assert p["epoch_s"] == pytest.approx(4e-9 * grid._epoch_work(cfgs["chest"]))
    assert p["run_s"] == pytest.approx(6.0 + p["epochs"] * p["epoch_s"])


def test_head_phase_epochs_are_timed_and_projected_by_their_ratio(monkeypatch, tmp_path):
    """A freeze run is its run plus the head phase at the measured head-epoch cost; a
    projected target takes the measured rows' head/epoch ratio; with no head timing the
    full epoch cost stands in (an upper bound)."""
    c = _thyroid()
    seen = []

    def fake_timed(config, epochs, root):
        seen.append((config.train.freeze, epochs))
        probe = config.train.freeze == "linear_probe"
        loop_s = (0.5 if probe else 1.0) * epochs + 2.0      # a head epoch: half the cost
        t = dict(train_s=loop_s, eval_s=0.0, checkpoint_s=0.0, data_s=0.1, integrity_s=0.0,
                 model_init_s=0.0, restore_s=0.0, finalize_s=0.1)
        return 3.0 + loop_s, {"timing": t, "steps_per_epoch": 2}
    monkeypatch.setattr(grid, "_timed_run", fake_timed)
    row = grid.bench_target("thyroid", c, str(tmp_path), min_extra_images=64)
    extra = row["extra_epochs"]
    full = c.train.freeze
    assert seen == [(full, 1), (full, 1), (full, 1 + extra), ("linear_probe", 1),
                    ("linear_probe", 1), ("linear_probe", 1 + extra)]
    assert c.train.freeze == full                 # the target's own config is untouched
    assert row["epoch_s"] == pytest.approx(1.0) and row["head_epoch_s"] == pytest.approx(0.5)
    head = c.train.head_phase.num_epochs
    assert row["frz_run_s"] == pytest.approx(row["run_s"] + head * 0.5)
    # projected from it: the same ratio
    p = grid.project_target("thyroid", c, [row])
    assert p["frz_run_s"] == pytest.approx(p["run_s"] + head * p["epoch_s"] * 0.5)
    # no head timing (NaN): the full epoch cost
    nan_row = dict(row, head_epoch_s=float("nan"))
    p = grid.project_target("thyroid", c, [nan_row])
    assert p["frz_run_s"] == pytest.approx(p["run_s"] + head * p["epoch_s"])


def test_unknown_target_is_a_user_error():
    with pytest.raises(UserError, match="unknown target"):
        grid.run(targets=("lung",))


def test_time_budget_measures_the_largest_target_and_projects_the_rest(tmp_path, capsys,
                                                                       monkeypatch):
    """A budget too small for a second target: the largest (breast: 780 images vs
    thyroid's 480, same capped size) is measured, thyroid is projected from it."""
    # 6400 x 0.05 = 320 images: breast's 2-step epoch (its ~25 training images at batch
    # 16: the protocol's Keras epoch, ceil(N/B) steps = 32 images) is timed over 10 extra
    # epochs (two were too few to rise above a loaded machine's noise once epochs stopped
    # writing a checkpoint each)
    monkeypatch.setattr(grid, "MIN_EXTRA_IMAGES", 6400)
    rows = grid.run(targets=("thyroid", "breast"), scale=0.05, width=8, depth=18,
                    max_image_size=32, max_batch=16, dtype="float32", cache="host",
                    workdir=str(tmp_path / "w"), cfg_dir=f"{_train_utils.REPO}/configs",
                    xla_cache_dir=None, time_budget_s=1e-3)
    thyroid, breast, total = rows                  # the table keeps the asked order
    assert breast["extra_epochs"] == 10            # a tiny epoch is timed over several
    assert breast["how"] == "measured" and thyroid["how"] == "projected"
    assert "cold_s" not in thyroid                 # nothing of thyroid was timed
    per_image_pixel = breast["epoch_s"] / (breast["images"] * 32 ** 2)
    assert thyroid["epoch_s"] == pytest.approx(per_image_pixel * thyroid["images"] * 32 ** 2)
    assert thyroid["run_s"] == pytest.approx(breast["fixed_s"]
                                             + thyroid["epochs"] * thyroid["epoch_s"])
    assert total["target_grid_s"] == pytest.approx(thyroid["target_grid_s"]
                                                   + breast["target_grid_s"])
    assert "1 of 2 targets measured" in total["target"]
    assert "projected from the 1 measured: thyroid" in capsys.readouterr().err
    assert breast["mfu"] == "n/a"  # width 8: no FLOP count (the report's footnote says why)
    assert "ResNet50 at width 64" in grid.mfu_note(8, 18, "float32")


def test_report_title_counts_the_runs_of_the_targets_and_notes_mfu_on_cpu():
    """The title's run count is the TOTAL row's (5 variants x 5 folds per target), and on
    a CPU (no peak FLOP/s) the mfu column is explained, not a bare NaN."""
    assert grid.grid_runs(len(grid.PAPER_TARGETS)) == 175
    assert "projected to 175 runs (7 of 7" in grid.title(tuple(grid.PAPER_TARGETS))
    assert "projected to 25 runs (1 of 7" in grid.title(("thyroid",))
    assert "n/a on CPU" in grid.mfu_note(64, 50, "float32")


@pytest.mark.parametrize("protocol", ["sep2023", "feb2023"])
def test_every_target_config_loads_for_the_grid(protocol):
    """Each of the seven targets' protocol files gives a valid synthetic grid config (pcam
    refuses folds=kfold as an argument: the grid must not pass it)."""
    from medtransfer_jax.configs import validation
    for target in grid.PAPER_TARGETS:
        c = grid.target_config(f"{_train_utils.REPO}/configs", target, protocol=protocol,
                               scale=0.01, width=8, depth=18, max_image_size=32,
                               max_batch=16, dtype="bfloat16", cache="device")
        validation.validate(c)
        assert c.data.name == "synthetic" and c.data.folds == "kfold", target
        assert c.data.synthetic.num_examples >= 8 * grid.PAPER_TARGETS[target][1]


def _thyroid(scale=0.05):
    return grid.target_config(f"{_train_utils.REPO}/configs", "thyroid", protocol="sep2023",
                              scale=scale, width=8, depth=18, max_image_size=32, max_batch=16,
                              dtype="float32", cache="host")


def test_runs_at_once_columns_and_projection(monkeypatch, tmp_path, capsys):
    """K runs at once: K epochs side by side cost the difference of the runs' mean loops
    over the extra epochs; the K runs' fixed cost is the 1-epoch wall less that; a run's
    share is 1/K of both; a target left out is projected the same way."""
    walls = {1: (20.0, 3.0), 5: (26.0, 9.0)}            # epochs -> (wall, mean loop) of K=3
    monkeypatch.setattr(grid, "_runs_at_once", lambda config, k, epochs, root: walls[epochs])
    c = _thyroid()
    row = grid._at_once(c, 3, 4, str(tmp_path))
    epochs_k = (9.0 - 3.0) / 4                            # 1.5 s for 3 epochs at once
    assert row["at_once_epoch_s"] == pytest.approx(epochs_k / 3)
    assert row["at_once_fixed_s"] == pytest.approx((20.0 - epochs_k) / 3)
    run_s = (20.0 - epochs_k) / 3 + c.train.num_epochs * epochs_k / 3
    assert row["at_once_run_s"] == pytest.approx(run_s)
    frz = run_s + c.train.head_phase.num_epochs * epochs_k / 3
    assert row["at_once_grid_s"] == pytest.approx(5 * (3 * run_s + 2 * frz))
    walls[5] = (19.0, 2.5)                                # noise above the extra epochs
    assert math.isnan(grid._at_once(c, 3, 4, str(tmp_path))["at_once_run_s"])

    def fail(config, k, epochs, root):
        raise RuntimeError("bench grid: 3 of the 3 runs at once ended {...}")
    monkeypatch.setattr(grid, "_runs_at_once", fail)      # e.g. out of GPU memory
    assert math.isnan(grid._at_once(c, 3, 4, str(tmp_path))["at_once_grid_s"])
    assert "at_once columns are NaN" in capsys.readouterr().err
    monkeypatch.setattr(grid, "_runs_at_once", lambda config, k, epochs, root: walls[epochs])
    walls[5] = (26.0, 9.0)
    # projected: the measured target's epoch per image-pixel and its fixed cost
    measured = dict(row, epoch_s=0.1, fixed_s=1.0, work=grid._epoch_work(c),
                    size=int(c.data.image_size))
    big = _thyroid(scale=0.1)
    p = grid.project_target("thyroid", big, [measured])
    a_epoch = row["at_once_epoch_s"] * grid._epoch_work(big) / grid._epoch_work(c)
    assert p["at_once_run_s"] == pytest.approx(row["at_once_fixed_s"]
                                               + big.train.num_epochs * a_epoch)


def test_runs_at_once_are_train_subprocesses_and_a_failure_names_their_logs(tmp_path):
    """The real thing, tiny: 2 train subprocesses at once; runs that fail raise an error
    naming their logs, which are kept."""
    c = _thyroid()
    wall, loop_s = grid._runs_at_once(c, 2, 1, str(tmp_path))
    assert wall > loop_s > 0
    assert list(tmp_path.iterdir()) == []                 # finished runs leave nothing
    c.train.max_loss_factor = 1e-9                        # "diverged" at the first log
    c.log.every_steps = 1
    with pytest.raises(RuntimeError, match=r"2 of the 2 runs at once ended .*diverged.*"
                                           r"train\.log"):
        grid._runs_at_once(c, 2, 1, str(tmp_path))
    assert len(list(tmp_path.glob("*/r*/train.log"))) == 2


def test_the_bench_and_its_runs_at_once_split_the_gpu(monkeypatch):
    """The bench process keeps its own GPU memory while its K runs go: K + 1 shares of
    0.9 (the runs inherit the variable); a fraction the user set is left alone."""
    from medtransfer_jax.training import sweep
    for name in sweep.MEM_FRACTION_ENVS:  # restored after the test, whatever it sets
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    grid.share_gpu_with_runs(4)
    assert [os.environ[n] for n in sweep.MEM_FRACTION_ENVS] == ["0.180", "0.180"]
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.1")
    monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION")
    grid.share_gpu_with_runs(4)
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.1"
    assert "XLA_CLIENT_MEM_FRACTION" not in os.environ


def test_an_empty_xla_cache_dir_keeps_the_grid_off_the_persistent_cache(tmp_path):
    """`bench grid --xla_cache_dir=` turns the cache off like every main (the grid turned
    the default ~/.cache/medtransfer_jax/xla back on)."""
    env = _train_utils.subprocess_env(HOME=str(tmp_path / "home"),
                                      XLA_FLAGS="--xla_force_host_platform_device_count=1")
    for var in ("MEDTRANSFER_XLA_CACHE", "JAX_COMPILATION_CACHE_DIR"):
        env.pop(var, None)
    out = subprocess.run(
        [sys.executable, "-m", "medtransfer_jax.bench", "grid", "--targets=thyroid",
         "--scale=0.1", "--width=8", "--depth=18", "--max_image_size=32", "--max_batch=16",
         "--dtypes=float32", f"--configs_dir={_train_utils.REPO}/configs", "--xla_cache_dir="],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "thyroid" in out.stdout
    assert not (tmp_path / "home" / ".cache" / "medtransfer_jax" / "xla").exists()
