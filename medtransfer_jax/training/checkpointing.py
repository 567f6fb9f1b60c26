"""Run checkpoints (resume/preemption) with orbax: state + data iterator + loop metadata.

Each step directory ``WORKDIR/checkpoints/<step>/`` holds three items:

* ``state`` -- the TrainState pytree (params, batch_stats, opt_state, step, rng),
  ``StandardSave`` (sharded arrays; every host writes its shards);
* ``data_iter`` -- the grain iterator position (grain's orbax handler, one JSON per
  process), so a resumed run sees exactly the batches the uninterrupted run would;
* ``meta`` -- JSON of the loop: phase, early-stopping counters, best metric/step.

Retention: the latest ``max_to_keep`` checkpoints plus the best one. A checkpoint
gets orbax ``metrics`` only when it is a new best (``best_rank`` counts improvements),
so ``BestN(n=1)`` keeps exactly the checkpoint the loop calls best, even with
``min_delta`` or ties.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Optional, Tuple

import jax
from medtransfer_jax.weights.checkpoint import CheckpointError

CHECKPOINT_DIR = "checkpoints"


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


def _grain_args():
    import grain.checkpoint as gc
    return gc.CheckpointSave, gc.CheckpointRestore


class RunCheckpointer:
    """Thin wrapper around ``ocp.CheckpointManager`` for one training run.

    Args:
      workdir: the run directory; checkpoints go to ``workdir/checkpoints``.
      max_to_keep: how many of the latest checkpoints to keep (the best is kept too).
      async_save: orbax async checkpointing (arrays are copied to host before
        ``save`` returns, so donating the state afterwards is safe).
    """

    def __init__(self, workdir: str, *, max_to_keep: int = 2, async_save: bool = True):
        ocp = _ocp()
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=max(1, int(max_to_keep))),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["best_rank"], n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        import grain.checkpoint as gc
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(),
                    "data_iter": gc.CheckpointHandler()}
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options,
                                                 item_handlers=handlers)
        except Exception as e:  # unreadable root metadata etc.
            raise CheckpointError(
                f"Cannot open the checkpoint directory {self.directory}: {type(e).__name__}: "
                f"{e}. Delete it (and start over) or point --workdir elsewhere.") from e

    # ------------------------------------------------------------------ queries
    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True at a Cloud TPU preemption sync point (always False without the service)."""
        return bool(self.manager.reached_preemption(step))

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Any, data_iter: Any, meta: Dict[str, Any],
             best_rank: Optional[int] = None) -> bool:
        """Saves ``state`` / ``data_iter`` position / ``meta`` as checkpoint ``step``.

        ``best_rank`` marks the checkpoint as the best so far (see module docstring).
        """
        ocp = _ocp()
        save_grain, _ = _grain_args()
        items = {"state": ocp.args.StandardSave(state),
                 "meta": ocp.args.JsonSave(copy.deepcopy(meta))}
        if data_iter is not None:
            items["data_iter"] = save_grain(data_iter)
        metrics = {"best_rank": int(best_rank)} if best_rank is not None else None
        return self.manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics,
                                 force=True)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        """Waits for pending saves and releases the manager (idempotent)."""
        if self.manager is None:
            return
        self.manager.wait_until_finished()
        self.manager.close()
        self.manager = None

    # ------------------------------------------------------------------ restore
    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def restore_meta(self, step: Optional[int] = None) -> Optional[Tuple[int, Dict[str, Any]]]:
        """(step, meta) of the latest (or given) checkpoint; None when there is none."""
        ocp = _ocp()
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(out["meta"])
        except Exception as e:
            raise CheckpointError(
                f"Checkpoint {self._step_dir(step)} is damaged: cannot read its 'meta' item "
                f"({type(e).__name__}: {e}). Delete that step directory to resume from an "
                "earlier checkpoint, or use a fresh --workdir.") from e
        return step, meta

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointError naming the first leaf whose shape/dtype/presence differs."""
        try:
            md = self.manager.item_metadata(step)["state"]
        except Exception as e:
            raise CheckpointError(
                f"Checkpoint {self._step_dir(step)} is damaged: cannot read the metadata of "
                f"its 'state' item ({type(e).__name__}: {e}). Delete that step directory to "
                "resume from an earlier checkpoint, or use a fresh --workdir.") from e
        if md is None:
            raise CheckpointError(f"Checkpoint {self._step_dir(step)} has no 'state' item; it "
                                  "was not written by medtransfer_jax.train.")
        tree = getattr(md, "tree", md)
        saved = _flat_by_path(tree)
        expected = _flat_by_path(abstract_state)
        for path, exp in expected.items():
            if path not in saved:
                raise CheckpointError(
                    f"Checkpoint {self._step_dir(step)} is incompatible with the config: leaf "
                    f"'{path}' is missing (saved leaves e.g. {sorted(saved)[:3]}). The model, "
                    "freeze policy or optimizer changed since it was written; use a fresh "
                    "--workdir or restore the original config.")
            s_shape = tuple(getattr(saved[path], "shape", ()) or ())
            e_shape = tuple(exp.shape)
            if s_shape != e_shape:
                raise CheckpointError(
                    f"Checkpoint {self._step_dir(step)} is incompatible with the config: leaf "
                    f"'{path}' has shape {s_shape} but the config builds {e_shape}. Use a "
                    "fresh --workdir or restore the original config (model depth/width, "
                    "num_classes, optimizer).")
        extra = sorted(set(saved) - set(expected))
        if extra:
            raise CheckpointError(
                f"Checkpoint {self._step_dir(step)} is incompatible with the config: it has "
                f"leaf '{extra[0]}' which the config does not build. Use a fresh --workdir "
                "or restore the original config.")

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Tuple[Any, Dict]:
        """Restores (state, meta) at ``step`` into ``abstract_state`` (ShapeDtypeStructs
        with shardings) and moves ``data_iter`` to the saved position (in place)."""
        ocp = _ocp()
        _, restore_grain = _grain_args()
        self.check_compatible(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state),
                 "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data_iter"] = restore_grain(data_iter)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"Checkpoint {self._step_dir(step)} cannot be restored ({type(e).__name__}: "
                f"{e}). It is damaged or was written by an incompatible version; delete that "
                "step directory to resume from an earlier checkpoint, or use a fresh "
                "--workdir.") from e
        state = out["state"]
        return state, dict(out["meta"])


def _flat_by_path(tree) -> Dict[str, Any]:
    """{'.params.conv1_conv.kernel'-style path: leaf} with dataclass/tuple/dict keys unified."""
    leaves = jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))
    out = {}
    for path, leaf in leaves:
        parts = []
        for k in path:
            for attr in ("key", "name", "idx"):
                if hasattr(k, attr):
                    parts.append(str(getattr(k, attr)))
                    break
            else:
                parts.append(str(k))
        out["/".join(parts)] = leaf
    return out
