"""`python -m medtransfer_jax.analyze` subcommands end to end (tiny ResNet50, width 8)."""
import csv
import json
import os
import re

import _analyze_utils
import numpy as np
import pytest
from absl import flags

from medtransfer_jax import analyze, ticker
from medtransfer_jax.analysis import stimuli
from medtransfer_jax.errors import UserError
from medtransfer_jax.models import resnet

FLAGS = flags.FLAGS
SIZE = 64


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return _analyze_utils.random_weights_dirs(tmp_path_factory.mktemp("cli_weights"), depth=50,
                                              width=8, image_size=SIZE, seeds=(10, 11))


_parsed_flags = _analyze_utils.parsed_flags


def _run(command, **overrides):
    """analyze.main with the analyze flags at their defaults plus ``overrides``."""
    for flag in FLAGS.flags_by_module_dict()[analyze.__name__]:
        flag.unparse()
    for k, v in overrides.items():
        setattr(FLAGS, k, v)
    return analyze.run(["analyze"] + ([command] if command else []))


def _task(make, **overrides):
    """The task analyze builds from its flags (defaults plus ``overrides``)."""
    for flag in FLAGS.flags_by_module_dict()[analyze.__name__]:
        flag.unparse()
    for k, v in overrides.items():
        setattr(FLAGS, k, v)
    return make()


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _lines(out, prefix, unit="images"):
    """(done, total, detail) of the throttled lines ``prefix: n/N unit[, detail], t, ETA``."""
    pat = re.compile(re.escape(prefix) + rf": (\d+)/(\d+) {unit}(?:, (.*))?, \S+(?: s)?, "
                     r"ETA \S+(?: s)?")
    found = [pat.fullmatch(l) for l in out.splitlines() if l.startswith(prefix + ": ")]
    assert found and all(found), out
    return [(int(m.group(1)), int(m.group(2)), m.group(3)) for m in found]


def test_cca_paper_protocol_with_two_pairs(weights, tmp_path, capsys, monkeypatch):
    """... with a progress line per pair and, inside each, throttled lines of the forward
    passes (every batch here: interval 0)."""
    monkeypatch.setattr(ticker, "INTERVAL_S", 0.0)
    a, b = weights
    files = _run("cca", output_dir=str(tmp_path), images="random", num_images=48,
                 image_size=SIZE, positions=300, repeats=2, batch_size=16,
                 pair=[f"{a},{b},A vs B", f"{a},{a},A vs A"])
    out = capsys.readouterr().out
    pairs = [l for l in out.splitlines() if l.startswith("pair ")]
    assert len(pairs) == 2 and re.fullmatch(
        r"pair 1/2 A vs B: mean paper_cca 0\.\d{3}, \S+( s)?, ETA \S+( s)?", pairs[0]), pairs
    assert pairs[1].startswith("pair 2/2 A vs A: mean paper_cca 1.000, ")
    assert pairs[1].endswith(", ETA 0 s")
    for label in ("A vs B", "A vs A"):   # 48 images per repeat, 2 repeats, batches of 16
        got = _lines(out, label)
        assert [g[0] for g in got] == [16, 32, 48, 64, 80, 96] and {g[1] for g in got} == {96}
        assert [g[2] for g in got] == ["repeat 1/2"] * 3 + ["repeat 2/2"] * 3
    rows = _rows(files["csv"])
    assert len(rows) == 10 and os.path.getsize(files["png"]) > 1000
    by = {(r["pair"], r["layer"]): float(r["value"]) for r in rows}
    for layer in resnet.stage_output_names(50):
        assert by[("A vs A", layer)] == pytest.approx(1.0, abs=1e-4)
        assert 0 < by[("A vs B", layer)] < 0.99
    js = json.load(open(files["json"]))
    assert js[0]["method"] == "paper_cca" and len(js[0]["values"]) == 2


def test_similarity_custom_with_data_contract(weights, tmp_path):
    """--images=data: the data config's split of --fold with --data_override, drawn by the
    one stimulus-pool loader (seeded random subset for --protocol=custom)."""
    task = _task(analyze.similarity_task, weights_a=weights[0], weights_b=weights[1],
                 protocol="custom", num_images=5, fold=1,
                 data_override=["synthetic.num_examples=60"])
    spec = task.stimuli
    assert (spec.split, spec.fold, spec.selection, spec.size()) == ("test", 1, "random", SIZE)
    assert spec.data.synthetic.num_examples == 60
    pool = stimuli.load_pool(spec)
    first = stimuli.load_pool(stimuli.StimulusSpec(data=spec.data, split="test", fold=1,
                                                   num_images=10 ** 6))
    assert pool.dtype == np.uint8 and pool.shape[1:] == (SIZE, SIZE, 3)
    # a sorted random subset of the split, not its first images
    assert len(pool) == 5 and len(first) > 5
    rows = [next(i for i in range(len(first)) if np.array_equal(first[i], img)) for img in pool]
    assert rows == sorted(rows) and rows != list(range(len(pool)))
    files = _run("similarity", output_dir=str(tmp_path), weights_a=weights[0],
                 weights_b=weights[1], protocol="custom", methods=["linear_cka", "mean_cca"],
                 layers=["conv4_block6_out"], spatial="positions", positions=208,
                 channels=16, batch_size=16, fold=1, split="train",
                 data_override=["synthetic.num_examples=60"])
    rows = _rows(files["csv"])
    assert {r["method"] for r in rows} == {"linear_cka", "mean_cca"}
    assert all(r["channels"] == "16" and r["datapoints"] == "208" for r in rows)  # 13 img x 16
    with pytest.raises(UserError, match="has splits"):
        _run("similarity", output_dir=str(tmp_path), weights_a=weights[0],
             weights_b=weights[1], split="holdout")
    with pytest.raises(UserError, match="no field"):
        _run("similarity", output_dir=str(tmp_path), weights_a=weights[0],
             weights_b=weights[1], data_override=["nonsense=1"])


def test_weights_and_filters_commands(weights, tmp_path, capsys):
    files = _run("weights", output_dir=str(tmp_path / "w"), weights_a=weights[0],
                 weights_b=weights[1])
    rows = _rows(files["csv"])
    assert len(rows) > 100 and all(r["status"] == "ok" for r in rows)
    conv1 = next(r for r in rows if r["layer"] == "conv1_conv")
    assert float(conv1["rel_l2"]) == pytest.approx(np.sqrt(2), abs=0.1)  # independent draws
    files = _run(None, what="filters", output_dir=str(tmp_path / "f"),
                 weights=[f"a={weights[0]}", f"b={weights[1]}"], groups=["g=a,b"])
    layers = _rows(files["layers"])
    assert len(layers) == 2 * 16  # 16 3x3 convs in a ResNet50, two models
    # one progress line per model described (seconds each for a full-width ResNet50)
    got = _lines(capsys.readouterr().out, "filters", "models")
    assert got == [(1, 2, "a (16 layers)"), (2, 2, "b (16 layers)")]
    drift = _rows(files["drift"])
    assert {r["scope"] for r in drift} == {"layer"}  # one group: no group pairs
    assert all(float(r["drift"]) >= 0 for r in drift)
    npz = np.load(files["npz"])
    assert npz["bin_edges"].shape == (9, 71)
    for k in ("hist_png", "drift_layer_png", "conv1_png"):
        assert os.path.getsize(files[k]) > 1000
    # one histogram figure per depth bin, named so a shell needs no quoting
    per_bin = sorted(os.path.basename(v) for k, v in files.items() if k.startswith("hist_png_"))
    assert "filter_histograms_depth_0.0-0.1.png" in per_bin
    assert all(re.fullmatch(r"filter_histograms_depth_[0-9.]+-[0-9.]+\.png", f) for f in per_bin)


def test_predictions_command(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 40)
    for name, skill in (("a", 2.0), ("b", 1.0)):
        with open(tmp_path / f"{name}.csv", "w") as f:
            f.write("id,group,split,label,prob_0,prob_1\n")
            for i, l in enumerate(labels):
                p1 = 1 / (1 + np.exp(-(skill * (2 * l - 1) + rng.normal())))
                f.write(f"x{i},g{i},test,{l},{1 - p1},{p1}\n")
    files = _run("predictions", output_dir=str(tmp_path / "out"),
                 predictions_a=str(tmp_path / "a.csv"), predictions_b=str(tmp_path / "b.csv"))
    res = json.load(open(files["json"]))
    assert res["expected_independent"] == pytest.approx(
        res["acc_a"] * res["acc_b"] + (1 - res["acc_a"]) * (1 - res["acc_b"]))
    with pytest.raises(UserError, match="does not exist"):
        _run("predictions", output_dir=str(tmp_path), predictions_a=str(tmp_path / "a.csv"),
             predictions_b=str(tmp_path / "zzz.csv"))
    # --similarity_mode=paper (the published table): the val rows, acc_A twice.
    for name in ("a", "b"):
        rows = open(tmp_path / f"{name}.csv").read().splitlines()
        extra = [r.replace(",test,", ",val,").replace("x", "v", 1) for r in rows[1:21]]
        (tmp_path / f"{name}.csv").write_text("\n".join(rows + extra) + "\n")
    files = _run("predictions", output_dir=str(tmp_path / "paper"), similarity_mode="paper",
                 predictions_a=str(tmp_path / "a.csv"), predictions_b=str(tmp_path / "b.csv"))
    res = json.load(open(files["json"]))
    assert res["split"] == "val" and res["n"] == 20
    assert res["expected_independent"] == pytest.approx(
        res["acc_a"] ** 2 + (1 - res["acc_a"]) ** 2)


def test_auc_vs_similarity_command(tmp_path):
    rng = np.random.default_rng(2)
    runs, xs, gains = [], [], []
    rand = tmp_path / "random.json"
    rand.write_text(json.dumps({"status": "done", "test": {"auc": 0.6}}))
    for i in range(5):
        x = rng.uniform(0.2, 0.9)
        auc = 0.9 - 0.3 * x + 0.01 * rng.normal()
        sim = tmp_path / f"sim{i}.csv"
        sim.write_text("layer,method,value\nconv1_relu,paper_cca,%r\n"
                       "conv1_relu,linear_cka,0.5\n" % x)
        res = tmp_path / f"res{i}.json"
        res.write_text(json.dumps({"status": "done", "test": {"auc": auc}}))
        runs.append(f"{sim},{res},{rand}")
        xs.append(x)
        gains.append((auc - 0.6) / 0.6)
    files = _run("auc_vs_similarity", output_dir=str(tmp_path / "o"), run=runs)
    row = _rows(files["csv"])[0]
    assert row["layer"] == "conv1_relu" and int(row["n"]) == 5
    assert float(row["pearson_r"]) == pytest.approx(np.corrcoef(xs, gains)[0, 1])
    with pytest.raises(UserError, match="no test.auroc"):
        _run("auc_vs_similarity", output_dir=str(tmp_path / "o"), run=runs, auc_metric="auroc")
    with pytest.raises(UserError, match="at least 2 \\(got 1\\)"):
        _run("auc_vs_similarity", output_dir=str(tmp_path / "o1"), run=runs[:1])
    assert not (tmp_path / "o1").exists()  # a failed analysis leaves no empty folder
    # with a SOURCE per run: one fit per source
    named = [f"{r},{'imagenet' if i < 3 else 'radimagenet'}" for i, r in enumerate(runs)]
    rows = _rows(_run("auc_vs_similarity", output_dir=str(tmp_path / "o2"), run=named)["csv"])
    assert [(r["source"], int(r["n"])) for r in rows] == [("imagenet", 3), ("radimagenet", 2)]
    assert float(rows[0]["slope"]) == pytest.approx(np.polyfit(xs[:3], gains[:3], 1)[0])


def test_flag_errors(weights, tmp_path):
    with pytest.raises(UserError, match="Say what"):
        _run(None, output_dir=str(tmp_path))
    with pytest.raises(UserError, match="Unknown analysis"):
        _run("histology", output_dir=str(tmp_path))
    with pytest.raises(UserError, match="output_dir"):
        _run("weights", weights_a=weights[0], weights_b=weights[1])
    with pytest.raises(UserError, match="both --weights_a and --weights_b"):
        _run("cca", output_dir=str(tmp_path), weights_a=weights[0], images="random")
    with pytest.raises(UserError, match="DIR_A,DIR_B"):
        _run("cca", output_dir=str(tmp_path), pair=[weights[0]], images="random")
    with pytest.raises(UserError, match="does not exist"):
        _run("cca", output_dir=str(tmp_path), pair=[f"{weights[0]},/nope"], images="random")
    with pytest.raises(UserError, match="--weights"):
        _run("filters", output_dir=str(tmp_path))
