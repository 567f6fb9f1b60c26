"""Sweeps: expand a grid of experiments into runs, run them resumably, collect one CSV.

A run is (config file + argument, workdir, extra overrides). Before a run starts, the
sweep resolves that triple with :func:`medtransfer_jax.configs.resolve` (the one
dotted-key override helper) and writes the result to ``<workdir>/sweep_config.py``;
both ways of running read that file (``python -m medtransfer_jax.train
--config=<workdir>/sweep_config.py`` in a subprocess, or ``configs.load`` of it in this
process), so the two modes cannot see different configs, and the file records exactly
what the run used.

    from medtransfer_jax.training import sweep
    runs = sweep.expand_grid("revisiting", targets=["breast"], sources=["imagenet", "random"],
                             folds=range(5), seeds=[0], root="runs/")
    sweep.run_all(runs, parallel=1)
    sweep.collect(runs, "runs/results.csv")

Running a sweep again skips runs whose ``results.json`` says ``done`` (or ``diverged``:
rerunning would diverge again) and resumes interrupted ones from their checkpoints.
Runs go to subprocesses by default (a fresh JAX runtime each; a crash of one does not
take the sweep down). A stop request (SIGTERM, preemption, Ctrl-C; see
:mod:`medtransfer_jax.interrupts`) is forwarded to the running runs, which save and
exit 143; no new run starts and :func:`run_all` raises ``Interrupted``.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import csv
import dataclasses
import itertools
import json
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import jax
from absl import logging

from medtransfer_jax import configs, interrupts, paths, workdir_lock
from medtransfer_jax.configs import validation
from medtransfer_jax.training import finalize, loop, run_setup
from medtransfer_jax.training import source_matters_protocol as sm_protocol
from medtransfer_jax.errors import UserError

STUDIES = ("revisiting", "source_matters", "demo")
RESOLVED_CONFIG = "sweep_config.py"
#: A run the sweep never started (a stop arrived first, or another run rejected its input).
NOT_STARTED = "not started"
#: Share of a GPU's memory that the runs sharing it take together. JAX preallocates 75 %
#: of every visible GPU per process by default, so without a smaller share a second run on
#: the same GPU could not start.
SHARED_GPU_MEMORY = 0.9
#: JAX's per-process share of a GPU's memory: the name read up to now, and its newer name
#: (jax's GPU memory docs); both are set, and either one set by the user is kept.
MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
MEM_FRACTION_ENVS = (MEM_FRACTION_ENV, "XLA_CLIENT_MEM_FRACTION")

#: The one dotted-key override helper (kept under its old name for callers).
apply_overrides = configs.override


@dataclasses.dataclass
class Run:
    """One experiment of a sweep.

    Attributes:
      name: unique, path-like name (also the workdir below the sweep root).
      config: ``configs/...py[:arg]`` as given to ``--config``.
      workdir: the run's directory.
      overrides: extra ``key=value`` config overrides (``train.batch_size=64``).
      keys: the grid coordinates (target, source, fold, seed, p, ...) for the table.
    """

    name: str
    config: str
    workdir: str
    overrides: List[str] = dataclasses.field(default_factory=list)
    keys: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def status(self) -> str:
        """'done' | another final status of results.json ('diverged', ...) | 'partial'
        (has checkpoints) | 'new'."""
        res = read_results(self.workdir)
        if res and res.get("status"):
            return str(res["status"])
        if paths.isdir(paths.join(self.workdir, "checkpoints")):
            return "partial"
        return "new"


#: A run's results.json, or None when it is missing or damaged (the one reader, beside
#: the code that writes it).
read_results = finalize.read_results


def default_config_dir() -> str:
    """The studies' config files: ``$MEDTRANSFER_CONFIGS``, else the checkout's ``configs/``
    (beside the package), else ``./configs``."""
    if os.environ.get("MEDTRANSFER_CONFIGS"):
        return os.environ["MEDTRANSFER_CONFIGS"]
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "configs")
    return beside if os.path.isdir(beside) else os.path.abspath("configs")


def expand_grid(study: str, *, targets: Sequence[str], sources: Sequence[str] = ("imagenet",),
                folds: Iterable[int] = (0,), seeds: Iterable[int] = (0,),
                ps: Optional[Sequence[float]] = None, extra_arg: str = "",
                root: str = "runs", config_dir: Optional[str] = None,
                overrides: Sequence[str] = ()) -> List[Run]:
    """The cartesian product target x source x fold x seed (x p for Source Matters).

    Args:
      study: ``revisiting`` (targets = chest, breast, ...), ``source_matters`` (targets =
        confounders tag, lowpass, noise, sampled; ``ps`` = artefact fractions) or ``demo``
        (targets ignored; the embedded demo config with fold/seed overrides).
      extra_arg: appended to every config argument (e.g. ``freeze=true``).
      overrides: ``key=value`` config overrides for every run.
    """
    if study not in STUDIES:
        raise UserError(f"--study={study!r} is not one of {STUDIES}")
    runs = []
    folds, seeds = list(folds), list(seeds)
    if study == "demo":
        for fold, seed in itertools.product(folds, seeds):
            name = f"demo/fold{fold}/seed{seed}"
            runs.append(Run(name, configs.path("demo"), os.path.join(root, name),
                            [f"data.fold={fold}", f"seed={seed}"] + list(overrides),
                            {"study": study, "target": "synthetic", "source": "random",
                             "fold": fold, "seed": seed}))
        return runs
    config_dir = config_dir or default_config_dir()
    sub = "revisiting" if study == "revisiting" else "source_matters"
    # Source Matters runs always carry p (in the argument and the name), so a grid run
    # first without --ps and later with --ps=0.5 finds the same runs.
    p_values = (list(ps or [sm_protocol.DEFAULT_P]) if study == "source_matters" else [None])
    for target, source, fold, seed, p in itertools.product(targets, sources, folds, seeds,
                                                           p_values):
        arg = f"{source},fold={fold},seed={seed}"
        name = f"{target}/{source}"
        keys = {"study": study, "target": target, "source": source, "fold": fold, "seed": seed}
        if p is not None:
            arg += f",p={p}"
            name += f"/p{p:g}"
            keys["p"] = p
        if extra_arg:
            arg += "," + extra_arg.strip(",")
            name += "/" + extra_arg.strip(",").replace("=", "-").replace(",", "_")
            keys["extra"] = extra_arg
        name += f"/fold{fold}/seed{seed}"
        cfg_file = os.path.join(config_dir, sub, f"{target}.py")
        if not os.path.exists(cfg_file):
            raise UserError(f"no config file {cfg_file} for target {target!r} (config dir "
                            f"{config_dir}; set --config_dir or MEDTRANSFER_CONFIGS)")
        runs.append(Run(name, f"{cfg_file}:{arg}", os.path.join(root, name),
                        list(overrides), keys))
    return runs


def load_config(run: Run):
    """The run's ConfigDict: its config file + argument + overrides (``configs.resolve``)."""
    return configs.resolve(run.config, run.overrides)


def local_dir(run: Run) -> str:
    """Where the sweep writes the run's config file and log: its workdir, or for a remote
    workdir (``gs://...``, written by the training process itself) a local mirror
    under the temp dir, since plain ``open`` cannot write there."""
    if "://" not in run.workdir:
        return run.workdir
    return os.path.join(tempfile.gettempdir(), "medtransfer_sweep",
                        run.workdir.replace("://", "/").lstrip("/"))


def resolved_config_path(run: Run, process_index: int = 0) -> str:
    name = RESOLVED_CONFIG if process_index == 0 else f"sweep_config.p{process_index}.py"
    return os.path.join(local_dir(run), name)


def write_config(run: Run, process_index: int = 0, config=None) -> str:
    """Writes the run's resolved config (``config`` or :func:`load_config`) to its workdir.

    Every process writes its own copy (same content) so no process waits for another's.
    Returns the file.
    """
    return configs.write_resolved(config if config is not None else load_config(run),
                                  resolved_config_path(run, process_index),
                                  origin=f"{run.config} + {run.overrides}")


def _check_finished_config(run: Run) -> None:
    """UserError when a finished run was trained with another config than the sweep now
    asks for it (a changed --override, study setting or protocol file): reusing it would
    mix two configs in one results table unnoticed. A run without a readable config.json
    (made by an older version) is reused as before."""
    try:
        stored = json.loads(paths.read_text(paths.join(run.workdir, run_setup.CONFIG_FILE)))
    except (OSError, ValueError):
        return
    changes = run_setup.config_changes(stored, load_config(run)) if isinstance(
        stored, dict) else []
    if changes:
        raise UserError(
            f"run {run.name} finished with another config than this one asks "
            f"({'; '.join(changes[:3])}{'; ...' if len(changes) > 3 else ''}); its results "
            f"would mix with the new settings' in one table: give another output directory "
            f"(a study: another --workdir), or move {run.workdir} away to train it again")


def check_runs(runs: Sequence[Run], check_folds: bool = True) -> None:
    """Resolves and validates every run's config once: a bad field or file fails the sweep
    before any run starts or any directory is created (``check_folds=False``: the study's
    pre-flight reports folds outside the protocol instead)."""
    seen = set()
    for run in runs:
        key = (run.config, tuple(run.overrides))
        if key in seen:
            continue
        seen.add(key)
        config = load_config(run)
        try:
            validation.validate(config, check_fold=check_folds)
        except UserError as e:
            raise type(e)(f"{run.name}: {e}") from None


def _command(run: Run, python: str, train_flags: Sequence[str] = (),
             process_index: int = 0) -> List[str]:
    return [python, "-m", "medtransfer_jax.train",
            f"--config={resolved_config_path(run, process_index)}",
            f"--workdir={run.workdir}", *train_flags]


def dry_run_command(run: Run, python: str, train_flags: Sequence[str] = ()) -> List[str]:
    """The ``train`` command of ``run`` as it can be pasted before the sweep has written
    anything: its config file + argument and one ``--config.KEY=VALUE`` per override, each
    VALUE the resolved field written the way ``config_flags`` parses it back. An override
    that sets a field to ``None`` (which ``--config.`` cannot say) falls back to the
    resolved file the sweep writes when the run starts (``_command``)."""
    cfg = load_config(run)
    out = []
    for item in run.overrides:
        key = item.partition("=")[0].strip()
        value = cfg
        for part in key.split("."):
            value = value[part]
        if value is None:
            return _command(run, python, train_flags)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (tuple, list)):
            text = repr(tuple(value))
        else:
            text = str(value)
        out.append(f"--config.{key}={text}")
    return [python, "-m", "medtransfer_jax.train", f"--config={run.config}", *out,
            f"--workdir={run.workdir}", *train_flags]


def run_detail(run: Run, status: str) -> str:
    """'test AUC 0.912 (n=38)' for a finished run, else its status ('failed:diverged')."""
    if status.startswith("failed") or status == "stopped":
        return status
    res = read_results(run.workdir) or {}
    test = res.get("test", {})
    auc = test.get("auc")
    return (f"test AUC {auc:.3f} (n={test.get('num_examples', '?')})"
            if isinstance(auc, (int, float)) else "done")


def _final_status(run: Run, rc) -> str:
    st = run.status()
    if st == "done":
        return "done"
    if rc == interrupts.EXIT_CODE:
        return "stopped"
    if st not in ("new", "partial"):
        return f"failed:{st}"
    return f"failed:{rc}"


def _run_subprocess(run: Run, python: str, timeout: Optional[float], env,
                    train_flags: Sequence[str] = (), process_index: int = 0) -> str:
    if interrupts.requested() is not None:
        return NOT_STARTED
    created = not os.path.exists(local_dir(run))
    os.makedirs(local_dir(run), exist_ok=True)
    write_config(run, process_index)
    log_path = os.path.join(local_dir(run), "train.log" if process_index == 0
                            else f"train.p{process_index}.log")
    cmd = _command(run, python, train_flags, process_index)
    with open(log_path, "a") as log:
        log.write(f"\n==== {time.ctime()} {' '.join(cmd)}\n")
        log.flush()
        # Own session: a terminal's Ctrl-C reaches only the sweep, which forwards SIGTERM
        # (a SIGINT straight to the child would skip its checkpoint).
        with interrupts.child(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                               env=env, start_new_session=True)) as proc:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()  # the run saves and can be resumed
                proc.wait()
                rc = "timeout"
    status = _final_status(run, rc)
    if rc == 2:  # the run rejected its input before writing anything: undo what we wrote
        line = _last_error_line(log_path)
        if created:  # only our two files; anything the run wrote stays
            for ours in (log_path, resolved_config_path(run, process_index)):
                with contextlib.suppress(OSError):
                    os.remove(ours)
            with contextlib.suppress(OSError):  # the run dir and empty grid folders above
                os.removedirs(os.path.abspath(local_dir(run)))
        return f"usererror:{line}"
    if status.startswith("failed"):
        logging.warning("run %s: %s (log: %s)", run.name, status, log_path)
    return status


def _last_error_line(log_path: str) -> str:
    """The child's ``train: error: ...`` line (the harness prints exactly one)."""
    try:
        with open(log_path) as f:
            lines = [ln.strip() for ln in f if ": error: " in ln]
    except OSError:
        lines = []
    return lines[-1] if lines else f"exit status 2 (see {log_path})"


def _run_inprocess(run: Run) -> str:
    """One run in this process, from the same resolved file a subprocess would read."""
    interrupts.check(f"before run {run.name}")
    diverged = getattr(loop, "Diverged", ())
    try:
        config = load_config(run)
        configs.check_batch_sizes(config, jax.device_count())
        process = jax.process_index()  # several hosts (--multihost): one lock/file each
        config = configs.load(write_config(run, process, config))  # what a subprocess reads
        with workdir_lock.hold(run.workdir, process):
            loop.train_and_evaluate(config, run.workdir)
    except loop.Preempted as e:
        raise interrupts.Interrupted(f"run {run.name}: {e}") from e
    except diverged:
        logging.warning("run %s diverged (see %s/results.json)", run.name, run.workdir)
    except UserError as e:
        logging.error("run %s: %s", run.name, e)
        return f"failed:{type(e).__name__}"
    except Exception as e:  # noqa: BLE001 (keep sweeping; the run can be resumed later)
        stop = interrupts.behind(e)
        if stop is not None:  # a library wrapped our stop: the run is stopped, not failed
            raise interrupts.Interrupted(f"run {run.name}: {stop.reason}") from e
        logging.exception("run %s failed", run.name)
        return f"failed:{type(e).__name__}"
    return _final_status(run, None)


def _echo_status(run: Run, status: str, seconds: float) -> None:
    """The default line per finished run (the ``sweep`` main prints a progress line)."""
    print(f"[sweep] {run.name}: {status}", flush=True)


def run_all(runs: Sequence[Run], *, parallel: int = 1, mode: str = "subprocess",
            python: Optional[str] = None, timeout: Optional[float] = None,
            env: Optional[Dict[str, str]] = None, dry_run: bool = False,
            train_flags: Sequence[str] = (), gpu_slots: Optional[Sequence[str]] = None,
            process_index: int = 0,
            on_done: Optional[Callable[[Run, str, float], None]] = _echo_status
            ) -> Dict[str, str]:
    """Runs every run not yet finished; returns {name: 'done' | 'skipped' | 'failed:<why>'}.

    ``parallel`` subprocesses at a time; each sees all accelerators unless ``gpu_slots``
    is given (e.g. ``['0', '1', '2,3']``): then each run borrows one slot as its
    ``CUDA_VISIBLE_DEVICES`` and ``parallel`` defaults to the number of slots. A slot may
    repeat (``['0', '0', '1', '1']``: two runs per GPU); runs that share a GPU split
    :data:`SHARED_GPU_MEMORY` of it (:func:`shared_gpu_env`), as do ``parallel`` runs
    without slots.
    ``mode='inprocess'`` runs sequentially in this process. ``on_done(run, status,
    seconds)`` is called as each started run ends (not for runs never started).

    Raises:
      UserError: a run's config cannot be resolved (before anything starts).
      interrupts.Interrupted: a stop was requested; running runs saved their state, and
        the reason counts them and the runs never started.
    """
    if mode not in ("subprocess", "inprocess"):
        raise UserError(f"mode={mode!r}; choose subprocess or inprocess")
    python = python or sys.executable
    check_runs(runs)
    status: Dict[str, str] = {}
    todo = []
    for run in runs:
        st = run.status()
        if st == "done":
            _check_finished_config(run)
        if st not in ("new", "partial"):
            status[run.name] = "skipped" if st == "done" else f"failed:{st}"
            if st != "done":
                logging.warning("run %s: %s earlier; not rerun (delete %s to retry)",
                                run.name, st, run.workdir)
        else:
            todo.append(run)
            logging.info("%s run %s (%s)", "would" if dry_run else "will", run.name, st)
    if dry_run:
        for run in todo:
            cmd = dry_run_command(run, python, train_flags)
            note = (f" (its config file {resolved_config_path(run, process_index)} is "
                    "written when the sweep runs)" if cmd[3].endswith(RESOLVED_CONFIG) else "")
            print(f"# {run.name}{note}\n" + " ".join(shlex.quote(a) for a in cmd))
            status[run.name] = "dry_run"
        return status
    on_done = on_done or (lambda *_: None)
    if mode == "inprocess":
        for i, run in enumerate(todo):
            later = len(todo) - i - 1
            if interrupts.requested() is not None:
                raise interrupts.Interrupted(f"{later + 1} run(s) not started")
            t0 = time.time()
            try:
                status[run.name] = _run_inprocess(run)
            except interrupts.Interrupted as e:  # the run saved its checkpoint
                raise interrupts.Interrupted(
                    f"{e.reason}" + (f"; {later} run(s) not started" if later else "")) from e
            on_done(run, status[run.name], time.time() - t0)
    else:
        status.update(_run_pool(todo, parallel, python, timeout, env, train_flags, gpu_slots,
                                process_index, on_done))
    bad = {n: s.split(":", 1)[1] for n, s in status.items() if s.startswith("usererror:")}
    if bad:
        name, line = next(iter(bad.items()))
        raise UserError(f"run {name} rejected its input ({line})"
                        + (f"; {len(bad) - 1} more run(s) too" if len(bad) > 1 else ""))
    stopped = sum(s == "stopped" for s in status.values())
    not_started = sum(s == NOT_STARTED for s in status.values())
    if stopped or interrupts.requested() is not None:
        raise interrupts.Interrupted(
            f"{stopped} run(s) saved and stopped"
            + (f"; {not_started} run(s) not started" if not_started else ""))
    return status


def gpu_sharing(gpu_slots: Sequence[str]) -> Dict[str, int]:
    """{slot: how many slots at most name one of its GPUs}: ``['0', '0', '1']`` -> 2 runs
    share GPU 0 at a time, 1 has GPU 1."""
    per_gpu = collections.Counter(g.strip() for s in gpu_slots for g in str(s).split(","))
    return {str(s): max(per_gpu[g.strip()] for g in str(s).split(",")) for s in gpu_slots}


def shared_gpu_env(env: Dict[str, str], sharing: int) -> Dict[str, str]:
    """``env`` for a run that shares its GPUs with ``sharing - 1`` other runs at a time:
    each preallocates ``SHARED_GPU_MEMORY / sharing`` of every GPU instead of JAX's 75 %,
    unless the user set its fraction (:data:`MEM_FRACTION_ENVS`) or turned preallocation
    off."""
    if (sharing <= 1 or any(k in env for k in MEM_FRACTION_ENVS)
            or env.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0")):
        return env
    share = f"{SHARED_GPU_MEMORY / sharing:.3f}"
    return dict(env, **{k: share for k in MEM_FRACTION_ENVS})


class RunEnvs:
    """The environment of each run of a pool: with ``gpu_slots`` a run borrows one slot
    as its ``CUDA_VISIBLE_DEVICES`` (``parallel`` = the number of slots); without, every
    run sees every accelerator and ``parallel`` runs share them. Runs sharing a GPU split
    its memory (:func:`shared_gpu_env`)."""

    def __init__(self, gpu_slots: Optional[Sequence[str]], parallel: int,
                 env: Optional[Dict[str, str]] = None):
        self.base = dict(os.environ if env is None else env)
        self.slots: Optional[queue.Queue] = None
        if gpu_slots:
            self.slots = queue.Queue()
            for s in gpu_slots:
                self.slots.put(str(s))
            self.parallel = len(gpu_slots)
            self.sharing = gpu_sharing(gpu_slots)
        else:
            self.parallel = max(1, int(parallel))
            self.base = shared_gpu_env(self.base, self.parallel)

    @contextlib.contextmanager
    def borrow(self):
        """The env of one run (a slot is held until the block ends)."""
        if self.slots is None:
            yield self.base
            return
        slot = self.slots.get()
        try:
            yield shared_gpu_env(dict(self.base, CUDA_VISIBLE_DEVICES=slot),
                                 self.sharing[slot])
        finally:
            self.slots.put(slot)


def _run_pool(todo, parallel, python, timeout, env, train_flags, gpu_slots,
              process_index, on_done) -> Dict[str, str]:
    envs = RunEnvs(gpu_slots, min(int(parallel), len(todo)), env)
    parallel = envs.parallel

    abort = threading.Event()  # a run rejected its input: the others would too

    def one(run: Run):
        if abort.is_set():
            return NOT_STARTED, 0.0
        t0 = time.time()
        result = _one(run)
        if result.startswith("usererror:"):
            abort.set()
        return result, time.time() - t0

    def _one(run: Run) -> str:
        with envs.borrow() as run_env:
            return _run_subprocess(run, python, timeout, run_env, train_flags, process_index)

    status = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, int(parallel))) as pool:
        futures = {pool.submit(one, r): r for r in todo}
        for fut in concurrent.futures.as_completed(futures):
            run = futures[fut]
            status[run.name], seconds = fut.result()
            # a usererror is the sweep's error line; a run never started has no line
            if not status[run.name].startswith("usererror:") and status[run.name] != NOT_STARTED:
                on_done(run, status[run.name], seconds)
    return status


def _flatten(prefix: str, d: Dict[str, Any], out: Dict[str, Any]):
    for k, v in d.items():
        if isinstance(v, dict):
            _flatten(f"{prefix}{k}.", v, out)
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[prefix + k] = v


def collect(runs: Sequence[Run], csv_path: Optional[str] = None,
            process_index: int = 0) -> List[Dict[str, Any]]:
    """One row per run: grid keys, status, best step, val/test/extra-test metrics.

    Only runs whose status is ``done`` carry metrics: a diverged or unfinished run is
    listed with its status and never averaged into a table. Writes ``csv_path`` if given
    (columns = union over rows, stable order; only process 0 writes shared files).
    """
    rows = []
    for run in runs:
        row: Dict[str, Any] = {"name": run.name, **run.keys, "status": run.status(),
                               "workdir": run.workdir if "://" in run.workdir
                               else os.path.abspath(run.workdir)}
        res = read_results(run.workdir)
        if res and res.get("status") == "done":
            row["best_step"] = res.get("best_step")
            row["last_step"] = res.get("last_step")
            row["stopped_early"] = res.get("stopped_early")
            for split in ("val", "test"):
                _flatten(f"{split}.", res.get(split, {}), row)
            for name, mets in sorted(res.get("extra_tests", {}).items()):
                _flatten(f"{name}.", mets, row)
        rows.append(row)
    if csv_path and process_index == 0:
        cols: List[str] = []
        for r in rows:
            cols += [c for c in r if c not in cols]
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        tmp = csv_path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, csv_path)
    return rows
