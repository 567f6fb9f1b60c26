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

import math
import time
from typing import Any, Dict, Sequence

import jax
import numpy as np
from absl import logging

from medtransfer_jax import compile_cache, paths, ticker
from medtransfer_jax.configs import validation
from medtransfer_jax.training import checkpointing, optim, periodic, program_cache
from medtransfer_jax.training import finalize as finalize_lib
from medtransfer_jax.training import phases as phases_lib
from medtransfer_jax.training import run_setup, save_policy
from medtransfer_jax import sharding as shard_lib
from medtransfer_jax.training import state as state_lib
from medtransfer_jax.training import step as step_lib
from medtransfer_jax.training.loop_state import LoopState
from medtransfer_jax.training.run_setup import Run, setup

# Public names other modules import from here.
RESULTS_FILE = finalize_lib.RESULTS_FILE
METRICS_FILE = periodic.METRICS_FILE
Phase, make_phases = phases_lib.Phase, phases_lib.make_phases
read_results = finalize_lib.read_results
finalize = finalize_lib.finalize


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


# --------------------------------------------------------------------------- phases
def run_phase(run: Run, phase: Phase, state, state_sh, step: int, ls: LoopState):
    """Trains ``phase`` from ``step`` until its budget, early stopping or a signal; returns
    (state, step). Periodic actions: log, evaluate, checkpoint (config log / eval /
    checkpoint .every_steps)."""
    c = run.config
    frozen = (optim.frozen_mask(state.params, phase.policy) if phase.policy != "none"
              else None)
    # The same graph as an earlier run in this process (a study's folds and sources)
    # reuses its jitted step: no re-trace, re-lower or cache read (program_cache).
    # A phase's length shapes only a decaying schedule (optim.make_schedule), so it is in
    # the key only there: runs of other lengths (folds whose epochs differ by a step, a
    # longer budget) share the constant-lr step.
    steps = None if c.train.schedule == "constant" else phase.num_steps
    key = ("train_step", repr(run.model),
           program_cache.config_key(c.train, drop=("num_epochs", "num_steps")), phase.lr,
           steps, phase.policy, phase.batch_norm_train, run.mesh,
           program_cache.tree_key(state_sh), run.splits.num_classes,
           c.train.label_smoothing, tuple(sorted((frozen or {}).items())))
    train_step = program_cache.get(key, lambda: step_lib.make_train_step(
        run.model, run.tx(phase), run.mesh, state_sh, num_classes=run.splits.num_classes,
        batch_norm_train=phase.batch_norm_train, label_smoothing=c.train.label_smoothing,
        frozen_layers=frozen))
    eval_step = run.eval_step(state_sh)
    end = ls.phase_start + phase.num_steps
    eval_every = c.eval.every_steps or run.steps_per_epoch
    pending, ls.pending_train = list(ls.pending_train), []
    meter = periodic.Throughput(c.train.batch_size)
    # log.every_secs: a console line when that long passed without one (slow steps)
    every_secs = c.log.get("every_secs", 0.0)
    beat = ticker.Ticker("train", interval=every_secs, echo=logging.info) if every_secs else None
    if step < end and not ls.phase_done:
        logging.info("phase %d: compiling the train step (or reading it from the compilation "
                     "cache) and running step %d", phase.index, step + 1)
    t_first = time.monotonic()
    while step < end and not ls.phase_done:
        batch = {k: v for k, v in next(run.train_iter).items() if k in ("image", "label", "weight")}
        state, m = train_step(state, shard_lib.make_global_batch(run.mesh, batch))
        step += 1
        pending.append(m)
        first = not meter.compiled
        meter.tick(m)   # waits for the first step
        if first:
            logging.info("step %d: compiled and ran in %s", step,
                         ticker.format_duration(time.monotonic() - t_first))
        run.profiler.after_step(step, state)
        periodic.call_hooks(run.hooks, "after_step", step, state)
        if periodic.every(step, c.log.every_steps) or step == end:
            _log_train(run, phase, step, pending, meter, ls)
            pending = []
            if beat:
                beat.reset()
        elif beat and not first and beat.due():
            _log_progress(run, phase, step, pending, meter, ls, beat)
        is_eval = periodic.every(step - ls.phase_start, eval_every) or step == end
        if is_eval:
            jax.block_until_ready(state)  # the queued steps are train time, not eval time
            with run.stages("eval"):
                _evaluate(run, phase, eval_step, state, step, ls)
        with run.stages("checkpoint"):
            pending = _maybe_save(run, state, step, ls, pending, is_eval=is_eval,
                                  phase_end=step == end or ls.phase_done)
    return state, step


def _log_train(run: Run, phase: Phase, step: int, pending, meter, ls: LoopState) -> None:
    """Writes the interval's mean train metrics; raises Diverged on a bad loss."""
    vals = jax.device_get(pending)
    # float64 mean: restored entries are Python floats, fresh ones float32.
    mean = {k: float(np.mean(np.asarray([v[k] for v in vals], np.float64))) for k in vals[0]}
    lr = optim.lr_at(run.config.train, phase.lr, phase.num_steps, step - ls.phase_start)
    total = _total_steps(run, phase, ls)
    speed = meter.report(total - step)
    mean.update(lr=lr, img_per_s=speed["img_per_s"], phase=phase.index,
                epoch=step / run.steps_per_epoch)
    run.writer.write(step, "train", mean)
    logging.info("step %d/%d | phase %d | epoch %.2f | loss %.4f | acc %.3f | lr %.2e | "
                 "%.1f img/s | ETA %s", step, total, phase.index, mean["epoch"], mean["loss"],
                 mean["accuracy"], lr, speed["img_per_s"],
                 ticker.format_duration(speed["eta_s"]))
    limit = run.config.train.max_loss_factor * math.log(max(2, run.splits.num_classes))
    if not math.isfinite(mean["loss"]) or (limit > 0 and mean["loss"] > limit):
        _diverged(run, step, mean["loss"], lr, limit)


def _total_steps(run: Run, phase: Phase, ls: LoopState) -> int:
    """The run's last step as planned from this phase on (phases may stop early)."""
    return sum(p.num_steps for p in run.phases[phase.index:]) + ls.phase_start


def _log_progress(run: Run, phase: Phase, step: int, pending, meter, ls: LoopState,
                  beat: ticker.Ticker) -> None:
    """A console line between two ``log.every_steps`` lines (``log.every_secs``): the
    interval's loss so far, speed and ETA; written nowhere else, so the metrics files of a
    run do not depend on how fast its machine was."""
    vals = jax.device_get(pending)   # waits for the steps queued so far
    loss = float(np.mean(np.asarray([v["loss"] for v in vals], np.float64)))
    total = _total_steps(run, phase, ls)
    speed = meter.peek(total - step)
    beat.say(f"step {step}/{total} | phase {phase.index} | loss {loss:.4f} (mean of the last "
             f"{len(vals)} steps) | {speed['img_per_s']:.1f} img/s | ETA "
             f"{ticker.format_duration(speed['eta_s'])}")


def _diverged(run: Run, step: int, loss: float, lr: float, limit: float):
    what = "is not finite" if not math.isfinite(loss) else f"exceeds {limit:.3g}"
    msg = (f"training diverged at step {step}: mean train loss {loss:.4g} {what} (lr "
           f"{lr:.3g}); try a 3-10x lower --config.train.lr, warmup (train.warmup_steps) or "
           "gradient clipping (train.grad_clip_norm), in a fresh --workdir")
    if jax.process_index() == 0:
        finalize_lib.write_json(paths.join(run.workdir, RESULTS_FILE), {
            "status": "diverged", "message": msg, "step": step, "loss": loss, "lr": lr,
            "config": finalize_lib.json_config(run.config)})
    raise Diverged(msg, step)


def _evaluate(run: Run, phase: Phase, eval_step, state, step: int, ls: LoopState) -> None:
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


def _maybe_save(run: Run, state, step: int, ls: LoopState, pending, is_eval: bool,
                phase_end: bool):
    """Saves per save_policy: at a phase end, every ``checkpoint.every_steps``, at an
    evaluation ``checkpoint.every_secs`` after the last save, and on a signal or
    preemption notice (then raises Preempted); a new best in between is kept on the device
    and written first by the next save. Returns ``pending`` (as floats once read)."""
    c = run.config.checkpoint
    preempted = run.ckpt.reached_preemption(step)
    signalled = run.stop.signal is not None
    # Asked at every evaluation, whatever else holds: on several hosts it is a collective.
    timed = is_eval and save_policy.time_due(c.get("every_secs", 0.0), run.last_save)
    due = (phase_end or preempted or signalled or periodic.every(step, c.every_steps)
           or timed)
    new_best = is_eval and ls.best.step == step
    if not (due or new_best):
        return pending
    pending = [{k: float(v) for k, v in d.items()} for d in jax.device_get(pending)]
    ls.pending_train = pending  # the resumed run logs the same interval means
    meta = ls.to_json()
    ls.pending_train = []
    if new_best:  # a device copy: the export reads it, and the next save writes it
        run.best_snapshot = save_policy.BestSnapshot.take(step, state, run.train_iter, meta)
    if not due:
        return pending
    save_policy.save_pending_best(run.ckpt, run.best_snapshot, ls.best.step, step)
    run.ckpt.save(step, state, run.train_iter, meta, protect=ls.best.step)
    if new_best:
        run.best_snapshot.saved = True
    run.last_save = time.monotonic()
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
    validation.validate(config)  # a bad field fails here, before the workdir is touched
    # A gs://bucket/run workdir stays a URL (os.path.abspath would make it ./gs:/...);
    # every file below it is written through medtransfer_jax.paths, checkpoints by orbax.
    workdir = paths.to_str(paths.makedirs(paths.workdir(workdir)))
    previous = read_results(workdir) or {}
    if previous.get("status") == "done":
        if isinstance(previous.get("config"), dict):
            run_setup.check_same_config(previous["config"], config, workdir,
                                        "holds a finished run")
        logging.info("%s already holds finished results; nothing to do", workdir)
        _release_checkpoints(config, workdir)   # a deletion a kill cut short
        return previous
    if previous.get("status") == "diverged":
        raise Diverged(previous["message"] + " (this workdir's run diverged before)",
                       previous["step"])
    timer = compile_cache.CompileTimer()
    run = setup(config, workdir, hooks)
    run.compile_timer = timer
    try:
        with run.stages("restore"):
            state, state_sh, step, ls = run_setup.restore_or_init(run)
        run.last_save = time.monotonic()
        run.writer = periodic.MetricWriter(workdir, step if step else None)
        run.stop = periodic.StopFlag().install()
        run.profiler = periodic.Profiler(paths.to_str(paths.join(workdir, "profile")),
                                         config.log.profile_start, config.log.profile_steps)
        while True:
            phase = run.phases[ls.phase]
            if not (ls.phase_done or step >= ls.phase_start + phase.num_steps):
                with run.stages("loop"):
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
        with run.stages("checkpoint_wait"):
            run.ckpt.wait()
        results = finalize(run, state, state_sh, step, ls)
    finally:
        run.close()
    _release_checkpoints(config, workdir)
    return results


def _release_checkpoints(config, workdir: str) -> None:
    """A done run's checkpoints deleted (checkpoint.keep_when_done=False): see
    checkpointing.remove_when_done."""
    if config.checkpoint.keep_when_done:
        return
    freed = checkpointing.remove_when_done(workdir)
    if freed:
        logging.info("run done: removed its training checkpoints (%.1f MB; results.json, "
                     "predictions and export/{best,last} stay; "
                     "--config.checkpoint.keep_when_done=True keeps them)", freed / 1e6)
