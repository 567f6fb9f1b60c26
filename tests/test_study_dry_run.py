"""study --dry_run: the pre-flight only; prints the grid, lists what is missing, creates nothing."""
import os
import subprocess
import sys

import _train_utils


def _study(*args, cwd="/"):
    return subprocess.run([sys.executable, "-m", "medtransfer_jax.study", *args],
                          env=_train_utils.subprocess_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _dry_run(workdir, config: str, arg: str):
    """``study --dry_run`` of ``configs/<config>.py:<arg>`` into ``workdir``."""
    cfg = os.path.join(_train_utils.REPO, "configs", f"{config}.py")
    return _study(f"--workdir={workdir}", "--dry_run", f"--config={cfg}:{arg}")


def test_dry_run_of_the_demo_prints_the_grid_and_creates_nothing(tmp_path):
    wd = tmp_path / "study"
    out = _study(f"--workdir={wd}", "--dry_run")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[study] pre-flight: 18 fine-tuning runs" in out.stdout
    assert "[study] pre-flight: ok" in out.stdout
    assert not wd.exists()


def test_dry_run_lists_everything_missing_in_one_line(tmp_path):
    wd = tmp_path / "rt"
    out = _dry_run(wd, "study_revisiting", f"targets=breast,folds=0,data={tmp_path}/d,"
                   f"imagenet={tmp_path}/in.h5,radimagenet={tmp_path}/rad.h5")
    assert out.returncode == 2, out.stderr[-2000:]
    err = [line for line in out.stderr.splitlines() if line.startswith("study: error:")]
    # The error line names the first problem and points at the list (it repeated all of
    # them: a line of thousands of characters); the MISSING lines name each.
    assert len(err) == 1 and "in.h5" in err[0] and "more (the MISSING lines above)" in err[0]
    assert len(err[0]) < 400
    assert "Traceback" not in out.stderr
    missing = [m for m in out.stdout.splitlines() if m.startswith("[study] MISSING:")]
    assert len(missing) >= 3   # two .h5 files, the data root, ...
    assert any("in.h5" in m for m in missing) and any("rad.h5" in m for m in missing)
    assert not wd.exists()


def test_dry_run_of_the_audit_case_names_each_problem_and_its_argument(tmp_path):
    """Empty data and fold-CSV folders, a text file as .h5 and folds=7 passed the old
    pre-flight ('ok', exit 0); each is now a MISSING line and the study exits 2."""
    os.makedirs(tmp_path / "D" / "breast")
    os.makedirs(tmp_path / "F" / "breast")
    (tmp_path / "B.h5").write_text("not hdf5\n")
    (tmp_path / "A.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    wd = tmp_path / "rt"
    out = _dry_run(wd, "study_revisiting", f"targets=breast,folds=0,7,data={tmp_path}/D,"
                   f"imagenet={tmp_path}/A.h5,radimagenet={tmp_path}/B.h5,"
                   f"fold_csvs={tmp_path}/F")
    assert out.returncode == 2, out.stderr[-2000:]
    missing = [m for m in out.stdout.splitlines() if m.startswith("[study] MISSING:")]
    assert len(missing) == 4 and "pre-flight: ok" not in out.stdout, out.stdout
    assert f"{tmp_path}/B.h5 is not a Keras .h5 weights file (no HDF5 signature" in missing[0]
    assert f"{tmp_path}/D/breast does not have the expected layout" in missing[1]
    assert f"fold CSV {tmp_path}/F/breast/train_fold1.csv not found" in missing[2]
    assert "folds [7]: outside the protocol's 5 folds" in missing[3]
    err = [line for line in out.stderr.splitlines() if line.startswith("study: error:")]
    assert len(err) == 1 and err[0].startswith("study: error: 4 thing(s) missing")
    assert not wd.exists()


def test_dry_run_of_source_matters_names_its_own_arguments(tmp_path):
    out = _dry_run(tmp_path / "sm", "study_source_matters",
                   "confounders=tag,ps=0,folds=0,nih=/nonexistent")
    assert out.returncode == 2, out.stderr[-2000:]
    assert ("[study] MISSING: targets.tag: data root '/nonexistent' is not a directory "
            "(give configs/study_source_matters.py:nih=DIR)") in out.stdout
    assert "study_revisiting" not in out.stdout + out.stderr
    assert "training images to process: unknown until the data is there" in out.stdout
    assert "?" not in out.stdout


def test_every_analysis_option_can_be_set_from_the_command_line_and_is_checked(tmp_path):
    """The demo study spells no analysis option out, yet each can be set by flag (every
    study config starts from study_options.analysis_defaults()); a misspelled choice is a
    pre-flight line naming the field, before any run trains (auc_metric's used to be a
    KeyError after the whole fine-tuning stage)."""
    wd = tmp_path / "study"
    ok = _study(f"--workdir={wd}", "--dry_run", "--config.analysis.fold_plot=box",
                "--config.analysis.robustness_errorbar=ci95", "--config.analysis.bootstrap=50",
                "--config.analysis.auc_metric=auc_keras", "--config.analysis.filters.basis=pair")
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = _study(f"--workdir={wd}", "--dry_run", "--config.analysis.auc_metric=auc_kears",
                 "--config.analysis.fold_plot=violin")
    assert bad.returncode == 2, bad.stderr[-2000:]
    missing = [m for m in bad.stdout.splitlines() if m.startswith("[study] MISSING:")]
    assert any("analysis.auc_metric='auc_kears'" in m and "auc_keras" in m for m in missing)
    assert any("analysis.fold_plot='violin'" in m for m in missing), missing
    assert "Traceback" not in bad.stderr and not wd.exists()


def test_the_cca_and_layer_map_sections_are_checked_before_anything_trains(tmp_path):
    """Read only after the fine-tuning stage, a typo in analysis.cca / analysis.layer_maps
    used to stop a study hours in; pre-flight names each, and list fields take a tuple
    from the command line (config_flags refuses lists)."""
    wd = tmp_path / "study"
    ok = _study(f"--workdir={wd}", "--dry_run", "--config.analysis.cca.methods=('linear_cka',)",
                "--config.analysis.robustness_test_sets=('ood',)",
                "--config.analysis.layer_maps.folds=(1,)", "--config.folds=(1,)")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "x folds [1] x settings 3" in ok.stdout
    bad = _study(f"--workdir={wd}", "--dry_run", "--config.analysis.cca.methods=('cka',)",
                 "--config.analysis.cca.spatial=grid", "--config.analysis.cca.repeats=0",
                 "--config.analysis.layer_maps.comparisons=('pre_vs_fine',)",
                 "--config.analysis.layer_maps.spatial=positions",
                 "--config.analysis.layer_maps.folds=(7,)")
    assert bad.returncode == 2, bad.stderr[-2000:]
    missing = [m for m in bad.stdout.splitlines() if m.startswith("[study] MISSING:")]
    for expect in ("analysis.cca.methods=['cka']: ['cka'] unknown; use some of ['mean_cca'",
                   "analysis.cca.spatial='grid'; use one of ['positions', 'pool']",
                   "analysis.cca.repeats=0; use an integer >= 1",
                   "analysis.layer_maps.comparisons: ['pre_vs_fine'] unknown",
                   "analysis.layer_maps.spatial='positions'; use one of ['pool', 'grid']",
                   "analysis.layer_maps.folds: [7] not among the study's folds [0, 1]"):
        assert any(expect in m for m in missing), (expect, missing)
    assert "Traceback" not in bad.stderr and not wd.exists()
