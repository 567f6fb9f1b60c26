"""``train_and_evaluate(config, workdir)``: one fine-tuning run, resumable at any point.

The run: data of one fold -> model (random init or converted weights) -> one or two
phases of jitted, sharded training (the studies' two-phase schedule trains the head
with a frozen, inference-mode base first) -> periodic validation with early stopping
-> export of the best and last weights -> predictions and metrics of the best model on
val / test / extra test sets -> ``results.json``.

Resume: everything the loop needs to continue (state, data-iterator position, phase,
early-stopping counters, best step) lives in the orbax checkpoint, so re-running with
the same ``workdir`` continues from the last save and reproduces the uninterrupted
run. A run whose ``results.json`` says ``done`` is not repeated.

Files in ``workdir``: ``config.json``, ``checkpoints/``, ``metrics.jsonl`` (one JSON
per log/eval event), ``tb/`` (TensorBoard), ``export/{best,last}/`` (weights format),
``predictions.csv`` (+ ``predictions/<split>.csv``), ``results.json``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from medtransfer_jax import data as data_lib
from medtransfer_jax import preprocessing as prep_lib
from medtransfer_jax.models import resnet
from medtransfer_jax.training import checkpointing, metrics as metrics_lib, optim
from medtransfer_jax.training import predictions as pred_lib
from medtransfer_jax.training import sharding as shard_lib
from medtransfer_jax.training import state as state_lib
from medtransfer_jax.training import step as step_lib
from medtransfer_jax.weights import checkpoint as weights_lib

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
#: Fault injection for the resume tests: "kill:N" (SIGKILL itself right after step N's
#: update, before any save), "kill_after_save:N" (SIGKILL right after starting step N's
#: checkpoint), "term:N" (SIGTERM itself at step N). Comma-separate several.
FAULT_ENV = "MEDTRANSFER_FAULT"


def _parse_faults() -> Dict[str, int]:
    out = {}
    for part in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        kind, _, at = part.partition(":")
        if kind not in ("kill", "kill_after_save", "term") or not at.isdigit():
            raise ValueError(f"{FAULT_ENV}={os.environ[FAULT_ENV]!r}: expected kind:step with "
                             "kind in kill, kill_after_save, term")
        out[kind] = int(at)
    return out


class Preempted(RuntimeError):
    """Training stopped early on SIGTERM / a preemption notice after saving a checkpoint.

    Re-running with the same workdir resumes from that checkpoint.
    """

    def __init__(self, step: int, reason: str):
        super().__init__(f"training interrupted at step {step} ({reason}); checkpoint saved, "
                         "re-run with the same --workdir to resume")
        self.step = step
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training phase: its freeze policy, lr, step budget and early-stopping rule."""

    index: int
    policy: str
    lr: float
    num_steps: int
    monitor: str
    mode: str            # 'min' | 'max'
    patience: int        # evaluations without improvement before stopping (0 = never)
    min_delta: float
    batch_norm_train: bool
    is_final: bool


def _mode(metric: str) -> str:
    return "min" if metric == "loss" else "max"


def make_phases(config, steps_per_epoch: int) -> List[Phase]:
    """The phases of ``config.train.freeze`` ('two_phase' -> head phase + full phase)."""
    t, e = config.train, config.eval
    policies = optim.phase_policies(t.freeze)
    phases = []
    for i, policy in enumerate(policies):
        final = i == len(policies) - 1
        if final:
            steps = t.get("num_steps", 0) or int(t.num_epochs * steps_per_epoch)
            monitor, patience = e.get("monitor", "loss"), e.get("patience", 0)
            lr, min_delta = t.lr, e.get("min_delta", 0.0)
            bn = t.get("batch_norm_train", None)
            bn = optim.default_batch_norm_train(policy) if bn is None else bool(bn)
        else:
            h = t.head_phase
            steps = h.get("num_steps", 0) or int(h.num_epochs * steps_per_epoch)
            monitor, patience = h.get("monitor", "accuracy"), h.get("patience", 0)
            lr, min_delta = h.lr, h.get("min_delta", 0.0)
            bn = False  # the studies' frozen base: BatchNorm in inference mode
        if steps <= 0:
            raise ValueError(f"phase {i} ({policy}) has {steps} steps; set train.num_epochs / "
                             "train.num_steps (or train.head_phase.*) to a positive value.")
        phases.append(Phase(i, policy, float(lr), int(steps), monitor, _mode(monitor),
                            int(patience), float(min_delta), bn, final))
    return phases


# --------------------------------------------------------------------------- model
def build_model_and_variables(config, num_classes: int, rng) -> Tuple[Any, Dict, str, str, Any]:
    """Returns (model, variables, preprocessing mode, init description, ModelSpec).

    ``config.model.init``: 'random' or a weights directory (weights/checkpoint.py);
    the architecture and the input normalisation then come from its metadata (a
    non-None ``config.model.preprocessing`` overrides the latter, e.g. the Revisiting
    study fed RadImageNet plain caffe inputs).
    """
    m = config.model
    dtype = jnp.dtype(m.get("dtype", "float32"))
    image_size = config.data.image_size
    init = m.get("init", "random") or "random"
    common = dict(num_classes=num_classes, dropout_rate=m.get("dropout_rate", 0.0), dtype=dtype,
                  bn_momentum=m.get("bn_momentum", None))
    if init == "random":
        spec = resnet.ModelSpec(depth=m.depth, layout=m.layout, num_classes=num_classes,
                                width=m.width)
        model = spec.build(**common)
        variables = resnet.init_variables(model, rng, image_size)
        mode = m.get("preprocessing", None) or "unit"
        return model, jax.device_get(variables), mode, "random", spec
    init = os.path.expanduser(init)
    loaded, meta = weights_lib.load_weights(init)
    for key in ("depth", "layout", "width"):
        if m.get(key) is not None and m.get(key) != getattr(meta, key):
            logging.warning("config.model.%s=%r differs from %s/metadata.json (%r); the "
                            "checkpoint's architecture is used.", key, m.get(key), init,
                            getattr(meta, key))
    spec = dataclasses.replace(meta.model_spec(), num_classes=num_classes)
    model = spec.build(**common)
    fresh = jax.device_get(resnet.init_variables(model, rng, image_size))
    variables = weights_lib.merge_into(fresh, loaded, skip_head=True, source_name=init)
    mode = m.get("preprocessing", None) or meta.preprocessing
    if mode not in prep_lib.MODES:
        raise ValueError(f"config.model.preprocessing={mode!r} is not one of {prep_lib.MODES}")
    return model, variables, mode, init, spec


# --------------------------------------------------------------------------- eval
def evaluate_source(eval_step, variables, source, mesh, *, image_size: int, preprocessing: str,
                    batch_size: int, worker_count: int = 0) -> Tuple[Dict[str, float], Dict]:
    """Runs the model over every example of ``source`` once.

    Returns:
      (metrics dict (metrics.classification_metrics), arrays {'index': (N,),
      'label': (N,), 'probs': (N, K)} in source order).
    """
    it = data_lib.make_eval_iter(source, image_size=image_size, preprocessing=preprocessing,
                                 global_batch_size=batch_size, worker_count=worker_count)
    outs: Dict[str, List[np.ndarray]] = {}
    for batch in it:
        batch = {k: batch[k] for k in ("image", "label", "weight", "index")}
        out = eval_step(variables, shard_lib.make_global_batch(mesh, batch))
        for k, v in out.items():
            outs.setdefault(k, []).append(shard_lib.gather_to_host(v))
    cat = {k: np.concatenate(v) for k, v in outs.items()}
    keep = cat["weight"] > 0
    order = np.argsort(cat["index"][keep], kind="stable")
    arrays = {k: cat[k][keep][order] for k in ("index", "label", "probs", "loss")}
    if len(arrays["index"]) != len(source) or np.any(arrays["index"] != np.arange(len(source))):
        raise RuntimeError(f"evaluation saw {len(arrays['index'])} examples of {len(source)}; "
                           "the eval pipeline must yield every example exactly once")
    mets = metrics_lib.classification_metrics(arrays["label"], arrays["probs"],
                                              loss=float(np.mean(arrays["loss"])) if len(source)
                                              else None)
    return mets, arrays


# --------------------------------------------------------------------------- logging
class _Logger:
    """metrics.jsonl + TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, resume_step: Optional[int]):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tb = None
        if not self.enabled:
            return
        # Drop events after the restored step: they will be recomputed identically.
        keep = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    if (rec.get("step", 0) <= resume_step
                            and not str(rec.get("split", "")).startswith("final_")):
                        keep.append(line if line.endswith("\n") else line + "\n")
        with open(self.path, "w") as f:
            f.writelines(keep)
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tb"),
                                    purge_step=None if resume_step is None else resume_step + 1,
                                    flush_secs=30)
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            logging.warning("tensorboardX not installed; no TensorBoard events")

    def write(self, step: int, split: str, values: Dict[str, Any]):
        if not self.enabled:
            return
        rec = {"step": int(step), "split": split, "time": time.time()}
        rec.update({k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
                    for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self):
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


class _StopFlag:
    """Turns SIGTERM into a flag checked after each step (single-process runs only;
    multi-host runs rely on JAX's preemption sync point, which all hosts agree on)."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = None

    def install(self):
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            return self
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        logging.warning("received signal %d: will save a checkpoint after this step and stop",
                        signum)
        if callable(self._previous):  # an outer study/sweep stops after this run too
            self._previous(signum, frame)

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _fmt_time(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _json_config(config) -> Dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=str))


def _write_json(path: str, obj: Any):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str, allow_nan=True)
    os.replace(tmp, path)


def read_results(workdir: str) -> Optional[Dict[str, Any]]:
    """``results.json`` of a run, or None if there is none (or it is unreadable)."""
    path = os.path.join(workdir, RESULTS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, OSError):
        return None


def _fresh_meta() -> Dict[str, Any]:
    return {"version": 1, "phase": 0, "phase_start": 0, "phase_done": False,
            "es": {"best": None, "best_step": None, "wait": 0},
            "best": {"value": None, "step": None, "rank": 0, "metric": None, "metrics": None},
            "stopped_early": False}


def _improved(value: float, best: Optional[float], mode: str, min_delta: float) -> bool:
    if value is None or not np.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _start_or_resume(ckpt, restored, phases, config, variables, state_rng, phase_tx,
                     abstract_state, make_shardings, train_iter):
    """A fresh state (no checkpoint) or the restored one; returns (state, shardings, step, meta)."""
    if restored is None:
        meta = _fresh_meta()
        step = 0
        state, state_sh = state_lib.create_sharded_state(variables, phase_tx(phases[0]),
                                                         state_rng, make_shardings)
    else:
        step, meta = restored
        if not 0 <= meta.get("phase", -1) < len(phases):
            raise checkpointing.CheckpointError(
                f"{ckpt.directory}/{step}: phase {meta.get('phase')} does not exist in this "
                f"config's schedule ({len(phases)} phase(s), train.freeze="
                f"{config.train.freeze!r}); use the original config or a fresh --workdir.")
        abstract, state_sh = abstract_state(phases[meta["phase"]])
        state, meta = ckpt.restore(step, abstract, train_iter)
        if int(jax.device_get(state.step)) != step:
            raise checkpointing.CheckpointError(
                f"{ckpt.directory}/{step}: state.step={int(jax.device_get(state.step))} does "
                "not match the checkpoint step; the checkpoint is corrupt.")
        logging.info("resumed from %s/%d (phase %d)", ckpt.directory, step, meta["phase"])
    return state, state_sh, step, meta


# --------------------------------------------------------------------------- main
def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
    """Fine-tunes per ``config`` in ``workdir`` (resuming if it holds a checkpoint).

    Returns:
      the ``results.json`` dict: {'status': 'done', 'best_step', 'val', 'test',
      'extra_tests', 'config', ...}.

    Raises:
      Preempted: after SIGTERM / a preemption notice (a checkpoint was saved).
      CheckpointError: the workdir's checkpoint is damaged or does not fit the config.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    done = read_results(workdir)
    if done and done.get("status") == "done":
        logging.info("%s already holds finished results; nothing to do", workdir)
        return done
    is_main = jax.process_index() == 0
    t_start = time.time()

    # ---- mesh, data, model
    mesh = shard_lib.make_mesh(config.sharding.get("num_devices", 0) or None)
    gbs = int(config.train.batch_size)
    shard_lib.local_batch_size(gbs, mesh)  # validates divisibility
    eval_bs = int(config.eval.get("batch_size", 0) or gbs)
    eval_bs = int(math.ceil(eval_bs / mesh.size) * mesh.size)
    splits = data_lib.get_splits(config.data, fold=config.get("fold", None))
    if is_main:
        logging.info("data:\n%s", splits.summary())
    num_classes = splits.num_classes
    rng = jax.random.PRNGKey(int(config.seed))
    init_rng, state_rng = jax.random.split(rng)
    model, variables, prep_mode, init_desc, spec = build_model_and_variables(
        config, num_classes, init_rng)
    image_size = int(config.data.image_size)
    steps_per_epoch = max(1, len(splits.train) // gbs)
    phases = make_phases(config, steps_per_epoch)
    eval_every = int(config.eval.get("every_steps", 0) or steps_per_epoch)
    ckpt_every = int(config.checkpoint.get("every_steps", 0) or 0)
    log_every = int(config.get("log", {}).get("every_steps", 10) or 10)
    worker_count = int(config.data.get("worker_count", 0) or 0)
    if is_main:
        _write_json(os.path.join(workdir, "config.json"), _json_config(config))
        logging.info("model ResNet%d/%s width %d, init %s, preprocessing %s, %d classes; "
                     "mesh %s; %d steps/epoch; phases %s", spec.depth, spec.layout, spec.width,
                     init_desc, prep_mode, num_classes, dict(mesh.shape), steps_per_epoch,
                     [(p.policy, p.num_steps) for p in phases])

    train_iter = data_lib.make_train_iter(
        splits.train, image_size=image_size, preprocessing=prep_mode, global_batch_size=gbs,
        seed=int(config.seed), augment=config.data.get("augment", None),
        worker_count=worker_count)

    ckpt = checkpointing.RunCheckpointer(workdir, max_to_keep=config.checkpoint.get(
        "max_to_keep", 2), async_save=config.checkpoint.get("async_save", True))
    fsdp = bool(config.sharding.get("fsdp", False))
    make_shardings = functools.partial(shard_lib.state_shardings, mesh, fsdp=fsdp,
                                       min_fsdp_size=config.sharding.get("min_fsdp_size", 2 ** 14))

    def phase_tx(phase: Phase):
        return optim.make_optimizer(config.train, variables["params"], phase.policy,
                                    phase.num_steps, lr=phase.lr)

    def abstract_state(phase: Phase):
        tx = phase_tx(phase)
        abstract = jax.eval_shape(lambda v, r: state_lib.create_state(v, tx, r), variables,
                                  state_rng)
        shardings = make_shardings(abstract)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings), shardings

    # ---- fresh start or resume
    try:
        restored = ckpt.restore_meta()
        state, state_sh, step, meta = _start_or_resume(
            ckpt, restored, phases, config, variables, state_rng, phase_tx, abstract_state,
            make_shardings, train_iter)
    except BaseException:
        ckpt.close()
        raise

    faults = _parse_faults()
    logger = _Logger(workdir, step if restored is not None else None)
    stop_flag = _StopFlag().install()
    eval_step = None

    def variables_sharding(sh):
        return {"params": sh.params, "batch_stats": sh.batch_stats}

    def run_eval(state, source):
        return evaluate_source(eval_step, state.variables, source, mesh, image_size=image_size,
                               preprocessing=prep_mode, batch_size=eval_bs,
                               worker_count=worker_count)

    try:
        while True:
            phase = phases[meta["phase"]]
            phase_end = meta["phase_start"] + phase.num_steps
            if meta["phase_done"] or step >= phase_end:
                if phase.is_final:
                    break
                # Next phase: same weights / BN stats / rng / step, a fresh optimizer.
                meta["phase"] += 1
                meta["phase_start"] = step
                meta["phase_done"] = False
                meta["es"] = {"best": None, "best_step": None, "wait": 0}
                nxt = phases[meta["phase"]]
                tx = phase_tx(nxt)
                state, state_sh = state_lib.create_sharded_state(
                    state.variables, tx, state.rng, make_shardings, step=step)
                logging.info("step %d: phase %d (%s) starts", step, nxt.index, nxt.policy)
                continue

            tx = phase_tx(phase)
            schedule = optim.make_schedule(phase.lr, phase.num_steps,
                                           config.train.get("schedule", "constant"),
                                           config.train.get("warmup_steps", 0),
                                           config.train.get("end_lr_factor", 0.0))
            frozen = (optim.frozen_mask(state.params, phase.policy)
                      if phase.policy != "none" else None)
            train_step = step_lib.make_train_step(
                model, tx, mesh, state_sh, num_classes=num_classes,
                batch_norm_train=phase.batch_norm_train, frozen_layers=frozen,
                label_smoothing=config.train.get("label_smoothing", 0.0))
            eval_step = step_lib.make_eval_step(model, mesh, variables_sharding(state_sh),
                                                num_classes=num_classes)
            # Train metrics since the last log line; saved with checkpoints so a resumed
            # run logs the same interval means as an uninterrupted one.
            pending: List[Dict[str, Any]] = list(meta.pop("pending_train", []))
            t_log, pending_timed, first = time.time(), 0, True
            remaining_later = sum(p.num_steps for p in phases[phase.index + 1:])

            while step < phase_end and not meta["phase_done"]:
                batch = next(train_iter)
                batch = {k: batch[k] for k in ("image", "label", "weight")}
                state, m = train_step(state, shard_lib.make_global_batch(mesh, batch))
                step += 1
                pending.append(m)
                if faults.get("kill") == step:
                    jax.block_until_ready(state)
                    os.kill(os.getpid(), signal.SIGKILL)
                if faults.get("term") == step:
                    os.kill(os.getpid(), signal.SIGTERM)
                if first:  # exclude compilation from the throughput
                    jax.block_until_ready(m)
                    t_log, first = time.time(), False
                else:
                    pending_timed += 1
                if step % log_every == 0 or step == phase_end:
                    vals = jax.device_get(pending)
                    # float64 mean: restored entries are Python floats, fresh ones float32.
                    mean = {k: float(np.mean(np.asarray([v[k] for v in vals], np.float64)))
                            for k in vals[0]}
                    dt = time.time() - t_log
                    ips = pending_timed * gbs / dt if dt > 0 and pending_timed else float("nan")
                    sps = ips / gbs if np.isfinite(ips) else float("nan")
                    eta = (phase_end - step + remaining_later) / sps if sps else float("nan")
                    mean.update(lr=float(schedule(step - meta["phase_start"])),
                                img_per_s=ips, phase=phase.index, epoch=step / steps_per_epoch)
                    logger.write(step, "train", mean)
                    if is_main:
                        logging.info("step %d/%d | phase %d | epoch %.2f | loss %.4f | acc %.3f "
                                     "| lr %.2e | %.1f img/s | ETA %s", step,
                                     meta["phase_start"] + phase.num_steps + remaining_later,
                                     phase.index, step / steps_per_epoch, mean["loss"],
                                     mean["accuracy"], mean["lr"], ips, _fmt_time(eta))
                    pending, t_log, pending_timed = [], time.time(), 0

                new_best_rank = None
                is_eval = ((step - meta["phase_start"]) % eval_every == 0 or step == phase_end)
                if is_eval:
                    val, _ = run_eval(state, splits.val)
                    logger.write(step, "val", dict(val, phase=phase.index))
                    meta["last_val"] = dict(val, step=step)
                    value = val.get(phase.monitor)
                    if value is None:
                        raise ValueError(f"monitor metric {phase.monitor!r} is not one of "
                                         f"{sorted(val)} (config eval.monitor / "
                                         "train.head_phase.monitor)")
                    es = meta["es"]
                    if _improved(value, es["best"], phase.mode, phase.min_delta):
                        es.update(best=float(value), best_step=step, wait=0)
                        if phase.is_final:
                            b = meta["best"]
                            b.update(value=float(value), step=step, rank=b["rank"] + 1,
                                     metric=phase.monitor, metrics=val)
                            new_best_rank = b["rank"]
                    else:
                        es["wait"] += 1
                    if is_main:
                        logging.info("step %d | val %s | loss %.4f acc %.3f auc %.4f | best %s "
                                     "%.4f @ %s (wait %d/%s)", step, phase.monitor, val["loss"],
                                     val["accuracy"], val["auc"], phase.monitor,
                                     es["best"] if es["best"] is not None else float("nan"),
                                     es["best_step"], es["wait"], phase.patience or "-")
                    if phase.patience and es["wait"] >= phase.patience:
                        meta["phase_done"] = True
                        meta["stopped_early"] = meta["stopped_early"] or phase.is_final
                        logging.info("step %d: early stopping phase %d (%s did not improve "
                                     "for %d evaluations)", step, phase.index, phase.monitor,
                                     phase.patience)

                preempted = ckpt.reached_preemption(step)
                signalled = stop_flag.signal is not None
                if (is_eval or (ckpt_every and step % ckpt_every == 0) or preempted
                        or signalled or step == phase_end):
                    pending = [{k: float(v) for k, v in d.items()}
                               for d in jax.device_get(pending)]
                    ckpt.save(step, state, train_iter, dict(meta, pending_train=pending),
                              best_rank=new_best_rank)
                    if faults.get("kill_after_save") == step:
                        os.kill(os.getpid(), signal.SIGKILL)
                if preempted or signalled:
                    ckpt.wait()
                    raise Preempted(step, "preemption notice" if preempted else
                                    f"signal {stop_flag.signal}")
        ckpt.wait()

        # ---- export + final evaluation of the best model
        last_state = state
        best_step = meta["best"]["step"]
        if best_step is None or best_step == step:
            best_state = last_state
            best_step = step if best_step is None else best_step
        else:
            abstract, _ = abstract_state(phases[-1])
            best_state, _ = ckpt.restore(best_step, abstract, None)
        if eval_step is None:
            eval_step = step_lib.make_eval_step(model, mesh, variables_sharding(state_sh),
                                                num_classes=num_classes)

        sets = {"val": splits.val, "test": splits.test}
        sets.update({name: src for name, src in sorted(splits.extra_tests.items())})
        results_by_split, pred_rows = {}, []
        for name, src in sets.items():
            mets, arrays = run_eval(best_state, src)
            results_by_split[name] = mets
            logger.write(best_step, f"final_{name}", mets)
            if is_main:
                ids, groups = _ids_groups(src, arrays["index"])
                pred_lib.write_predictions(os.path.join(workdir, "predictions", f"{name}.csv"),
                                           ids, groups, name, arrays["label"], arrays["probs"])
                pred_rows.append((ids, groups, [name] * len(ids), arrays["label"],
                                  arrays["probs"]))
                logging.info("best (step %d) on %s: %s", best_step, name,
                             {k: round(v, 4) for k, v in mets.items() if isinstance(v, float)})
        if is_main and pred_rows:
            pred_lib.write_predictions(
                os.path.join(workdir, "predictions.csv"),
                [x for r in pred_rows for x in r[0]], [x for r in pred_rows for x in r[1]],
                [x for r in pred_rows for x in r[2]], np.concatenate([r[3] for r in pred_rows]),
                np.concatenate([r[4] for r in pred_rows]))

        def export(sub, st, stp, mets):
            host_vars = jax.tree.map(shard_lib.gather_to_host, st.variables)
            md = weights_lib.WeightsMetadata(
                source="finetuned", layout=spec.layout, depth=spec.depth, width=spec.width,
                num_classes=num_classes, preprocessing=prep_mode, image_size=image_size,
                extra={"init": init_desc, "metrics": mets, "step": int(stp),
                       "dataset": splits.name, "class_names": list(splits.class_names),
                       "fold": config.get("fold", None), "workdir": workdir})
            weights_lib.save_weights(os.path.join(workdir, "export", sub), host_vars, md)

        export("best", best_state, best_step, {"val": results_by_split["val"],
                                               "test": results_by_split["test"]})
        export("last", last_state, step, {"val": meta.get("last_val")})

        results = {
            "status": "done", "best_step": int(best_step), "last_step": int(step),
            "stopped_early": bool(meta["stopped_early"]),
            "monitor": phases[-1].monitor, "best_monitor_value": meta["best"]["value"],
            "val": results_by_split["val"], "test": results_by_split["test"],
            "extra_tests": {k: v for k, v in results_by_split.items() if k not in ("val", "test")},
            "init": init_desc, "preprocessing": prep_mode, "dataset": splits.name,
            "class_names": list(splits.class_names), "fold": config.get("fold", None),
            "num_train": len(splits.train), "num_val": len(splits.val),
            "num_test": len(splits.test), "steps_per_epoch": steps_per_epoch,
            "num_devices": int(mesh.size), "num_processes": jax.process_count(),
            "wall_time_s": time.time() - t_start,
            "config": _json_config(config),
        }
        if is_main:
            _write_json(os.path.join(workdir, RESULTS_FILE), results)
        return results
    finally:
        stop_flag.uninstall()
        logger.close()
        ckpt.close()


def _ids_groups(source, index: np.ndarray) -> Tuple[List[str], List[str]]:
    """ids / groups of ``source`` rows (from its columns, else by reading records)."""
    ids = getattr(source, "ids", None)
    groups = getattr(source, "groups", None)
    if ids is not None and groups is not None:
        return [str(ids[i]) for i in index], [str(groups[i]) for i in index]
    recs = [source[int(i)] for i in index]
    return [str(r["id"]) for r in recs], [str(r.get("group", r["id"])) for r in recs]
