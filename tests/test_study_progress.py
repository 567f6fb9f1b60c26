"""studies/progress.py's study cost model: stage and overall ETA, persisted rates, '?'.

No training here: the work of each stage is given (or counted from the tiny study's
config by ``preflight.stage_work``) and the seconds of each item are passed in, so every
ETA is checked against arithmetic done by hand.
"""
import json
import math
import os

import pytest

from medtransfer_jax.studies import analyses, preflight, progress, runner
from test_study import _tiny_study_config


def _prior(stage, ft_rate):
    """The prior seconds per unit as PRIORS documents it, computed here independently."""
    kind, value = progress.PRIORS[stage]
    return value * ft_rate if kind == "vs_finetune" else value


def _work():
    # finetune: 3 runs of 100, 100 and 400 units; representations: 50 untimed units
    return {"finetune": progress.StageWork(3, "runs", items={"a": 100.0, "b": 100.0,
                                                             "c": 400.0}),
            "representations": progress.StageWork(5, "pairs", 50.0),
            "report": progress.StageWork(1, "report", 1.0)}


def _tracker(rates):
    lines = []
    return progress.StudyProgress(_work(), rates, echo=lambda l, flush: lines.append(l)), lines


def test_before_any_measurement_every_eta_is_a_question_mark():
    t, lines = _tracker(progress.Rates())
    line = t.start("finetune", 2, 7)
    assert line == "[study] stage 2/7 finetune: running (3 runs), stage ETA ?, overall ETA ?"
    assert lines == [line]
    assert math.isnan(t.stage_eta()) and math.isnan(t.overall_eta())
    # an unknown amount of work (a run config that does not load) stays unknown
    w = progress.StageWork(2, "runs", items={"x": math.nan, "y": 10.0})
    r = progress.Rates(measured={"finetune": {"seconds": 10.0, "units": 5.0, "items": 1}})
    assert progress.format_duration(progress.stage_eta(w, r, "finetune")) == "?"


def test_stage_eta_from_the_measured_rate_and_overall_is_the_sum(tmp_path):
    rates = progress.Rates(str(tmp_path / "rates.json"))
    t, lines = _tracker(rates)
    t.start("finetune", 2, 7)
    # run a: 50 s for 100 units -> 0.5 s/unit; left 500 units -> 250 s
    overall = 250 + 50 * _prior("representations", 0.5) + _prior("report", 0.5)
    assert t.item_done("a", 50.0) == ("[study] stage 2/7 finetune (3 runs): stage ETA 4m10s, "
                                      f"overall ETA {progress.format_duration(overall)}")
    assert t.stage_eta() == pytest.approx(250.0)
    assert t.record("not-a-run", 5.0) is False          # items the stage does not count
    # with a fine-tuning rate every stage has a rate: measured or its prior
    assert progress.PRIORS["representations"][0] == "vs_finetune"
    expect = {"finetune": 250.0, "representations": 50 * _prior("representations", 0.5),
              "report": 1 * _prior("report", 0.5)}
    assert {s: t.stage_eta(s) for s in expect} == pytest.approx(expect)
    assert t.overall_eta() == pytest.approx(sum(expect.values()))
    assert rates.source("representations") == "prior" and rates.source("finetune") == "measured"
    # run c (400 units, 100 s): 150 s / 500 units = 0.3 s/unit over both; 100 units left
    t.item_done("c", 100.0)
    assert t.stage_eta() == pytest.approx(30.0)
    t.item_done("b", 40.0)
    assert t.stage_eta() == 0.0 and lines[-1].startswith(
        "[study] stage 2/7 finetune (3 runs): stage ETA 0 s, overall ETA ")
    t.finish("finetune", 200.0)   # all timed item by item: the overhead is not a rate
    assert rates.measured["finetune"] == {"seconds": 190.0, "units": 600.0, "items": 3}
    # an analysis stage is timed as a whole: 20 s for its 50 units
    t.start("representations", 3, 7)
    t.finish("representations", 20.0)
    assert rates.rate("representations") == pytest.approx(0.4)
    assert t.stage_eta("representations") == 0.0
    assert t.overall_eta() == pytest.approx(_prior("report", 190.0 / 600))


def test_parallel_runs_divide_the_eta():
    w = progress.StageWork(4, "runs", items={n: 10.0 for n in "abcd"}, parallel=2)
    r = progress.Rates(measured={"finetune": {"seconds": 30.0, "units": 10.0, "items": 1}})
    assert progress.stage_eta(w, r, "finetune") == pytest.approx(40 * 3.0 / 2)


def test_a_resumed_study_keeps_its_rates(tmp_path):
    path = str(tmp_path / "stages" / "rates.json")
    t, _ = _tracker(progress.Rates.load(path))          # no file yet: nothing measured
    t.start("finetune", 2, 7)
    t.item_done("a", 50.0)                               # written at once (atomically)
    saved = json.load(open(path))
    assert saved["stages"]["finetune"] == {"seconds": 50.0, "units": 100.0, "items": 1}
    # the next session (runs a done: its work no longer counts) knows the rate at once
    again = progress.Rates.load(path)
    work = _work()
    del work["finetune"].items["a"]
    t2 = progress.StudyProgress(work, again, echo=None)
    assert t2.start("finetune", 2, 7).endswith("stage ETA 4m10s, overall ETA " +
                                                progress.format_duration(t2.overall_eta()))
    assert math.isfinite(t2.overall_eta())
    # an unreadable file is no rate, not a crash
    with open(path, "w") as f:
        f.write("{half")
    assert progress.Rates.load(path).measured == {}


def test_stage_work_of_the_tiny_study_counts_by_hand(tmp_path):
    study = runner.Study(_tiny_study_config(), str(tmp_path))
    w = preflight.stage_work(study)
    assert list(w) == list(progress.STAGES)
    # natural (pre-trained, timed as a run) + random + random's twin
    assert (w["sources"].count, w["sources"].untimed, w["sources"].items) == (
        3, 2.0, {"sources/natural": 1.0})
    # 4 runs of 10 steps x 32 images at 32 px, in 224-px image equivalents
    assert w["finetune"].units == pytest.approx(4 * 10 * 32 * (32 / 224) ** 2)
    assert sorted(w["finetune"].items) == sorted(r.name for r in study.finetune_runs())
    # CCA pairs of lesion/fold0: natural and random pre vs fine-tuned (2), natural vs
    # random before and after (2), random vs its twin (1); x 2 repeats x the images (24,
    # but at most the held-out fifth of 96) at 32 px; plus 2 layer maps (pre vs
    # fine-tuned of natural and random), one pass over min(24, 96/5) images each
    assert w["representations"].label == "7 pairs"
    assert w["representations"].units == pytest.approx(
        (5 * 2 * 96 / 5 + 2 * 96 / 5) * (32 / 224) ** 2)
    assert w["predictions"].units == 2     # natural vs random + the gain vs random
    # the analysis stages' items, named as their loops name them (StageItems)
    pairs = analyses.cca_pairs(study, "lesion", 0)
    assert sorted(w["representations"].items) == sorted(
        [f"lesion/fold0 {p[0]}" for p in pairs] +
        [f"lesion/fold0 {p[0]} [map]" for p in pairs if p[1] == "pre_vs_finetuned"])
    assert w["predictions"].items == {"lesion": 2.0}
    assert w["robustness"].items == {"lesion": 2.0} and w["filters"].untimed == 0
    assert sorted(w["filters"].items) == ["PCA basis of 4 models", "lesion/fold0 natural",
                                          "lesion/fold0 random"]
    n_params = preflight.param_count(18, 8, "keras_v1") / 1e6
    # 2 sources x (pre, ft), and the basis: 2 passes over the 4 models at 1/5 of the cost
    assert w["filters"].units == pytest.approx(4 * n_params + 2 * 4 * n_params / 5)
    assert w["robustness"].units == 2 and w["report"].units == 1


def test_dry_run_estimate_only_once_a_rate_exists(tmp_path):
    wd = tmp_path / "wd"
    assert "estimate" not in runner.preflight(_tiny_study_config(), str(wd)).text()
    assert not wd.exists()                                # the pre-flight writes nothing
    os.makedirs(wd / "stages")
    with open(wd / "stages" / "rates.json", "w") as f:
        json.dump({"stages": {"finetune": {"seconds": 49.0, "units": 7.0, "items": 1}}}, f)
    pf = runner.preflight(_tiny_study_config(), str(wd))
    ft = 4 * 10 * 32 * (32 / 224) ** 2 * 7.0
    assert pf.estimate["finetune"] == pytest.approx(ft)
    assert pf.basis["finetune"] == "measured" and pf.basis["filters"] == "prior"
    assert pf.estimate["report"] == pytest.approx(_prior("report", 7.0))
    assert pf.estimate["representations"] == pytest.approx(   # 5 CCA pairs + 2 maps
        (5 * 2 + 2) * 96 / 5 * (32 / 224) ** 2 * _prior("representations", 7.0))
    line = [l for l in pf.text().splitlines() if l.startswith("[study] estimate:")]
    assert line == [pf.estimate_line()]
    assert line[0].startswith(f"[study] estimate: "
                              f"{progress.format_duration(sum(pf.estimate.values()))} left = "
                              f"sources ")
    assert f" + finetune {progress.format_duration(ft)} + " in line[0]
    assert f" + filters {progress.format_duration(pf.estimate['filters'])}* + " in line[0]


def test_stage_items_lines_rates_and_skips_on_a_fake_clock(tmp_path):
    """An analysis stage's item loop: item a is done earlier (skipped: counted in n/N,
    not in the rate or the work left), b, c and d are timed on a fake clock."""
    rates = progress.Rates(str(tmp_path / "rates.json"),
                           {"finetune": {"seconds": 10.0, "units": 10.0, "items": 1}})
    work = {"representations": progress.StageWork(
                4, "pairs", items={"a": 10.0, "b": 10.0, "c": 20.0, "d": 10.0}),
            "report": progress.StageWork(1, "report", 1.0)}
    t = progress.StudyProgress(work, rates, echo=None)
    t.start("representations", 3, 7)
    now, lines = [100.0], []
    items = progress.StageItems("representations", t, ["a", "b", "c", "d"], skip=["a"],
                                clock=lambda: now[0], echo=lambda l, flush: lines.append(l))
    # the skipped item left the work: 40 units at the prior (1.7 x 1 s/unit fine-tuning)
    assert t.stage_eta() == pytest.approx(40 * _prior("representations", 1.0))
    report = _prior("report", 1.0)

    def run(name, seconds, detail=""):
        with items.item(name) as it:
            now[0] += seconds
            it.detail = detail

    run("b", 5.0, "mean paper_cca 0.500")    # 5 s / 10 units; 30 units left -> 15 s
    assert lines == ["representations 2/4 b: mean paper_cca 0.500, 5 s, stage ETA 15 s, "
                     f"overall ETA {progress.format_duration(15 + report)}"]
    assert rates.measured["representations"] == {"seconds": 5.0, "units": 10.0, "items": 1}
    with pytest.raises(RuntimeError):        # a failed item: no line, no rate
        with items.item("c"):
            now[0] += 99.0
            raise RuntimeError("boom")
    assert len(lines) == 1 and rates.measured["representations"]["items"] == 1
    run("c", 30.0)                           # 35 s / 30 units; 10 units left -> 11.7 s
    assert lines[-1] == ("representations 3/4 c: 30 s, stage ETA 12 s, overall ETA "
                         f"{progress.format_duration(35 / 30 * 10 + report)}")
    run("d", 1.0)
    assert lines[-1].startswith("representations 4/4 d: 1 s, stage ETA 0 s, overall ETA ")
    saved = json.load(open(tmp_path / "rates.json"))["stages"]["representations"]
    assert saved == {"seconds": 36.0, "units": 40.0, "items": 3}   # a is not in it
    t.finish("representations", 50.0)        # all timed: the overhead is not a rate
    assert rates.measured["representations"]["seconds"] == 36.0
    # outside a study: the mean of the items timed here; a one-item loop prints nothing
    lines.clear()
    alone = progress.StageItems("layer maps", None, ["x", "y", "z"], clock=lambda: now[0],
                                echo=lambda l, flush: lines.append(l))
    with alone.item("x"):
        now[0] += 4.0
    assert lines == ["layer maps 1/3 x: 4 s, ETA 8 s"]
    one = progress.StageItems("robustness", None, ["only"], clock=lambda: now[0],
                              echo=lambda l, flush: lines.append(l))
    with one.item("only"):
        now[0] += 1.0
    assert len(lines) == 1


def test_run_cost_counts_the_epochs_steps_as_the_run_does():
    """``train.epoch_steps=ceil`` (the papers' Keras epochs) runs ceil(N/B) full batches: the
    Sep-2023 thyroid (384 training images, batch 256) trains 2 batches an epoch, not 1."""
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(
        train=dict(num_steps=0, batch_size=256, num_epochs=30, epoch_steps="ceil",
                   freeze="none"),
        data=dict(name="thyroid", image_size=224, max_examples=None)))
    assert preflight.epoch_images(cfg, 384) == 512
    assert preflight.training_images(cfg, 384) == 30 * 512
    assert preflight.run_units(cfg, 384) == pytest.approx(30 * 512)
    cfg.train.epoch_steps = "floor"
    assert preflight.epoch_images(cfg, 384) == 256
    assert preflight.run_units(cfg, 384) == pytest.approx(30 * 256)
    # a split smaller than a batch still takes one step, as the run does
    assert preflight.epoch_images(cfg, 100) == 256
    # no split size known anywhere: unknown, not zero
    cfg.data.name = "nih_cxr14_tag"
    assert math.isnan(preflight.epoch_images(cfg)) and preflight.training_images(cfg) is None
