"""The study's CCA stimuli follow the protocol's analysis fields (Revisiting CCA.py)."""
import importlib.util
import os
import types

import ml_collections
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from medtransfer_jax import analyze, data
from medtransfer_jax.analysis import stimuli
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
    breast = stimuli.protocol_of(_protocol_config("breast", "radimagenet"))
    assert breast == {"split": "val", "image_size": 224, "preprocessing": "caffe"}
    chest = stimuli.protocol_of(_protocol_config("chest", "imagenet"))
    assert chest["image_size"] == 112 and chest["preprocessing"] == "caffe"
    # A config without analysis fields: the test split at the run's size, own inputs.
    demo = stimuli.protocol_of(presets.tiny_config())
    assert demo == {"split": "test", "image_size": 32, "preprocessing": None}


def _one_target_study(tmp_path):
    """A study stand-in with one target whose config asks for 24 px nearest val stimuli."""
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
    return study, cfg_file


def test_target_images_use_the_protocol_split_and_size(tmp_path):
    study, cfg_file = _one_target_study(tmp_path)
    images = analyses.target_images(study, "t", fold=0, num_images=5)
    cfg = presets.tiny_config()
    val = data.get_splits(cfg.data, fold=0).val
    assert images.shape == (5, 24, 24, 3)
    want = data.pipeline.resize(val[0]["image"], 24, "nearest")
    np.testing.assert_array_equal(images[0, ..., 0], want if want.ndim == 2 else want[..., 0])


def _analyze_spec(**overrides):
    """The (StimulusSpec, preprocessing) analyze builds from its flags."""
    FLAGS = flags.FLAGS
    paper = overrides.pop("paper", True)
    if not FLAGS.is_parsed():
        FLAGS.mark_as_parsed()
    for flag in FLAGS.flags_by_module_dict()[analyze.__name__]:
        flag.unparse()
    for k, v in overrides.items():
        setattr(FLAGS, k, v)
    return analyze.stimulus_spec(paper, first_weights="unused")


@flagsaver.flagsaver
def test_analyze_and_the_study_draw_byte_identical_pools(tmp_path):
    """One loader: analyze --stimuli_config=<the target's config> gives the study's
    stimuli byte for byte (val split, 24 px, nearest, first N), and a different resize
    filter or selection would show (the comparison can fail)."""
    study, cfg_file = _one_target_study(tmp_path)
    ours = analyses.target_images(study, "t", fold=1, num_images=7)
    spec, preprocessing = _analyze_spec(stimuli_config=str(cfg_file), fold=1, num_images=7)
    assert (spec.split, spec.image_size, spec.resize_method, spec.selection) == (
        "val", 24, "nearest", "first") and preprocessing == "caffe"
    theirs = stimuli.load_pool(spec)
    assert ours.dtype == theirs.dtype == np.uint8 and ours.shape == (7, 24, 24, 3)
    assert ours.tobytes() == theirs.tobytes()
    spec_bilinear, _ = _analyze_spec(stimuli_config=str(cfg_file), fold=1, num_images=7,
                                     resize_method="bilinear")
    assert stimuli.load_pool(spec_bilinear).tobytes() != ours.tobytes()
    spec_random, _ = _analyze_spec(stimuli_config=str(cfg_file), fold=1, num_images=7,
                                   selection="random", seed=3)
    assert stimuli.load_pool(spec_random).tobytes() != ours.tobytes()



@flagsaver.flagsaver
def test_analyze_stimuli_config_reads_the_runs_fold_and_map_its_preprocessing(tmp_path):
    """Without --fold, the stimuli come from the run's own data.fold (a study run's config
    says fold 2: fold 0's images were used); `analyze map` normalises with the protocol's
    preprocessing, as the study's layer maps do (it used the networks' own)."""
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "from medtransfer_jax.training import presets\n"
        "def get_config(arg=None):\n"
        "    c = presets.tiny_config()\n"
        "    c.data.fold = 2\n"
        "    c.analysis = presets.analysis_defaults(cca_image_size=24)\n"
        "    return c\n")
    spec, _ = _analyze_spec(stimuli_config=str(cfg_file))
    assert spec.fold == 2
    spec, _ = _analyze_spec(stimuli_config=str(cfg_file), fold=0)
    assert spec.fold == 0
    for flag in flags.FLAGS.flags_by_module_dict()[analyze.__name__]:
        flag.unparse()
    flags.FLAGS.stimuli_config = str(cfg_file)
    flags.FLAGS.weights_a = str(tmp_path)
    assert analyze.layer_map_task().preprocessing == "caffe"
    flags.FLAGS.preprocessing = "unit"                     # the flag still wins
    assert analyze.layer_map_task().preprocessing == "unit"

@flagsaver.flagsaver
def test_analyze_paper_protocol_defaults_to_the_papers_stimuli():
    """Without a run config, --protocol=paper still reads CCA.py's stimuli: the val split,
    the dataset's CCA.py size, the first N images, caffe inputs."""
    spec, preprocessing = _analyze_spec(paper=True)
    assert (spec.split, spec.selection, spec.image_size, preprocessing) == (
        "val", "first", 112, "caffe")  # synthetic: CCA.py's default 112 px
    spec, preprocessing = _analyze_spec(paper=False)
    assert (spec.split, spec.selection, spec.image_size, preprocessing) == (
        "test", "random", 0, None)
    with pytest.raises(stimuli.StimulusError, match="need >= 2"):
        stimuli.load_pool(stimuli.StimulusSpec(data=_tiny_data(), split="val", image_size=8))


def _tiny_data():
    cfg = presets.tiny_config().data
    cfg.synthetic.num_examples = 8  # a val split of < 2 images
    return cfg


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


@flagsaver.flagsaver
def test_analyze_stimuli_config_takes_data_root_and_refuses_another_dataset(tmp_path):
    """--data_root moves the run config's data (a study run's files on another machine);
    a --dataset other than the run's is an error, not silently ignored."""
    _, cfg_file = _one_target_study(tmp_path)
    spec, _ = _analyze_spec(stimuli_config=str(cfg_file), data_root=str(tmp_path / "moved"))
    assert spec.data.root == str(tmp_path / "moved")
    with pytest.raises(analyze.FlagError, match="--dataset=breast contradicts"):
        _analyze_spec(stimuli_config=str(cfg_file), dataset="breast")
