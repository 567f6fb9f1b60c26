"""The filters stage's cost per model: the study's PCA basis (two streamed passes over
each model's weights on disk) against one (pre-trained, fine-tuned) pair's analysis.

A Revisiting study compares 175 fine-tuned ResNet50s and their sources; the basis pass is
paid once per study, the pair analysis once per run. Writes ``models`` random ResNets
(``depth``, ``width``; each a scaled, jittered copy of one init, as fine-tuning leaves a
network near its start) as weights dirs, then times, alternating in each of ``repeats``
rounds: the basis over all of them, and the first pair in its own basis and in the study's.
The median round is reported.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from typing import Dict, List

import jax
import numpy as np

from medtransfer_jax.analysis import filters
from medtransfer_jax.bench import common
from medtransfer_jax.models import resnet
from medtransfer_jax.weights import checkpoint

COLUMNS = ["what", "models", "filters", "seconds", "s_per_model_pass", "vs_own_basis"]


def _write_models(folder: str, models: int, depth: int, width: int) -> List[str]:
    model = resnet.ResNet(depth=depth, width=width, num_classes=None, layout="keras_v1")
    base = resnet.init_variables(model, jax.random.key(0), 32)
    meta = checkpoint.WeightsMetadata(source="bench", layout="keras_v1", depth=depth,
                                      width=width, num_classes=None, preprocessing="caffe")
    dirs = []
    for i in range(models):
        rng = np.random.default_rng(i)
        v = jax.tree.map(lambda x: np.asarray(x) * (1 + 0.05 * i)
                         + 0.01 * rng.normal(size=np.shape(x)).astype(np.float32), base)
        dirs.append(checkpoint.save_weights(f"{folder}/model{i}", v, meta))
    return dirs


def run(models: int = 4, depth: int = 50, width: int = 64, repeats: int = 3) -> List[Dict]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        dirs = _write_models(tmp, max(models, 2), depth, width)
        common.progress(f"filters: wrote {len(dirs)} models in {time.perf_counter() - t0:.1f} s")
        pre, ft = (checkpoint.load_weights(d)[0]["params"] for d in dirs[:2])
        times: Dict[str, list] = {"basis": [], "own": [], "study": []}
        basis = None
        for r in range(repeats):
            t0 = time.perf_counter()
            basis = filters.fit_basis_of_weights(dirs)
            t1 = time.perf_counter()
            filters.analyse_filters({"pre": pre, "fine-tuned": ft})
            t2 = time.perf_counter()
            filters.analyse_filters({"pre": pre, "fine-tuned": ft}, basis=basis)
            t3 = time.perf_counter()
            for k, s in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[k].append(s)
            common.progress(f"filters: repeat {r + 1}/{repeats}: basis {t1 - t0:.1f} s, pair "
                            f"(own basis) {t2 - t1:.1f} s, pair (study basis) {t3 - t2:.1f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(dirs)
    return [dict(what="study basis: 2 streamed passes (load, scale, moments / signs, extent)",
                 models=n, filters=basis.num_filters, seconds=round(med["basis"], 3),
                 s_per_model_pass=round(med["basis"] / (2 * n), 3)),
            dict(what="one (pre, fine-tuned) pair, its own basis", models=2,
                 seconds=round(med["own"], 3), vs_own_basis=1.0),
            dict(what="one (pre, fine-tuned) pair, the study's basis", models=2,
                 seconds=round(med["study"], 3),
                 vs_own_basis=round(med["study"] / med["own"], 3))]


NOTE = ("A study's filters stage: the basis once (2 passes x every model), then one pair "
        "analysis per run (histograms per depth bin and layer, noise floor of 3 halvings, "
        "layer statistics); weights loaded from disk in the basis rows only")
