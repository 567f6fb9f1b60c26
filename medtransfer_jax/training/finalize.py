"""The end of a run: evaluate the best model on every test set, write its predictions,
export the best and last weights (shared weights format) and ``results.json``.

Everything here is recomputed from checkpoints, so a run killed during this stage
reproduces the same files when re-run.
"""
from __future__ import annotations

import json
import time
from typing import Any, Dict, Optional

import jax
import numpy as np
from absl import logging

from medtransfer_jax import paths
from medtransfer_jax import sharding as shard_lib
from medtransfer_jax.inference import predict
from medtransfer_jax.inference import predictions as pred_lib
from medtransfer_jax.weights import checkpoint as weights_lib

RESULTS_FILE = "results.json"


def evaluate_and_write_predictions(run_eval, splits, workdir: str, step: int,
                                   writer) -> Dict[str, Dict[str, float]]:
    """Metrics of ``run_eval(source)`` (inference.predict.evaluate_source on the run's
    mesh) on val, test and every extra test set; writes
    ``predictions/<split>.csv`` and the combined ``predictions.csv`` (process 0)."""
    is_main = jax.process_index() == 0
    sets = {"val": splits.val, "test": splits.test}
    sets.update(sorted(splits.extra_tests.items()))
    results, rows = {}, []
    for name, src in sets.items():
        mets, arrays = run_eval(src)
        results[name] = mets
        writer.write(step, f"final_{name}", mets)
        if is_main:
            ids, groups = predict.ids_groups(src, arrays["index"])
            pred_lib.write_predictions(paths.join(workdir, "predictions", f"{name}.csv"),
                                       ids, groups, name, arrays["label"], arrays["probs"])
            rows.append((ids, groups, [name] * len(ids), arrays["label"], arrays["probs"]))
            logging.info("best (step %d) on %s: %s", step, name,
                         {k: round(v, 4) for k, v in mets.items() if isinstance(v, float)})
    if is_main and rows:
        pred_lib.write_predictions(
            paths.join(workdir, "predictions.csv"), *[sum((list(r[i]) for r in rows), [])
                                                        for i in range(3)],
            np.concatenate([r[3] for r in rows]), np.concatenate([r[4] for r in rows]))
    return results


def export_weights(path: paths.PathLike, variables,
                   metadata: weights_lib.WeightsMetadata) -> None:
    """Gathers (possibly sharded) variables to host and saves them in the weights format.

    Every process calls this (orbax's save is collective); weights.checkpoint writes the
    ``metadata.json`` from process 0 only.
    """
    host_vars = jax.tree.map(shard_lib.gather_to_host, variables)
    weights_lib.save_weights(path, host_vars, metadata)


def write_json(path: paths.PathLike, obj: Any) -> None:
    """Atomic JSON write (paths.write_text_atomic: a reader never sees half a file, on
    local disks and buckets alike). Callers write shared files from process 0 only."""
    paths.write_text_atomic(path, json.dumps(obj, indent=2, default=str, allow_nan=True))


def json_config(config) -> Dict[str, Any]:
    """The config as plain JSON (what config.json and results.json hold)."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def read_results(workdir: paths.PathLike) -> Optional[Dict[str, Any]]:
    """``results.json`` of a run (local or ``gs://``), or None when there is none or it is
    damaged (not UTF-8, not JSON, not an object, or 'done' without its val and test
    metrics, or with one that is not a number: NaN is one, an AUC of one class): such a
    run is not done, so it is trained again (its checkpoints went when it finished) rather
    than counted with a hole in a sweep's or study's tables."""
    path = paths.join(workdir, RESULTS_FILE)
    try:
        if not paths.exists(path):
            return None
        res = json.loads(paths.read_text(path))
    except (ValueError, OSError):      # ValueError: JSONDecodeError, UnicodeDecodeError
        return None
    if not isinstance(res, dict) or (res.get("status") == "done" and not all(
            _metrics(res.get(k)) for k in ("val", "test"))):
        return None
    return res


def _metrics(split) -> bool:
    """A split's metrics as written: a non-empty {name: number}."""
    return isinstance(split, dict) and bool(split) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in split.values())


def _compile_stats(run) -> Dict[str, Any]:
    """Compilation this session paid (tracing + lowering + backend compile or persistent-
    cache retrieval): a second run of the same shapes should pay a small fraction."""
    if run.compile_timer is None:
        return {}
    seconds, programs, hits = run.compile_timer.elapsed()
    logging.info("compilation this session: %.1f s over %d programs (%d from the persistent "
                 "cache)", seconds, programs, hits)
    return {"compile_s": float(seconds), "compiled_programs": int(programs),
            "compile_cache_hits": int(hits)}


def timing(run, finalize_s: float) -> Dict[str, float]:
    """Seconds per stage of this session (a resumed run counts from its restart):
    ``integrity``, ``model_init`` and ``data`` (decode) of the setup, ``restore``, ``train``
    (the loop less its evaluations and checkpoint saves), ``eval``, ``checkpoint`` (time
    the loop waited on saves, the last one included) and ``finalize`` (best weights, final
    predictions, exports)."""
    sec = dict(run.stages.seconds)
    loop_s = sec.pop("loop", 0.0)
    out = {k: sec.get(k, 0.0) for k in ("integrity", "model_init", "data", "restore")}
    out["train"] = max(0.0, loop_s - sec.get("eval", 0.0) - sec.get("checkpoint", 0.0))
    out["eval"] = sec.get("eval", 0.0)
    out["checkpoint"] = sec.get("checkpoint", 0.0) + sec.get("checkpoint_wait", 0.0)
    out["finalize"] = finalize_s
    return {f"{k}_s": round(v, 4) for k, v in out.items()}


def finalize(run, state, state_sh, step: int, ls) -> Dict[str, Any]:
    """Best model -> predictions and metrics on every test set, exports, ``results.json``.

    ``run``: a run_setup.Run; ``state`` / ``state_sh``: the last TrainState and its
    shardings; ``ls``: the loop_state.LoopState (its best step is restored if it is not
    the last). Returns the results dict.
    """
    t0 = time.perf_counter()
    best_step = step if ls.best.step is None else ls.best.step
    best_state, snap = state, run.best_snapshot
    if best_step != step and snap is not None and snap.step == best_step:
        best_state = snap.state   # kept on the device since that step (save_policy)
    elif best_step != step:
        best_state, _ = run.ckpt.restore(best_step, run.abstract(run.phases[-1])[0], None)
    eval_step = run.eval_step(state_sh)
    by_split = evaluate_and_write_predictions(
        lambda src: run.run_eval(eval_step, best_state.variables, src), run.splits,
        run.workdir, best_step, run.writer)
    s, c = run.splits, run.config
    exports = (("best", best_state, best_step, {k: by_split[k] for k in ("val", "test")}),
               ("last", state, step, {"val": ls.last_val}))
    for sub, st, stp, mets in exports:
        export_weights(paths.join(run.workdir, "export", sub), st.variables,
                       weights_lib.WeightsMetadata(
                           source="finetuned", layout=run.spec.layout, depth=run.spec.depth,
                           width=run.spec.width, num_classes=s.num_classes,
                           head=run.spec.head,
                           preprocessing=run.prep, image_size=c.data.image_size,
                           extra={"init": run.init_desc, "metrics": mets, "step": int(stp),
                                  "dataset": s.name, "class_names": list(s.class_names),
                                  "fold": c.data.fold, "workdir": run.workdir}))
    results = {
        "status": "done", "best_step": int(best_step), "last_step": int(step),
        "stopped_early": bool(ls.stopped_early), "monitor": run.phases[-1].monitor,
        "best_monitor_value": ls.best.value, "reported_auc": c.eval.reported_auc,
        "val": by_split["val"], "test": by_split["test"],
        "extra_tests": {k: v for k, v in by_split.items() if k not in ("val", "test")},
        "init": run.init_desc, "preprocessing": run.prep, "dataset": s.name,
        "class_names": list(s.class_names), "fold": c.data.fold, "num_train": len(s.train),
        "num_val": len(s.val), "num_test": len(s.test), "steps_per_epoch": run.steps_per_epoch,
        "num_devices": int(run.mesh.size), "num_processes": jax.process_count(),
        "wall_time_s": time.time() - run.t_start, **_compile_stats(run),
        "timing": timing(run, time.perf_counter() - t0), "config": json_config(c)}
    if jax.process_index() == 0:
        write_json(paths.join(run.workdir, RESULTS_FILE), results)
    return results
