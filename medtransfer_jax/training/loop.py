"""``train_and_evaluate(config, workdir)``: one fine-tuning run, resumable at any point.

The run reads as ``setup -> run_phase (per phase) -> finalize``: data of one fold and the
model (random init or converted weights) -> one or two phases of jitted, sharded training
(the studies' two-phase schedule trains the head with a frozen, inference-mode base first)
with periodic logging, validation / early stopping and checkpoints -> export of the best
and last weights, predictions and metrics of the best model on every test set.

Resume: the checkpoint holds the TrainState, the grain iterator position and the
loop_state.LoopState, so re-running with the same ``workdir`` continues from the last
good save (a damaged one is skipped) and reproduces the uninterrupted run bit for bit.
The best checkpoint is protected explicitly and survives any number of restarts. A run
whose ``results.json`` says ``done`` is not repeated; one that says ``diverged`` is not
retried.

Files in ``workdir``: ``config.json``, ``checkpoints/``, ``metrics.jsonl``, ``tb/``,
``profile/`` (with ``log.profile_steps``), ``export/{best,last}/``, ``predictions.csv``
(+ ``predictions/<split>.csv``), ``results.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Dict, List, Sequence, Tuple

import jax
import numpy as np
from absl import logging

from medtransfer_jax import data as data_lib
from medtransfer_jax.data import integrity
from medtransfer_jax.training import checkpointing, finalize as finalize_lib, model_init, optim
from medtransfer_jax.training import periodic
from medtransfer_jax.training import phases as phases_lib
from medtransfer_jax.training import sharding as shard_lib
from medtransfer_jax.training import state as state_lib
from medtransfer_jax.training import step as step_lib
from medtransfer_jax.training.loop_state import LoopState
from medtransfer_jax.weights import checkpoint as weights_lib

# Public names other modules import from here.
RESULTS_FILE = finalize_lib.RESULTS_FILE
METRICS_FILE = periodic.METRICS_FILE
Phase, make_phases = phases_lib.Phase, phases_lib.make_phases
build_model_and_variables = model_init.build_model_and_variables
evaluate_source, read_results = finalize_lib.evaluate_source, finalize_lib.read_results
_ids_groups = finalize_lib.ids_groups


class Preempted(RuntimeError):
    """Training stopped early on SIGTERM / a preemption notice after saving a checkpoint;
    re-running with the same workdir resumes from it (``train`` exits 143)."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"training interrupted at step {step} ({reason}); checkpoint saved, "
                         "re-run with the same --workdir to resume")
        self.step, self.reason = step, reason


class Diverged(RuntimeError):
    """The train loss became non-finite or exploded; ``results.json`` says ``diverged``
    (so sweeps and studies mark the run failed) and ``train`` exits 1."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclasses.dataclass
class _Run:
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
    phases: List[Phase]
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

    def tx(self, phase: Phase):
        return optim.make_optimizer(self.config.train, self.variables["params"], phase.policy,
                                    phase.num_steps, lr=phase.lr)

    def make_shardings(self, abstract):
        s = self.config.sharding
        return shard_lib.state_shardings(self.mesh, abstract, fsdp=s.fsdp,
                                         min_fsdp_size=s.min_fsdp_size)

    def abstract(self, phase: Phase):
        """(abstract sharded TrainState of ``phase``, its shardings) for restoring."""
        tx = self.tx(phase)
        abstract = jax.eval_shape(lambda v, r: state_lib.create_state(v, tx, r), self.variables,
                                  self.state_rng)
        sh = self.make_shardings(abstract)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, sh), sh

    def eval_step(self, state_sh):
        return step_lib.make_eval_step(self.model, self.mesh, {"params": state_sh.params,
                                                               "batch_stats": state_sh.batch_stats},
                                       num_classes=self.splits.num_classes)

    def run_eval(self, eval_step, variables, source):
        return evaluate_source(eval_step, variables, source, self.mesh,
                               image_size=self.config.data.image_size, preprocessing=self.prep,
                               batch_size=self.eval_bs, worker_count=self.config.data.worker_count)

    def close(self):
        for service in (self.profiler, self.writer):
            if service is not None:
                service.close()
        if self.stop is not None:
            self.stop.uninstall()
        self.ckpt.close()


# --------------------------------------------------------------------------- setup
def setup(config, workdir: str, hooks: Sequence[Any] = ()) -> _Run:
    """Mesh, data (every file checked on a fresh start), model, phases, data iterator and
    checkpointer of a run; writes ``config.json``."""
    mesh = shard_lib.make_mesh(config.sharding.num_devices or None)
    gbs = int(config.train.batch_size)
    shard_lib.local_batch_size(gbs, mesh)  # validates divisibility
    eval_bs = int(math.ceil((config.eval.batch_size or gbs) / mesh.size) * mesh.size)
    splits = data_lib.get_splits(config.data, fold=config.fold)
    ckpt = checkpointing.RunCheckpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                         async_save=config.checkpoint.async_save)
    if ckpt.latest_step() is None and not config.data.skip_corrupt:
        integrity.check_splits(splits)  # before any compilation; a resumed run passed it
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))
    model, variables, prep, init_desc, spec = build_model_and_variables(
        config, splits.num_classes, init_rng)
    steps_per_epoch = max(1, len(splits.train) // gbs)
    phases = make_phases(config, steps_per_epoch)
    train_iter = data_lib.make_train_iter(
        splits.train, image_size=config.data.image_size, preprocessing=prep,
        global_batch_size=gbs, seed=int(config.seed), augment=config.data.augment,
        worker_count=config.data.worker_count)
    if jax.process_index() == 0:
        finalize_lib.write_json(os.path.join(workdir, "config.json"), _json_config(config))
        logging.info("data:\n%s", splits.summary())
        logging.info("model ResNet%d/%s width %d, init %s, preprocessing %s; mesh %s; %d "
                     "steps/epoch; phases %s", spec.depth, spec.layout, spec.width, init_desc,
                     prep, dict(mesh.shape), steps_per_epoch,
                     [(p.policy, p.num_steps) for p in phases])
    return _Run(config, workdir, mesh, splits, model, variables, prep, init_desc, spec, phases,
                steps_per_epoch, eval_bs, state_rng, train_iter, ckpt, tuple(hooks), time.time())


def _json_config(config) -> Dict[str, Any]:
    return json.loads(json.dumps(config.to_dict(), default=str))


def _restore_or_init(run: _Run) -> Tuple[Any, Any, int, LoopState]:
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


# --------------------------------------------------------------------------- phases
def run_phase(run: _Run, phase: Phase, state, state_sh, step: int, ls: LoopState):
    """Trains ``phase`` from ``step`` until its budget, early stopping or a signal; returns
    (state, step). Periodic actions: log, evaluate, checkpoint (config log / eval /
    checkpoint .every_steps)."""
    c = run.config
    train_step = step_lib.make_train_step(
        run.model, run.tx(phase), run.mesh, state_sh, num_classes=run.splits.num_classes,
        batch_norm_train=phase.batch_norm_train, label_smoothing=c.train.label_smoothing,
        frozen_layers=(optim.frozen_mask(state.params, phase.policy)
                       if phase.policy != "none" else None))
    eval_step = run.eval_step(state_sh)
    end = ls.phase_start + phase.num_steps
    eval_every = c.eval.every_steps or run.steps_per_epoch
    pending, ls.pending_train = list(ls.pending_train), []
    meter = periodic.Throughput(c.train.batch_size)
    while step < end and not ls.phase_done:
        batch = {k: v for k, v in next(run.train_iter).items() if k in ("image", "label", "weight")}
        state, m = train_step(state, shard_lib.make_global_batch(run.mesh, batch))
        step += 1
        pending.append(m)
        meter.tick(m)
        run.profiler.after_step(step, state)
        periodic.call_hooks(run.hooks, "after_step", step, state)
        if periodic.every(step, c.log.every_steps) or step == end:
            _log_train(run, phase, step, pending, meter, ls)
            pending = []
        is_eval = periodic.every(step - ls.phase_start, eval_every) or step == end
        if is_eval:
            _evaluate(run, phase, eval_step, state, step, ls)
        pending = _maybe_save(run, state, step, ls, pending, force=is_eval)
    return state, step


def _log_train(run: _Run, phase: Phase, step: int, pending, meter, ls: LoopState) -> None:
    """Writes the interval's mean train metrics; raises Diverged on a bad loss."""
    vals = jax.device_get(pending)
    # float64 mean: restored entries are Python floats, fresh ones float32.
    mean = {k: float(np.mean(np.asarray([v[k] for v in vals], np.float64))) for k in vals[0]}
    lr = float(optim.make_schedule(phase.lr, phase.num_steps, run.config.train.schedule,
                                   run.config.train.warmup_steps,
                                   run.config.train.end_lr_factor)(step - ls.phase_start))
    total = sum(p.num_steps for p in run.phases[phase.index:]) + ls.phase_start
    speed = meter.report(total - step)
    mean.update(lr=lr, img_per_s=speed["img_per_s"], phase=phase.index,
                epoch=step / run.steps_per_epoch)
    run.writer.write(step, "train", mean)
    logging.info("step %d/%d | phase %d | epoch %.2f | loss %.4f | acc %.3f | lr %.2e | "
                 "%.1f img/s | ETA %s", step, total, phase.index, mean["epoch"], mean["loss"],
                 mean["accuracy"], lr, speed["img_per_s"], periodic.fmt_time(speed["eta_s"]))
    limit = run.config.train.max_loss_factor * math.log(max(2, run.splits.num_classes))
    if not math.isfinite(mean["loss"]) or (limit > 0 and mean["loss"] > limit):
        _diverged(run, step, mean["loss"], lr, limit)


def _diverged(run: _Run, step: int, loss: float, lr: float, limit: float):
    what = "is not finite" if not math.isfinite(loss) else f"exceeds {limit:.3g}"
    msg = (f"training diverged at step {step}: mean train loss {loss:.4g} {what} (lr "
           f"{lr:.3g}); try a 3-10x lower --config.train.lr, warmup (train.warmup_steps) or "
           "gradient clipping (train.grad_clip_norm), in a fresh --workdir")
    if jax.process_index() == 0:
        finalize_lib.write_json(os.path.join(run.workdir, RESULTS_FILE), {
            "status": "diverged", "message": msg, "step": step, "loss": loss, "lr": lr,
            "config": _json_config(run.config)})
    raise Diverged(msg, step)


def _evaluate(run: _Run, phase: Phase, eval_step, state, step: int, ls: LoopState) -> None:
    """Validation, early-stopping counters and the best step (loop_state.record_eval)."""
    val, _ = run.run_eval(eval_step, state.variables, run.splits.val)
    run.writer.write(step, "val", dict(val, phase=phase.index))
    if phase.monitor not in val:
        raise ValueError(f"monitor metric {phase.monitor!r} is not one of {sorted(val)} "
                         "(config eval.monitor / train.head_phase.monitor)")
    ls.record_eval(step, val, phase.monitor, phase.mode, phase.min_delta, phase.is_final)
    es = ls.es
    logging.info("step %d | val %s | loss %.4f acc %.3f auc %.4f | best %s %s @ %s (wait %d/%s)",
                 step, phase.monitor, val["loss"], val["accuracy"], val["auc"], phase.monitor,
                 es.best, es.best_step, es.wait, phase.patience or "-")
    if phase.patience and es.wait >= phase.patience:
        ls.phase_done = True
        ls.stopped_early = ls.stopped_early or phase.is_final
        logging.info("step %d: early stopping phase %d (%s did not improve for %d "
                     "evaluations)", step, phase.index, phase.monitor, phase.patience)


def _maybe_save(run: _Run, state, step: int, ls: LoopState, pending, force: bool):
    """Checkpoints at evaluations, every ``checkpoint.every_steps``, at the phase end and on
    a signal / preemption notice (then raises Preempted). Returns ``pending`` as floats."""
    preempted = run.ckpt.reached_preemption(step)
    signalled = run.stop.signal is not None
    if not (force or periodic.every(step, run.config.checkpoint.every_steps) or preempted
            or signalled):
        return pending
    pending = [{k: float(v) for k, v in d.items()} for d in jax.device_get(pending)]
    ls.pending_train = pending  # the resumed run logs the same interval means
    run.ckpt.save(step, state, run.train_iter, ls.to_json(), protect=ls.best.step)
    ls.pending_train = []
    periodic.call_hooks(run.hooks, "after_save", step)
    if preempted or signalled:
        run.ckpt.wait()
        raise Preempted(step, "preemption notice" if preempted else f"signal {run.stop.signal}")
    return pending


# --------------------------------------------------------------------------- main
def train_and_evaluate(config, workdir: str, hooks: Sequence[Any] = ()) -> Dict[str, Any]:
    """Fine-tunes per ``config`` in ``workdir`` (resuming if it holds a checkpoint).

    Args:
      hooks: objects with optional ``after_step(step, state)`` / ``after_save(step)``
        methods (periodic.Hook), called in the loop; the tests inject faults with them.

    Returns:
      the ``results.json`` dict: {'status': 'done', 'best_step', 'val', 'test',
      'extra_tests', 'config', ...}.

    Raises:
      Preempted: after SIGTERM / a preemption notice (a checkpoint was saved).
      Diverged: the train loss became non-finite or exploded.
      CheckpointError: no checkpoint fits the config, or a save failed (disk full).
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    previous = read_results(workdir) or {}
    if previous.get("status") == "done":
        logging.info("%s already holds finished results; nothing to do", workdir)
        return previous
    if previous.get("status") == "diverged":
        raise Diverged(previous["message"] + " (this workdir's run diverged before)",
                       previous["step"])
    run = setup(config, workdir, hooks)
    try:
        state, state_sh, step, ls = _restore_or_init(run)
        run.writer = periodic.MetricWriter(workdir, step if step else None)
        run.stop = periodic.StopFlag().install()
        run.profiler = periodic.Profiler(os.path.join(workdir, "profile"),
                                         config.log.profile_start, config.log.profile_steps)
        while True:
            phase = run.phases[ls.phase]
            if not (ls.phase_done or step >= ls.phase_start + phase.num_steps):
                state, step = run_phase(run, phase, state, state_sh, step, ls)
            elif phase.is_final:
                break
            else:  # next phase: same weights / BN stats / rng / step, a fresh optimizer
                ls.start_phase(phase.index + 1, step)
                state, state_sh = state_lib.create_sharded_state(
                    state.variables, run.tx(run.phases[ls.phase]), state.rng,
                    run.make_shardings, step=step)
                logging.info("step %d: phase %d (%s) starts", step, ls.phase,
                             run.phases[ls.phase].policy)
        run.ckpt.wait()
        return finalize(run, state, state_sh, step, ls)
    finally:
        run.close()


def finalize(run: _Run, state, state_sh, step: int, ls: LoopState) -> Dict[str, Any]:
    """Best model -> predictions and metrics on every test set, exports, ``results.json``."""
    best_step = step if ls.best.step is None else ls.best.step
    best_state = state
    if best_step != step:
        best_state, _ = run.ckpt.restore(best_step, run.abstract(run.phases[-1])[0], None)
    eval_step = run.eval_step(state_sh)
    by_split = finalize_lib.evaluate_and_write_predictions(
        lambda src: run.run_eval(eval_step, best_state.variables, src), run.splits,
        run.workdir, best_step, run.writer)
    s, c = run.splits, run.config
    for sub, st, stp, mets in (("best", best_state, best_step, {k: by_split[k] for k in
                                                                ("val", "test")}),
                               ("last", state, step, {"val": ls.last_val})):
        finalize_lib.export_weights(os.path.join(run.workdir, "export", sub), st.variables,
                                    weights_lib.WeightsMetadata(
            source="finetuned", layout=run.spec.layout, depth=run.spec.depth,
            width=run.spec.width, num_classes=s.num_classes, preprocessing=run.prep,
            image_size=c.data.image_size,
            extra={"init": run.init_desc, "metrics": mets, "step": int(stp), "dataset": s.name,
                   "class_names": list(s.class_names), "fold": c.fold, "workdir": run.workdir}))
    results = {
        "status": "done", "best_step": int(best_step), "last_step": int(step),
        "stopped_early": bool(ls.stopped_early), "monitor": run.phases[-1].monitor,
        "best_monitor_value": ls.best.value, "val": by_split["val"], "test": by_split["test"],
        "extra_tests": {k: v for k, v in by_split.items() if k not in ("val", "test")},
        "init": run.init_desc, "preprocessing": run.prep, "dataset": s.name,
        "class_names": list(s.class_names), "fold": c.fold, "num_train": len(s.train),
        "num_val": len(s.val), "num_test": len(s.test), "steps_per_epoch": run.steps_per_epoch,
        "num_devices": int(run.mesh.size), "num_processes": jax.process_count(),
        "wall_time_s": time.time() - run.t_start, "config": _json_config(c)}
    if jax.process_index() == 0:
        finalize_lib.write_json(os.path.join(run.workdir, RESULTS_FILE), results)
    return results
