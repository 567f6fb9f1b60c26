"""Per-image predictions of a weights checkpoint on a dataset's splits.

The library side of ``python -m medtransfer_jax.evaluate``; writes the predictions CSV
(id, group, split, label, prob_0..) and a ``.metrics.json`` that the analysis reads.
"""
import json
import os

from absl import logging


def _merge(cfg, d):
    """Copies the JSON dict ``d`` into ConfigDict ``cfg`` (known keys only, recursively)."""
    for k, v in d.items():
        if k not in cfg:
            continue
        if isinstance(v, dict) and hasattr(cfg[k], "keys"):
            _merge(cfg[k], v)
        else:
            try:
                cfg[k] = tuple(v) if isinstance(v, list) else v
            except TypeError:
                logging.warning("data config field %s=%r from the run ignored", k, v)


def resolve_checkpoint(path: str):
    """(weights dir, run config dict or None) for a weights dir or a training workdir."""
    from medtransfer_jax.weights.checkpoint import METADATA_FILE, CheckpointError
    path = os.path.abspath(os.path.expanduser(path))
    run_cfg = None
    if os.path.exists(os.path.join(path, METADATA_FILE)):
        weights = path
        # export/best -> the workdir two levels up holds config.json
        cand = os.path.join(os.path.dirname(os.path.dirname(path)), "config.json")
    elif os.path.isdir(os.path.join(path, "export", "best")):
        weights = os.path.join(path, "export", "best")
        cand = os.path.join(path, "config.json")
    else:
        raise CheckpointError(f"--checkpoint={path} is neither a weights directory (with "
                              f"{METADATA_FILE}) nor a training workdir with export/best/.")
    if os.path.exists(cand):
        with open(cand) as f:
            run_cfg = json.load(f)
    return weights, run_cfg


def evaluate_checkpoint(checkpoint: str, *, dataset=None, data_root=None, fold=None,
                        splits=("test",), image_size=None, batch_size=64, output=None):
    """Predicts ``splits`` with the checkpoint; writes predictions CSV + metrics JSON.

    Returns:
      (output path, {split: metrics}).
    """
    import jax

    from medtransfer_jax import data as data_lib
    from medtransfer_jax.training import loop, step
    from medtransfer_jax.inference import predictions
    from medtransfer_jax import sharding
    from medtransfer_jax.weights import checkpoint as weights_lib

    weights, run_cfg = resolve_checkpoint(checkpoint)
    variables, meta = weights_lib.load_weights(weights)
    cfg = data_lib.default_data_config()
    if run_cfg and "data" in run_cfg:
        _merge(cfg, run_cfg["data"])
    if dataset:
        cfg.name = dataset
    if data_root:
        cfg.root = data_root
    if fold is None:
        fold = cfg.get("fold", 0)   # the run's data.fold (merged above), else 0
    fold = 0 if fold is None else int(fold)
    size = image_size or (cfg.image_size if run_cfg else meta.image_size)
    cfg.image_size = size
    ds = data_lib.get_splits(cfg, fold=fold)
    if meta.num_classes != ds.num_classes:
        raise weights_lib.CheckpointError(
            f"{weights}: the head has {meta.num_classes} classes but dataset {ds.name!r} has "
            f"{ds.num_classes} {ds.class_names}; evaluate on the dataset it was trained on.")
    available = {"train": ds.train, "val": ds.val, "test": ds.test, **ds.extra_tests}
    wanted = list(available) if list(splits) == ["all"] else list(splits)
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise ValueError(f"--splits {unknown} not available for {ds.name}; choose from "
                         f"{sorted(available)} or 'all'")

    model = meta.model_spec().build(num_classes=meta.num_classes)
    mesh = sharding.make_mesh()
    batch_size = -(-int(batch_size) // mesh.size) * mesh.size
    repl = sharding.replicated(mesh)
    var_sh = jax.tree.map(lambda _: repl, variables)
    dev_vars = jax.device_put(variables, var_sh)
    eval_step = step.make_eval_step(model, mesh, var_sh, num_classes=meta.num_classes)
    if output is None:
        output = os.path.join(os.path.dirname(weights) if os.path.basename(weights) == "best"
                              else weights, f"predictions_{ds.name}_fold{fold}.csv")
    rows, all_metrics = [], {}
    for name in wanted:
        src = available[name]
        mets, arrays = loop.evaluate_source(eval_step, dev_vars, src, mesh, image_size=size,
                                            preprocessing=meta.preprocessing,
                                            batch_size=batch_size,
                                            resize_method=cfg.resize_method,
                                            reported_auc=(run_cfg or {}).get("eval", {}).get(
                                                "reported_auc"))
        ids, groups = loop._ids_groups(src, arrays["index"])
        rows.append((ids, groups, [name] * len(ids), arrays["label"], arrays["probs"]))
        all_metrics[name] = mets
        logging.info("%s: %s", name, {k: round(v, 4) for k, v in mets.items()
                                      if isinstance(v, float)})
    if jax.process_index() == 0:
        import numpy as np
        predictions.write_predictions(
            output, [x for r in rows for x in r[0]], [x for r in rows for x in r[1]],
            [x for r in rows for x in r[2]], np.concatenate([r[3] for r in rows]),
            np.concatenate([r[4] for r in rows]))
        with open(os.path.splitext(output)[0] + ".metrics.json", "w") as f:
            json.dump({"checkpoint": weights, "dataset": ds.name, "fold": fold,
                       "image_size": size, "preprocessing": meta.preprocessing,
                       "metrics": all_metrics}, f, indent=2)
    return output, all_metrics
