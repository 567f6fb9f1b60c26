"""Per-image predictions of a weights checkpoint on a dataset's splits.

The library side of ``python -m medtransfer_jax.evaluate``; writes the predictions CSV
(id, group, split, label, prob_0..) and a ``.metrics.json`` that the analysis reads.
Checkpoint and output may be local or ``gs://`` (medtransfer_jax.paths).
"""
from __future__ import annotations

import json
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import jax
import numpy as np
from absl import logging

from medtransfer_jax import configs, data as data_lib, paths
from medtransfer_jax import sharding
from medtransfer_jax.inference import predict, predictions
from medtransfer_jax.ticker import Ticker
from medtransfer_jax.weights import checkpoint as weights_lib


def resolve_checkpoint(path: str, *, dataset: Optional[str] = None
                       ) -> Tuple[str, Optional[Dict[str, Any]]]:
    """(weights dir, run config dict or None) for a weights dir or a training workdir
    (its ``export/best``; the run's ``config.json`` sits two levels above a weights dir
    exported by training, ``RUN/export/{best,last}``).

    A training export whose ``config.json`` is missing, damaged or has no ``data`` is
    refused (CheckpointError) unless ``dataset`` (``--dataset``) names the data: the
    defaults would silently test other images than the run's test set.
    """
    path = paths.workdir(path)
    if paths.exists(paths.join(path, weights_lib.METADATA_FILE)):
        weights = path
    elif paths.isdir(paths.join(path, "export", "best")):
        weights = paths.join(path, "export", "best")
    else:
        raise weights_lib.CheckpointError(
            f"--checkpoint={paths.to_str(path)} is neither a weights directory (with "
            f"{weights_lib.METADATA_FILE}) nor a training workdir with export/best/.")
    run_dir = _run_dir(weights)
    if run_dir is None:   # converted or copied weights: no run config to read
        return paths.to_str(weights), None
    cand = paths.join(run_dir, "config.json")
    run_cfg, problem = _read_run_config(cand)
    if problem is None:
        return paths.to_str(weights), run_cfg
    if dataset is None:
        raise weights_lib.CheckpointError(
            f"{paths.to_str(cand)} {problem}, so the data run {paths.to_str(run_dir)} was "
            "tested on is unknown (the defaults would test other images); restore that file "
            "(a finished run's results.json keeps a copy under \"config\"), or give --dataset "
            "(and --data_root, --fold, --image_size where the run used others) to say what to "
            "evaluate on")
    logging.warning("%s %s: evaluating on the defaults of --dataset=%s and the flags given",
                    paths.to_str(cand), problem, dataset)
    return paths.to_str(weights), None


def _run_dir(weights) -> Optional[Any]:
    """The training workdir of an exported ``RUN/export/{best,last}``, else None."""
    weights = paths.workdir(weights)
    if paths.basename(weights) in ("best", "last") and weights.parent.name == "export":
        return weights.parent.parent
    return None


def _read_run_config(path) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(the run's config dict, None), or (None, what is wrong with ``path``)."""
    if not paths.exists(path):
        return None, "does not exist"
    try:
        run_cfg = json.loads(paths.read_text(path))
    except (ValueError, OSError) as e:   # JSONDecodeError, UnicodeDecodeError, unreadable
        return None, f"is damaged ({type(e).__name__}: {e})"
    if not isinstance(run_cfg, dict) or not isinstance(run_cfg.get("data"), dict):
        return None, "has no 'data' section"
    return run_cfg, None


def _dotted(d: Mapping[str, Any], cfg, prefix: str = "") -> Iterator[str]:
    """'key=repr(value)' items of the fields of JSON dict ``d`` that ConfigDict ``cfg``
    knows (a run written by an older version may carry fields since removed)."""
    for k, v in d.items():
        if k not in cfg:
            logging.warning("data config field %s%s from the run ignored (unknown)", prefix, k)
        elif isinstance(v, dict) and hasattr(cfg[k], "keys"):
            yield from _dotted(v, cfg[k], f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}={v!r}"


def data_config(run_cfg: Optional[Mapping[str, Any]], dataset=None, data_root=None):
    """The data config to evaluate on: defaults <- the run's ``data`` <- the flags."""
    cfg = data_lib.default_data_config()
    if run_cfg and "data" in run_cfg:
        configs.override(cfg, list(_dotted(run_cfg["data"], cfg)), flag="checkpoint")
    if dataset:
        cfg.name = dataset
    if data_root:
        cfg.root = data_root
    return cfg


def _pick_splits(ds, splits) -> Dict[str, Any]:
    """{name: source} of the requested splits ('all': every split of ``ds``)."""
    available = {"train": ds.train, "val": ds.val, "test": ds.test, **ds.extra_tests}
    wanted = list(available) if list(splits) == ["all"] else list(splits)
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise data_lib.DataError(f"--splits {unknown} not available for {ds.name}; choose "
                                 f"from {sorted(available)} or 'all'")
    return {s: available[s] for s in wanted}


def evaluate_checkpoint(checkpoint: str, *, dataset=None, data_root=None, fold=None,
                        splits=("test",), image_size=None, batch_size=64, output=None):
    """Predicts ``splits`` with the checkpoint; writes predictions CSV + metrics JSON,
    with throttled progress lines per split (thousands of images are minutes on a CPU).

    Returns:
      (output path, {split: metrics}).
    """
    weights, run_cfg = resolve_checkpoint(checkpoint, dataset=dataset)
    cfg = data_config(run_cfg, dataset, data_root)
    fold = cfg.get("fold", 0) if fold is None else fold   # the run's data.fold, else 0
    fold = 0 if fold is None else int(fold)
    data_lib.splits.check_fold(fold, int(cfg.num_folds), "--fold")  # before loading weights
    mesh = sharding.make_mesh()
    loaded = weights_lib.load_model(weights, mesh=mesh)
    meta = loaded.metadata
    cfg.image_size = size = image_size or (cfg.image_size if run_cfg else meta.image_size)
    ds = data_lib.get_splits(cfg, fold=fold)
    if meta.num_classes != ds.num_classes:
        raise weights_lib.CheckpointError(
            f"{weights}: the head has {meta.num_classes} classes but dataset {ds.name!r} has "
            f"{ds.num_classes} {ds.class_names}; evaluate on the dataset it was trained on.")
    sources = _pick_splits(ds, splits)
    batch_size = -(-int(batch_size) // mesh.size) * mesh.size
    var_sh = jax.tree.map(lambda _: sharding.replicated(mesh), loaded.variables)
    eval_step = predict.make_eval_step(loaded.model, mesh, var_sh, num_classes=meta.num_classes)
    reported = ((run_cfg or {}).get("eval") or {}).get("reported_auc")
    if output is None:
        # A run's export/best -> the run directory; another weights dir -> itself.
        parent = paths.workdir(weights)
        if paths.basename(weights) == "best" and parent.parent.name == "export":
            parent = parent.parent.parent
        output = paths.join(parent, f"predictions_{ds.name}_fold{fold}.csv")
    rows: List[Tuple] = []
    all_metrics = {}
    for name, src in sources.items():
        mets, arrays = predict.evaluate_source(
            eval_step, loaded.variables, src, mesh, image_size=size,
            preprocessing=meta.preprocessing, batch_size=batch_size,
            resize_method=cfg.resize_method, reported_auc=reported,
            progress=Ticker(f"evaluate {name}"))
        ids, groups = predict.ids_groups(src, arrays["index"])
        rows.append((ids, groups, [name] * len(ids), arrays["label"], arrays["probs"]))
        all_metrics[name] = mets
        logging.info("%s: %s", name, {k: round(v, 4) for k, v in mets.items()
                                      if isinstance(v, float)})
    if jax.process_index() == 0:
        _write(output, rows, {"checkpoint": weights, "dataset": ds.name, "fold": fold,
                              "image_size": size, "preprocessing": meta.preprocessing,
                              "metrics": all_metrics})
    return paths.to_str(output), all_metrics


def _write(output: paths.PathLike, rows: List[Tuple], summary: Dict[str, Any]) -> None:
    """The predictions CSV of all ``rows`` and ``<output stem>.metrics.json`` beside it."""
    predictions.write_predictions(
        output, *[sum((list(r[i]) for r in rows), []) for i in range(3)],
        np.concatenate([r[3] for r in rows]), np.concatenate([r[4] for r in rows]))
    paths.write_text_atomic(paths.as_path(output).with_suffix(".metrics.json"),
                            json.dumps(summary, indent=2))
