"""Setting up a run: mesh, data (checked), model, phases, data iterator, checkpointer, and
the state to start from (the newest good checkpoint, else a fresh one).

:class:`Run` bundles what stays fixed during a run plus its services (metric writer,
SIGTERM flag, profiler), so the loop's steps take one argument instead of twenty.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Dict, List, Sequence, Tuple

import jax
from absl import logging
from flax import traverse_util

from medtransfer_jax import data as data_lib, paths, sharding as shard_lib
from medtransfer_jax.errors import WorkdirError
from medtransfer_jax.data import device_cache, integrity
from medtransfer_jax.inference import predict
from medtransfer_jax.training import checkpointing, finalize as finalize_lib, model_init, optim
from medtransfer_jax.training import periodic
from medtransfer_jax.training import phases as phases_lib, program_cache, state as state_lib
from medtransfer_jax.training.loop_state import LoopState


@dataclasses.dataclass
class Run:
    """What ``setup`` builds: the fixed parts of one run and its per-run services."""

    config: Any
    workdir: str
    mesh: Any
    splits: Any
    model: Any
    variables: Dict
    prep: str
    init_desc: str
    spec: Any
    phases: List[phases_lib.Phase]
    steps_per_epoch: int
    eval_bs: int
    state_rng: Any
    train_iter: Any
    ckpt: checkpointing.RunCheckpointer
    hooks: Sequence[Any]
    t_start: float
    writer: Any = None
    stop: Any = None
    profiler: Any = None
    compile_timer: Any = None          # compile_cache.CompileTimer of this process's session
    #: time.monotonic() of the last checkpoint save (or of the start), for every_secs
    last_save: float = 0.0
    #: save_policy.BestSnapshot of the best step since this session started, or None
    best_snapshot: Any = None
    #: periodic.Stages: seconds per stage of this session (results.json 'timing')
    stages: Any = dataclasses.field(default_factory=periodic.Stages)
    #: data.cache=device: {id(split source): batches(global_batch_size) -> iterator}
    eval_data: Dict[int, Any] = dataclasses.field(default_factory=dict)

    def tx(self, phase: phases_lib.Phase):
        return optim.make_optimizer(self.config.train, self.variables["params"], phase.policy,
                                    phase.num_steps, lr=phase.lr)

    def make_shardings(self, abstract):
        s = self.config.sharding
        return shard_lib.state_shardings(self.mesh, abstract, fsdp=s.fsdp,
                                         min_fsdp_size=s.min_fsdp_size)

    def abstract(self, phase: phases_lib.Phase):
        """(abstract sharded TrainState of ``phase``, its shardings) for restoring."""
        tx = self.tx(phase)
        abstract = jax.eval_shape(lambda v, r: state_lib.create_state(v, tx, r), self.variables,
                                  self.state_rng)
        sh = self.make_shardings(abstract)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, sh), sh

    def eval_step(self, state_sh):
        """The jitted eval step for variables sharded like ``state_sh``; one per sharding,
        so the final evaluation reuses the loop's compiled program."""
        sh = {"params": state_sh.params, "batch_stats": state_sh.batch_stats}
        key = ("eval_step", repr(self.model), self.mesh, program_cache.tree_key(sh),
               self.splits.num_classes)
        return program_cache.get(key, lambda: predict.make_eval_step(
            self.model, self.mesh, sh, num_classes=self.splits.num_classes))

    def run_eval(self, eval_step, variables, source):
        """(metrics, arrays) of ``variables`` on every example of ``source``."""
        return predict.evaluate_source(
            eval_step, variables, source, self.mesh, image_size=self.config.data.image_size,
            preprocessing=self.prep, batch_size=self.eval_bs,
            worker_count=self.config.data.worker_count,
            resize_method=self.config.data.resize_method,
            reported_auc=self.config.eval.reported_auc,
            batches=(self.eval_data[id(source)](self.eval_bs) if id(source) in self.eval_data
                     else None))

    def close(self):
        for service in (self.profiler, self.writer):
            if service is not None:
                service.close()
        if self.stop is not None:
            self.stop.uninstall()
        self.ckpt.close()


CONFIG_FILE = "config.json"
#: Config fields a resumed run may change: where files are, how the run is logged,
#: checkpointed and laid out on devices. Any other change would train the rest of the run
#: under other settings than its start (and config.json would hide that), so it is refused.
RESUMABLE_CHANGES = ("log.", "checkpoint.async_save", "checkpoint.max_to_keep",
                     "checkpoint.keep_when_done",
                     "checkpoint.every_secs", "checkpoint.every_steps", "sharding.",
                     "eval.batch_size", "data.worker_count", "data.cache_placement",
                     "data.root", "data.csv_path", "data.fold_csv_dir", "data.fold_csv_origin",
                     "data.fold_csv_test", "data.tfds_data_dir")


def config_changes(stored: Dict[str, Any], config) -> List[str]:
    """``'field: old -> new'`` for every field of ``config`` that differs from the
    ``stored`` JSON config of the run in a way a resume must not accept (fields the stored
    config lacks, e.g. added by a newer version, are not changes)."""
    old = traverse_util.flatten_dict(stored, sep=".")
    new = traverse_util.flatten_dict(finalize_lib.json_config(config), sep=".")
    changes = []
    for key in sorted(old.keys() & new.keys()):
        if old[key] == new[key] or key.startswith(RESUMABLE_CHANGES):
            continue
        if key == "model.init" and "random" not in (old[key], new[key]):
            continue  # the same weights at another path: only read at the start
        changes.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return changes


def check_same_config(stored: Dict[str, Any], config, workdir: str, what: str) -> None:
    """Raises WorkdirError naming the changed fields when ``config`` is not the config
    ``workdir``'s run was started with (``what``: 'holds a finished run' / 'holds ...')."""
    changes = config_changes(stored, config)
    if changes:
        raise WorkdirError(
            f"--workdir={workdir} {what} started with another config ({'; '.join(changes)}); "
            "rerun it with its original settings (its config.json) or use a fresh --workdir")


def read_stored_config(path: paths.PathLike, workdir: str, latest: int) -> Dict[str, Any]:
    """The JSON config a resumed run started with. A damaged file is refused, not
    overwritten: it is the only record of the settings the checkpoints were trained
    under, so resuming over it could mix two configs in one run unnoticed."""
    try:
        stored = json.loads(paths.read_text(path))
    except (ValueError, OSError) as e:   # JSONDecodeError, UnicodeDecodeError, unreadable
        why = f"{type(e).__name__}: {e}"
    else:
        if isinstance(stored, dict):
            return stored
        why = f"a JSON {type(stored).__name__}, not an object"
    raise WorkdirError(
        f"{paths.to_str(path)} is damaged ({why}), so the checkpoint (step {latest}) in "
        f"--workdir={workdir} cannot be checked against this config; restore that file "
        "to resume, or move the workdir away (or use a fresh --workdir) to start over")


def setup(config, workdir: str, hooks: Sequence[Any] = ()) -> Run:
    """Mesh, data (every file checked on a fresh start), model, phases, data iterator and
    checkpointer of a run; writes ``config.json``."""
    t_start, stages = time.time(), periodic.Stages()
    mesh = shard_lib.make_mesh(config.sharding.num_devices or None)
    gbs = int(config.train.batch_size)
    shard_lib.local_batch_size(gbs, mesh)  # validates divisibility
    eval_bs = int(math.ceil((config.eval.batch_size or gbs) / mesh.size) * mesh.size)
    splits = data_lib.get_splits(config.data)
    ckpt = checkpointing.RunCheckpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                         async_save=config.checkpoint.async_save)
    try:
        stored, latest = paths.join(workdir, CONFIG_FILE), ckpt.latest_step()
        if latest is not None and paths.exists(stored):
            check_same_config(read_stored_config(stored, workdir, latest), config, workdir,
                              f"holds a checkpoint (step {latest}) of a run")
        if latest is None and not config.data.skip_corrupt:
            with stages("integrity"):   # before any compilation; a resumed run passed it
                integrity.check_splits(splits)
        init_rng, state_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))
        with stages("model_init"):
            model, variables, prep, init_desc, spec = model_init.build_model_and_variables(
                config, splits.num_classes, init_rng)
        steps_per_epoch = phases_lib.steps_per_epoch(len(splits.train), gbs,
                                                     config.train.get("epoch_steps", "floor"))
        phases = phases_lib.make_phases(config, steps_per_epoch)
        with stages("data"):
            splits, train_iter, eval_data = _data_path(config, splits, mesh, prep, gbs)
        if jax.process_index() == 0:
            finalize_lib.write_json(paths.join(workdir, CONFIG_FILE),
                                    finalize_lib.json_config(config))
            # Logged once the run is set up, so a start-up error is not buried under it.
            logging.info("config (also in %s):\n%s", paths.join(workdir, CONFIG_FILE), config)
            logging.info("data:\n%s", splits.summary())
            logging.info("model ResNet%d/%s width %d, init %s, preprocessing %s; mesh %s; %d "
                         "steps/epoch; phases %s", spec.depth, spec.layout, spec.width, init_desc,
                         prep, dict(mesh.shape), steps_per_epoch,
                         [(p.policy, p.num_steps) for p in phases])
        return Run(config, workdir, mesh, splits, model, variables, prep, init_desc, spec,
                   phases, steps_per_epoch, eval_bs, state_rng, train_iter, ckpt, tuple(hooks),
                   t_start, eval_data=eval_data, stages=stages)
    except BaseException:
        ckpt.close()  # e.g. a DataError from the file check: no thread left behind
        raise


def _data_path(config, splits, mesh, prep: str, gbs: int):
    """(splits, train iterator, device eval batches) for ``data.cache``: 'none' / 'host'
    feed the grain pipeline (from the files / from images decoded once), 'device' the
    device-resident path (data/device_cache.py)."""
    d = config.data
    if d.cache not in device_cache.CACHE_MODES:
        raise data_lib.DataError(f"data.cache={d.cache!r} is not one of "
                                 f"{device_cache.CACHE_MODES}")
    t0 = time.time()
    if d.cache == "device":
        train_iter, eval_data = device_cache.build(d, splits, mesh, prep, gbs, int(config.seed))
        logging.info("data.cache=device: splits decoded onto the mesh in %.1f s",
                     time.time() - t0)
        return splits, train_iter, eval_data
    if d.cache == "host":
        cached = {}
        def host(src):
            if id(src) not in cached:
                cached[id(src)] = device_cache.HostCachedSource(src, d.image_size,
                                                                d.resize_method)
            return cached[id(src)]
        splits = dataclasses.replace(
            splits, train=host(splits.train), val=host(splits.val), test=host(splits.test),
            extra_tests={k: host(v) for k, v in splits.extra_tests.items()})
        logging.info("data.cache=host: splits decoded in %.1f s", time.time() - t0)
    train_iter = data_lib.make_train_iter(
        splits.train, image_size=d.image_size, preprocessing=prep, global_batch_size=gbs,
        seed=int(config.seed), augment=d.augment, worker_count=d.worker_count,
        resize_method=d.resize_method)
    return splits, train_iter, {}


def restore_or_init(run: Run) -> Tuple[Any, Any, int, LoopState]:
    """(state, shardings, step, loop state): the newest good checkpoint, else fresh."""
    def abstract_for(step, meta):
        where = f"{run.ckpt.directory}/{step}"
        try:
            ls = LoopState.from_json(meta, where)
        except ValueError as e:
            raise checkpointing.CheckpointError(f"{e}; use a fresh --workdir") from None
        if not 0 <= ls.phase < len(run.phases):
            raise checkpointing.CheckpointError(
                f"{where}: phase {ls.phase} does not exist in this config's schedule "
                f"({len(run.phases)} phase(s), train.freeze={run.config.train.freeze!r}); use "
                "the original config or a fresh --workdir.")
        return run.abstract(run.phases[ls.phase])[0]

    restored = run.ckpt.restore_latest(abstract_for, run.train_iter)
    if restored is None:
        state, sh = state_lib.create_sharded_state(run.variables, run.tx(run.phases[0]),
                                                   run.state_rng, run.make_shardings)
        return state, sh, 0, LoopState()
    step, state, meta = restored
    ls = LoopState.from_json(meta, str(step))
    if int(jax.device_get(state.step)) != step:
        raise checkpointing.CheckpointError(
            f"{run.ckpt.directory}/{step}: state.step={int(jax.device_get(state.step))} does "
            "not match the checkpoint step; the checkpoint is corrupt.")
    logging.info("resumed from %s/%d (phase %d)", run.ckpt.directory, step, ls.phase)
    return state, run.abstract(run.phases[ls.phase])[1], step, ls


