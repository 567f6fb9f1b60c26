"""Run checkpoints (resume/preemption) with orbax: state + data iterator + loop metadata.

Each step directory ``WORKDIR/checkpoints/<step>/`` holds three items:

* ``state`` -- the TrainState pytree (params, batch_stats, opt_state, step, rng),
  ``StandardSave`` (sharded arrays; every host writes its shards);
* ``data_iter`` -- the grain iterator position (grain's orbax handler, one JSON per
  process), so a resumed run sees exactly the batches the uninterrupted run would;
* ``meta`` -- JSON of the loop state (loop_state.LoopState: phase, early stopping, best).

Retention: the latest ``max_to_keep`` checkpoints plus the step the caller protects (the
best). The protected step is handed to every :meth:`RunCheckpointer.save` from the loop
state that is saved with it, so it survives any number of restarts: orbax's own
``BestN`` policy cannot do that here, as it only sees metrics written in the same process
(a reopened manager saw none and deleted the best checkpoint).

When done: a finished run's outputs are ``results.json``, its predictions and
``export/{best,last}``; its checkpoints only serve a resume, and a ResNet50's three
(params + Adam moments) are ~0.9 GB. :func:`remove_when_done` deletes them once the run
is done (``checkpoint.keep_when_done=False``, the default), so the 175 runs of the
Revisiting grid need ~34 GB of disk instead of ~166 GB.

Failures: a damaged checkpoint (unreadable meta or arrays) raises :class:`DamagedCheckpoint`;
:meth:`RunCheckpointer.restore_latest` then moves it to ``checkpoints.damaged/`` with a
warning and falls back to the previous one. A save that fails with an ``OSError`` (disk
full, read-only directory) removes its half-written ``*.orbax-checkpoint-tmp*`` folder and
raises a one-line :class:`CheckpointError`.
"""
from __future__ import annotations

import copy
import dataclasses
import errno
import os
import re
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence, Set, Tuple

import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from medtransfer_jax import paths
from medtransfer_jax.weights.checkpoint import CheckpointError

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints.damaged"
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class DamagedCheckpoint(CheckpointError):
    """One step directory cannot be read (as opposed to one that does not fit the config)."""

    def __init__(self, step_dir: str, message: str):
        super().__init__(message)
        self.step_dir = step_dir


@dataclasses.dataclass
class _LatestAndProtected:
    """orbax preservation policy: the latest ``n`` checkpoints plus the steps in ``protected``
    (a set the RunCheckpointer updates before each save; orbax evaluates it at save time)."""

    n: int
    protected: Set[int]

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        latest = {c.step for c in sorted(checkpoints, key=lambda c: c.step)[-self.n:]}
        return [c.step in latest or c.step in self.protected for c in checkpoints]


class RunCheckpointer:
    """Thin wrapper around ``ocp.CheckpointManager`` for one training run.

    Args:
      workdir: the run directory; checkpoints go to ``workdir/checkpoints``.
      max_to_keep: how many of the latest checkpoints to keep (the protected one is kept too).
      async_save: orbax async checkpointing (arrays are copied to host before
        ``save`` returns, so donating the state afterwards is safe).
    """

    def __init__(self, workdir: str, *, max_to_keep: int = 2, async_save: bool = True):
        # Strings throughout (messages, the quarantine folder); a gs:// URL stays a URL
        # and orbax gets it as an epath.Path, writing to the bucket directly.
        self.workdir = paths.to_str(paths.workdir(workdir))
        self.directory = paths.to_str(paths.join(self.workdir, CHECKPOINT_DIR))
        self._policy = _LatestAndProtected(max(1, int(max_to_keep)), set())
        options = ocp.CheckpointManagerOptions(
            preservation_policy=self._policy, enable_async_checkpointing=async_save,
            create=True, cleanup_tmp_directories=True)
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(),
                    "data_iter": grain_ckpt.CheckpointHandler()}
        try:
            self.manager = ocp.CheckpointManager(paths.as_path(self.directory), options=options,
                                                 item_handlers=handlers)
        except OSError as e:
            raise CheckpointError(f"cannot create the checkpoint directory {self.directory} "
                                  f"({e.strerror or e}); use a writable --workdir") from e
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
             protect: Optional[int] = None) -> bool:
        """Saves ``state`` / ``data_iter`` position / ``meta`` as checkpoint ``step``.

        ``protect``: a step kept besides the latest ones (the best so far); it replaces
        the previously protected step. Raises CheckpointError on a failed write.
        """
        self._policy.protected.clear()
        if protect is not None:
            self._policy.protected.add(int(protect))
        items = {"state": ocp.args.StandardSave(state),
                 "meta": ocp.args.JsonSave(copy.deepcopy(meta))}
        if data_iter is not None:
            items["data_iter"] = grain_ckpt.CheckpointSave(data_iter)
        with self._write_errors(step):
            return self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def wait(self):
        """Blocks until the pending async save is on disk (raises its error, if any)."""
        with self._write_errors(None):
            self.manager.wait_until_finished()
            self.manager.check_for_errors()

    def close(self):
        """Waits for pending saves and releases the manager (idempotent)."""
        if self.manager is None:
            return
        manager, self.manager = self.manager, None
        with self._write_errors(None):
            manager.wait_until_finished()
            manager.close()

    def _write_errors(self, step: Optional[int]):
        return _WriteErrors(self, step)

    def remove_tmp_dirs(self) -> list:
        """Deletes half-written ``<step>.orbax-checkpoint-tmp*`` folders; returns them."""
        root = paths.as_path(self.directory)
        found = sorted(paths.to_str(p) for p in root.glob(f"*{TMP_SUFFIX}*")) if \
            paths.isdir(root) else []
        if jax.process_index() == 0:
            for path in found:
                try:
                    paths.as_path(path).rmtree()
                except OSError:
                    pass
        return found

    # ------------------------------------------------------------------ restore
    def _step_dir(self, step: int) -> str:
        return paths.to_str(paths.join(self.directory, str(step)))

    def restore_meta(self, step: Optional[int] = None) -> Optional[Tuple[int, Dict[str, Any]]]:
        """(step, meta) of the latest (or given) checkpoint; None when there is none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(out["meta"])
        except Exception as e:
            raise DamagedCheckpoint(self._step_dir(step), (
                f"Checkpoint {self._step_dir(step)} is damaged: cannot read its 'meta' item "
                f"({type(e).__name__}: {e})")) from e
        return step, meta

    def restore_latest(self, abstract_for: Callable[[int, Dict[str, Any]], Any],
                       data_iter: Any) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
        """Restores the newest readable checkpoint: (step, state, meta), or None if none.

        ``abstract_for(step, meta)`` gives the abstract state to restore into (it may raise
        CheckpointError when the checkpoint does not fit the config: that stays fatal). A
        damaged checkpoint is moved to ``checkpoints.damaged/`` with a warning naming it
        and the previous one is tried; if every checkpoint is damaged, CheckpointError.
        """
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                _, meta = self.restore_meta(step)
                state, meta = self.restore(step, abstract_for(step, meta), data_iter)
            except DamagedCheckpoint as e:
                damaged.append(self._quarantine(step, e))
                continue
            if damaged:
                logging.warning("resuming from the previous good checkpoint %s",
                                self._step_dir(step))
            return step, state, meta
        if damaged:
            raise CheckpointError(
                f"every checkpoint in {self.directory} is damaged (moved to {damaged}); "
                "move the workdir away to start over")
        return None

    def _quarantine(self, step: int, error: DamagedCheckpoint) -> str:
        """Moves a damaged step directory out of orbax's sight (so the step can be saved
        again) and logs why; returns its new path."""
        dst = paths.join(self.workdir, DAMAGED_DIR, f"{step}-{int(time.time())}")
        logging.warning("%s; skipping it (moved to %s)", error, dst)
        if jax.process_index() == 0:
            paths.makedirs(dst.parent)
            if paths.is_remote(dst):  # a bucket has no empty folders, and epath's rename
                # wants the destination folder to exist: an object makes the prefix exist
                paths.write_text_atomic(dst.parent / "README.txt", "damaged checkpoints "
                                        "moved aside by medtransfer_jax; safe to delete\n")
            paths.as_path(self._step_dir(step)).rename(dst)  # recursive copy+delete on GCS
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self.manager.reload()
        return paths.to_str(dst)

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointError naming the first leaf whose shape/dtype/presence differs."""
        try:
            md = self.manager.item_metadata(step)["state"]
        except Exception as e:
            raise DamagedCheckpoint(self._step_dir(step), (
                f"Checkpoint {self._step_dir(step)} is damaged: cannot read the metadata of "
                f"its 'state' item ({type(e).__name__}: {e})")) from e
        if md is None:
            raise DamagedCheckpoint(self._step_dir(step), (
                f"Checkpoint {self._step_dir(step)} has no 'state' item; it was not written "
                "by medtransfer_jax.train"))
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
        self.check_compatible(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state),
                 "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data_iter"] = grain_ckpt.CheckpointRestore(data_iter)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except CheckpointError:
            raise
        except Exception as e:
            raise DamagedCheckpoint(self._step_dir(step), (
                f"Checkpoint {self._step_dir(step)} cannot be restored ({type(e).__name__}: "
                f"{e}); it is damaged or was written by an incompatible version")) from e
        return out["state"], dict(out["meta"])


def remove_when_done(workdir: str) -> int:
    """Deletes the ``checkpoints/`` folder of a finished run in ``workdir`` (process 0,
    once every process got here); returns the bytes it held (0 when there was none, or
    when it could not be deleted: a warning then names it)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("remove checkpoints of a finished run")
    folder = paths.join(workdir, CHECKPOINT_DIR)
    if jax.process_index() != 0 or not paths.isdir(folder):
        return 0
    try:
        held = sum(paths.getsize(paths.join(d, f)) for d, _, files in paths.walk(folder)
                   for f in files)
        paths.as_path(folder).rmtree()
    except OSError as e:  # the run is done and its outputs are written: say it, go on
        logging.warning("could not remove the finished run's checkpoints %s (%s); delete "
                        "the folder by hand to free the space", paths.to_str(folder), e)
        return 0
    return held


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


class _WriteErrors:
    """Turns an OSError of a checkpoint write (disk full, read-only, quota) into one
    CheckpointError naming the directory and the fix, after deleting the half-written
    ``*.orbax-checkpoint-tmp*`` folders so a re-run starts from the last complete save."""

    def __init__(self, ckpt: RunCheckpointer, step: Optional[int]):
        self.ckpt, self.step = ckpt, step

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        err = _os_error(exc)
        if err is None:
            return False
        _join_orbax_threads(timeout=60.0)  # the other items' writers may still be running
        self.ckpt.remove_tmp_dirs()
        where = (self.ckpt._step_dir(self.step) if self.step is not None
                 else self.ckpt.directory)
        hint = ("free disk space" if err.errno in (errno.ENOSPC, errno.EDQUOT)
                else "make it writable")
        raise CheckpointError(
            f"cannot write checkpoint {where}: {err.strerror or err} (errno "
            f"{errno.errorcode.get(err.errno, err.errno)}); {hint}, then re-run the same "
            "command to resume from the last complete checkpoint") from exc


def _join_orbax_threads(timeout: float) -> None:
    """Waits for orbax's background commit threads, so none of them writes into a tmp
    folder after it was removed."""
    deadline = time.time() + timeout
    for t in threading.enumerate():
        if t is not threading.current_thread() and type(t).__module__.startswith("orbax."):
            t.join(max(0.0, deadline - time.time()))


def _os_error(exc: Optional[BaseException]) -> Optional[OSError]:
    """The OS error in ``exc``'s cause chain: an OSError, or tensorstore's ValueError
    ("RESOURCE_EXHAUSTED: ... [os_error_code='28']") that orbax raises for array writes."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        code = re.search(r"os_error_code='?(\d+)", str(exc))
        if code:
            num = int(code.group(1))
            return OSError(num, os.strerror(num))
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
