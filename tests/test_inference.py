"""The inference layer: the one weights loader, the one forward pass, the one predictions
reader, and the layering rules they rely on (tiny ResNet18, 32 px)."""
import ast
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from medtransfer_jax import configs, sharding
from medtransfer_jax.data.base import DataError
from medtransfer_jax.errors import ConfigError, UserError
from medtransfer_jax.inference import evaluation, predictions
from medtransfer_jax.models import resnet
from medtransfer_jax.training import presets
from medtransfer_jax.weights import checkpoint

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "medtransfer_jax")


def _save(directory, depth=18, width=8, num_classes=3, layout="torchvision_v15", seed=0):
    model = resnet.ResNet(depth=depth, width=width, num_classes=num_classes, layout=layout)
    variables = resnet.random_variables(model, seed)
    checkpoint.save_weights(directory, variables, checkpoint.WeightsMetadata(
        source="random", layout=layout, depth=depth, width=width, num_classes=num_classes,
        preprocessing="unit", image_size=32))
    return variables


def test_load_model_builds_the_architecture_from_metadata(tmp_path):
    d = str(tmp_path / "w")
    saved = _save(d)
    loaded = checkpoint.load_model(d)
    m = loaded.model
    assert (m.depth, m.width, m.num_classes, m.layout) == (18, 8, 3, "torchvision_v15")
    assert loaded.name == d and loaded.metadata.preprocessing == "unit"
    assert checkpoint.load_model(loaded) is loaded                    # passes through
    leaf = loaded.variables["params"]["predictions"]["kernel"]
    assert isinstance(leaf, jax.Array)                                 # on the device once
    np.testing.assert_array_equal(np.asarray(leaf), saved["params"]["predictions"]["kernel"])
    mesh = sharding.make_mesh()
    on_mesh = checkpoint.load_model(d, "net", mesh=mesh)
    leaf = on_mesh.variables["params"]["predictions"]["kernel"]
    assert on_mesh.name == "net" and leaf.sharding.is_fully_replicated
    assert len(leaf.sharding.device_set) == mesh.size
    host = checkpoint.load_model(d, to_device=False).variables["params"]["predictions"]["kernel"]
    assert isinstance(host, np.ndarray)


def test_load_model_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match=re.escape(missing) + ".*does not exist") as e:
        checkpoint.load_model(missing)
    assert "\n" not in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=re.escape(str(empty)) + ".*no metadata.json") as e:
        checkpoint.load_model(str(empty))
    assert "\n" not in str(e.value)


_FORWARD = r"""
import json, sys
import jax, numpy as np
from medtransfer_jax import preprocessing, sharding
from medtransfer_jax.data.base import ArraySource
from medtransfer_jax.inference import predict
from medtransfer_jax.weights import checkpoint

d, n, bs = sys.argv[1], 13, 8
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
labels = rng.integers(0, 3, n)
src = ArraySource(images, labels, ("a", "b", "c"), ids=[f"x{i}" for i in range(n)],
                  groups=[f"g{i % 4}" for i in range(n)])
out = {"devices": jax.device_count()}
for k in (1, 8):
    mesh = sharding.make_mesh(k)
    m = checkpoint.load_model(d, mesh=mesh)
    sh = jax.tree.map(lambda _: sharding.replicated(mesh), m.variables)
    step = predict.make_eval_step(m.model, mesh, sh, num_classes=3)
    mets, arrays = predict.evaluate_source(step, m.variables, src, mesh, image_size=32,
                                           preprocessing="unit", batch_size=bs)
    ids, groups = predict.ids_groups(src, arrays["index"])
    out[k] = {"index": arrays["index"].tolist(), "label": arrays["label"].tolist(),
              "probs": arrays["probs"].tolist(), "loss": arrays["loss"].tolist(),
              "ids": ids, "groups": groups, "auc": mets["auc"]}
m = checkpoint.load_model(d, to_device=False)
logits = m.model.apply(m.variables, preprocessing.normalize(images.astype(np.float32), "unit"),
                       train=False)
out["ref"] = np.asarray(jax.nn.softmax(logits.astype(np.float32), -1)).tolist()
out["labels"] = labels.tolist()
print("RESULT" + json.dumps(out))
"""


def test_forward_pass_every_example_once_in_order_same_on_1_and_8_devices(tmp_path):
    """13 examples, global batch 8 (the last batch is padded): each example comes back
    once, in source order, with the probabilities of a plain model.apply, on a 1-device
    and an 8-device mesh alike."""
    d = str(tmp_path / "w")
    _save(d)
    script = tmp_path / "forward.py"
    script.write_text(_FORWARD)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([os.path.dirname(PKG),
                                           os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(script), d], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    assert out["devices"] == 8
    ref = np.asarray(out["ref"])
    assert np.ptp(ref[:, 0]) > 1e-3                      # the examples differ
    for k in ("1", "8"):
        r = out[k]
        assert r["index"] == list(range(13)) and r["label"] == out["labels"]
        assert r["ids"] == [f"x{i}" for i in range(13)]
        assert r["groups"] == [f"g{i % 4}" for i in range(13)]
        np.testing.assert_allclose(r["probs"], ref, atol=1e-5, err_msg=k)
        want_loss = -np.log(ref[np.arange(13), out["labels"]])
        np.testing.assert_allclose(r["loss"], want_loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["8"]["probs"], out["1"]["probs"], atol=1e-6)
    assert out["8"]["auc"] == pytest.approx(out["1"]["auc"], abs=1e-9)


def test_evaluate_prints_throttled_lines_per_split(tmp_path, capsys, monkeypatch):
    """`evaluate` on a split of thousands of images is minutes on a CPU: lines of images
    done, img/s and ETA (every batch here: interval 0), counting only real rows (the
    last batch's padding is not an image)."""
    from medtransfer_jax import ticker
    monkeypatch.setattr(ticker, "INTERVAL_S", 0.0)
    d = str(tmp_path / "w")
    _save(d, num_classes=2)
    out, mets = evaluation.evaluate_checkpoint(d, dataset="synthetic", splits=["val", "test"],
                                               batch_size=32, output=str(tmp_path / "p.csv"))
    lines = capsys.readouterr().out.splitlines()
    split_of = predictions.read_predictions(out)["split"]
    n = {s: int(np.sum(split_of == s)) for s in ("val", "test")}
    for split in ("val", "test"):
        head = f"evaluate {split}: "
        got = [re.fullmatch(r"(\d+)/(\d+) images, [\d.]+ img/s, \S+( s)?, ETA \S+( s)?",
                            l[len(head):]) for l in lines if l.startswith(head)]
        assert got and all(got), lines
        done = [int(m.group(1)) for m in got]
        assert done == [min(32 * (i + 1), n[split]) for i in range(len(done))], done
        assert done[-1] == n[split] and {int(m.group(2)) for m in got} == {n[split]}


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name,text,problem", [
    ("empty.csv", "", "is empty"),
    ("header.csv", "id,label,prob_0\nx,1,0.5\n", "header id,label,prob_0 is not"),
    ("noprobs.csv", "id,group,split,label\nx,x,test,1\n", "header .* is not"),
    ("gap.csv", "id,group,split,label,prob_0,prob_2\nx,x,test,1,0.5,0.5\n", "is not"),
    ("ragged.csv", "id,group,split,label,prob_0,prob_1\na,a,test,0,0.4,0.6\nb,b,test,1,0.3\n",
     r"line\(s\) \[3\] do not have the header's 6 columns"),
    ("text.csv", "id,group,split,label,prob_0,prob_1\na,a,test,yes,0.4,0.6\n",
     "labels must be integers"),
    ("nan.csv", "id,group,split,label,prob_0,prob_1\na,a,test,0,0.4,0.6\nb,b,test,1,nan,nan\n",
     r"line\(s\) \[3\] hold probabilities outside \[0, 1\] or not finite"),
    ("range.csv", "id,group,split,label,prob_0,prob_1\na,a,test,0,1.7,-0.7\n",
     r"line\(s\) \[2\] hold probabilities outside"),
    ("label.csv", "id,group,split,label,prob_0,prob_1\na,a,test,0,0.4,0.6\nb,b,test,2,0.5,0.5\n",
     r"line\(s\) \[3\] hold a label outside 0..1"),
])
def test_read_predictions_errors_name_the_file_and_problem(tmp_path, name, text, problem):
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=re.escape(path) + ".*" + problem) as e:
        predictions.read_predictions(path)
    assert "\n" not in str(e.value)


def test_read_predictions_missing_and_header_only(tmp_path):
    with pytest.raises(DataError, match="missing.csv does not exist"):
        predictions.read_predictions(str(tmp_path / "missing.csv"))
    out = predictions.read_predictions(
        _write(tmp_path / "h.csv", "id,group,split,label,prob_0,prob_1\n"))
    assert out["probs"].shape == (0, 2) and out["label"].dtype == np.int64


def test_analysis_reads_predictions_with_the_inference_reader():
    from medtransfer_jax.analysis import predictions as analysis_predictions
    assert analysis_predictions.load_predictions is predictions.read_predictions


def test_evaluation_data_config_from_the_run_via_override():
    run = {"data": {"name": "synthetic", "image_size": 48, "fold": 2, "gone_field": 1,
                    "synthetic": {"num_examples": 10}}}
    cfg = evaluation.data_config(run, data_root="/elsewhere")
    assert (cfg.name, cfg.image_size, cfg.fold, cfg.root) == ("synthetic", 48, 2, "/elsewhere")
    assert cfg.synthetic.num_examples == 10 and "gone_field" not in cfg
    with pytest.raises(ConfigError, match="image_size"):
        evaluation.data_config({"data": {"image_size": "big"}})


def test_resolve_checkpoint(tmp_path):
    wd = tmp_path / "run"
    _save(str(wd / "export" / "best"))
    (wd / "config.json").write_text(json.dumps({"data": {"fold": 1}}))
    for given in (wd, wd / "export" / "best"):
        weights, run_cfg = evaluation.resolve_checkpoint(str(given))
        assert weights == str(wd / "export" / "best") and run_cfg == {"data": {"fold": 1}}
    with pytest.raises(checkpoint.CheckpointError, match="neither a weights directory"):
        evaluation.resolve_checkpoint(str(tmp_path))


def test_tiny_config_overrides_through_configs_override():
    c = presets.tiny_config(["train.lr=0.5", "data.fold=3"])
    assert c.train.lr == 0.5 and c.data.fold == 3
    with pytest.raises(ConfigError, match="no field 'train.lrr'"):
        presets.tiny_config(["train.lrr=1"])
    assert presets.base_config is configs.base.base_config


def _project_imports(path):
    """(inside a function?, module) of every import of a medtransfer_jax module in
    ``path``; ``from medtransfer_jax import data`` gives medtransfer_jax.data."""
    tree = ast.parse(open(path).read())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef,
                                                               ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out += [(id(node) in nested, n) for n in names if n.startswith("medtransfer_jax.")]
    return out


MAINS = {"train.py", "evaluate.py", "analyze.py", "study.py", "sweep.py", "convert.py",
         "cli.py", os.path.join("bench", "cli.py")}


def _package_files():
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                yield os.path.relpath(os.path.join(root, f), PKG)


def test_project_imports_at_the_top_outside_the_mains():
    late = [(rel, mod) for rel in _package_files() if rel not in MAINS
            for indented, mod in _project_imports(os.path.join(PKG, rel)) if indented]
    assert not late


@pytest.mark.parametrize("low,high", [
    ("inference", "training"), ("inference", "analysis"), ("weights", "inference"),
    ("weights", "training"), ("configs", "training"), ("training", "analysis"),
    ("inference", "studies"), ("analysis", "studies"),
])
def test_no_upward_imports(low, high):
    """inference sits below training (training's evaluation runs its forward pass), the
    weights loader below both, and the embedded configs below training."""
    up = [(rel, mod) for rel in _package_files() if rel.startswith(low + os.sep)
          for _, mod in _project_imports(os.path.join(PKG, rel))
          if mod.startswith(f"medtransfer_jax.{high}")]
    assert not up


@pytest.mark.parametrize("mode", ["caffe", "radimagenet", "torch", "unit"])
@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_normalising_on_device_equals_the_host_preparation(mode, channels):
    """Raw uint8 batches moved as they are and normalised in jit give the host's
    prepare_images (grey replicated, alpha dropped)."""
    from medtransfer_jax import sharding
    from medtransfer_jax.inference import activations as act
    rng = np.random.default_rng(0)
    shape = (8, 5, 6) if channels is None else (8, 5, 6, channels)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    mesh = sharding.make_mesh(None)
    raw = act.put_raw(images, mesh)
    assert raw.dtype == np.uint8 and raw.shape[-1] in (1, 3)
    got = np.asarray(sharding.gather_to_host(act.normalize_on_device(raw, mode)))
    want = act.prepare_images(images, mode)
    assert got.shape == want.shape == (8, 5, 6, 3)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
