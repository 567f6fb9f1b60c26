"""The study's CCA stimuli follow the protocol's analysis fields (Revisiting CCA.py)."""
import importlib.util
import os
import types

import ml_collections
import numpy as np

from medtransfer_jax import data
from medtransfer_jax.studies import analyses
from medtransfer_jax.training import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _protocol_config(target, arg):
    path = os.path.join(REPO, "configs", "revisiting", f"{target}.py")
    spec = importlib.util.spec_from_file_location(f"_stim_{target}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def test_revisiting_protocol_reads_cca_py_stimuli():
    breast = analyses.stimulus_protocol(_protocol_config("breast", "radimagenet"))
    assert breast == {"split": "val", "image_size": 224, "preprocessing": "caffe"}
    chest = analyses.stimulus_protocol(_protocol_config("chest", "imagenet"))
    assert chest["image_size"] == 112 and chest["preprocessing"] == "caffe"
    # A config without analysis fields: the test split at the run's size, own inputs.
    demo = analyses.stimulus_protocol(presets.tiny_config())
    assert demo == {"split": "test", "image_size": 32, "preprocessing": None}


def test_target_images_use_the_protocol_split_and_size(tmp_path):
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "from medtransfer_jax.training import presets\n"
        "def get_config(arg=None):\n"
        "    c = presets.tiny_config()\n"
        "    c.data.resize_method = 'nearest'\n"
        "    c.analysis = presets.analysis_defaults(cca_image_size=24, cca_stimulus='val')\n"
        "    return c\n")
    study = types.SimpleNamespace(
        config=ml_collections.ConfigDict({"targets": {"t": {"overrides": []}}}),
        target_config=lambda target: str(cfg_file))
    images = analyses.target_images(study, "t", fold=0, num_images=5)
    cfg = presets.tiny_config()
    val = data.get_splits(cfg.data, fold=0).val
    assert images.shape == (5, 24, 24, 3)
    want = data.pipeline.resize(val[0]["image"], 24, "nearest")
    np.testing.assert_array_equal(images[0, ..., 0], want if want.ndim == 2 else want[..., 0])


def test_prediction_similarity_uses_the_protocol_mode(tmp_path, monkeypatch):
    """A Feb-2023 target (analysis.similarity_mode='paper') is compared in the paper's
    mode (its own split); a target without the field in the corrected mode on test."""
    seen = []

    def fake_compare(a, b, split=None, random_path=None, mode="corrected"):
        seen.append((split, mode))
        return {"observed": 0.5, "expected_independent": 0.5, "excess": 0.0, "agreement": 0.5,
                "cohen_kappa": 0.0, "prob_correlation": 0.0, "n": 4}

    monkeypatch.setattr(analyses.pred, "compare_prediction_files", fake_compare)
    for mode, arg in (("paper", "imagenet,protocol=feb2023"), ("corrected", "imagenet")):
        cfg_file = tmp_path / f"{mode}.py"
        cfg_file.write_text(
            "import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('b', {os.path.join(REPO, 'configs', 'revisiting', 'breast.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"def get_config(arg=None):\n    return m.get_config({arg!r})\n")
        study = types.SimpleNamespace(
            clean_targets=["t"], folds=[0],
            config=ml_collections.ConfigDict({
                "targets": {"t": {"overrides": []}}, "sources": {"a": {}, "b": {}},
                "analysis": {"cca": {"methods": ["paper_cca"]}}}),
            target_config=lambda target, f=str(cfg_file): f,
            fine_tuned_dir=lambda target, s, fold, export=True: str(tmp_path / s),
            path=lambda *parts: str(tmp_path.joinpath(mode, *parts)))
        seen.clear()
        analyses.predictions(study)
        assert seen == [(None if mode == "paper" else "test", mode)]
