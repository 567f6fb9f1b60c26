"""Sweeps: expand a grid of experiments into runs, run them resumably, collect one CSV.

A run is (config file + argument, workdir, extra overrides). Running a sweep again
skips runs whose ``results.json`` says ``done`` and resumes interrupted ones from their
checkpoints (the training loop does that by itself when its workdir is reused).

    from medtransfer_jax.training import sweep
    runs = sweep.expand_grid("revisiting", targets=["breast"], sources=["imagenet", "random"],
                             folds=range(5), seeds=[0], root="runs/")
    sweep.run_all(runs, parallel=1)
    sweep.collect(runs, "runs/results.csv")

Runs go to subprocesses (``python -m medtransfer_jax.train``) so each has a fresh JAX
runtime and a crash or kill of one does not take the sweep down; ``mode='inprocess'``
runs them in this process (tests, notebooks).
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

from absl import logging

STUDIES = ("revisiting", "source_matters", "demo")


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
        """'done' | 'partial' (has checkpoints) | 'new'."""
        res = read_results(self.workdir)
        if res and res.get("status") == "done":
            return "done"
        if os.path.isdir(os.path.join(self.workdir, "checkpoints")):
            return "partial"
        return "new"


def read_results(workdir: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(workdir, "results.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def default_config_dir() -> str:
    """The repository's ``configs/`` (next to the package in a source checkout)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "configs")


def expand_grid(study: str, *, targets: Sequence[str], sources: Sequence[str] = ("imagenet",),
                folds: Iterable[int] = (0,), seeds: Iterable[int] = (0,),
                ps: Optional[Sequence[float]] = None, extra_arg: str = "",
                root: str = "runs", config_dir: Optional[str] = None,
                overrides: Sequence[str] = ()) -> List[Run]:
    """The cartesian product target x source x fold x seed (x p for Source Matters).

    Args:
      study: ``revisiting`` (targets = chest, breast, ...), ``source_matters`` (targets =
        confounders tag, lowpass, noise, sampled; ``ps`` = artefact fractions) or ``demo``
        (targets ignored; the demo config with fold/seed overrides).
      extra_arg: appended to every config argument (e.g. ``freeze=true``).
      overrides: ``key=value`` config overrides for every run.
    """
    if study not in STUDIES:
        raise ValueError(f"study {study!r} is not one of {STUDIES}")
    config_dir = config_dir or default_config_dir()
    runs = []
    folds, seeds = list(folds), list(seeds)
    if study == "demo":
        for fold, seed in itertools.product(folds, seeds):
            name = f"demo/fold{fold}/seed{seed}"
            runs.append(Run(name, os.path.join(config_dir, "demo.py"),
                            os.path.join(root, name),
                            [f"data.fold={fold}", f"seed={seed}"] + list(overrides),
                            {"study": study, "target": "synthetic", "source": "random",
                             "fold": fold, "seed": seed}))
        return runs
    sub = "revisiting" if study == "revisiting" else "source_matters"
    p_values = list(ps) if (study == "source_matters" and ps) else [None]
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
            raise ValueError(f"no config file {cfg_file} for target {target!r}")
        runs.append(Run(name, f"{cfg_file}:{arg}", os.path.join(root, name),
                        list(overrides), keys))
    return runs


def _command(run: Run, python: str, train_flags: Sequence[str] = ()) -> List[str]:
    cmd = [python, "-m", "medtransfer_jax.train", f"--config={run.config}",
           f"--workdir={run.workdir}", *train_flags]
    cmd += [f"--config.{o}" for o in run.overrides]
    return cmd


def _run_subprocess(run: Run, python: str, timeout: Optional[float], env,
                    train_flags: Sequence[str] = ()) -> str:
    os.makedirs(run.workdir, exist_ok=True)
    log_path = os.path.join(run.workdir, "train.log")
    with open(log_path, "a") as log:
        cmd = _command(run, python, train_flags)
        log.write(f"\n==== {time.ctime()} {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout, env=env)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if run.status() == "done":
        return "done"
    logging.warning("run %s ended with %s without results (log: %s)", run.name, rc, log_path)
    return f"failed:{rc}"


def load_config(run: Run):
    """The run's ConfigDict (config file + argument + overrides), without absl flags."""
    import importlib.util

    path, _, arg = run.config.partition(":")
    spec = importlib.util.spec_from_file_location(
        "medtransfer_sweep_cfg_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
    apply_overrides(cfg, run.overrides)
    return cfg


def apply_overrides(cfg, overrides: Sequence[str]):
    """``['train.lr=0.01', 'fold=2']`` -> sets fields, parsing values as the field's type."""
    import ast

    for o in overrides:
        key, sep, raw = o.partition("=")
        if not sep:
            raise ValueError(f"override {o!r} is not key=value")
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        current = node.get(parts[-1], None)
        if isinstance(current, bool) and isinstance(value, str):
            value = value.lower() in ("1", "true", "yes")
        elif isinstance(current, float) and isinstance(value, int):
            value = float(value)
        node[parts[-1]] = value
    return cfg


def run_all(runs: Sequence[Run], *, parallel: int = 1, mode: str = "subprocess",
            python: Optional[str] = None, timeout: Optional[float] = None,
            env: Optional[Dict[str, str]] = None, dry_run: bool = False,
            train_flags: Sequence[str] = (),
            gpu_slots: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """Runs every run not yet done; returns {name: 'done' | 'skipped' | 'failed:<rc>'}.

    ``parallel`` subprocesses at a time; each sees all accelerators unless ``gpu_slots``
    is given (e.g. ``['0', '1', '2,3']``): then each run borrows one slot as its
    ``CUDA_VISIBLE_DEVICES`` and ``parallel`` defaults to the number of slots.
    ``mode='inprocess'`` runs sequentially in this process.
    """
    python = python or sys.executable
    status: Dict[str, str] = {}
    todo = []
    for run in runs:
        st = run.status()
        if st == "done":
            status[run.name] = "skipped"
        else:
            todo.append(run)
            logging.info("%s run %s (%s)", "would" if dry_run else "will", run.name, st)
    if dry_run:
        for run in todo:
            print(" ".join(_command(run, python, train_flags)))
            status[run.name] = "dry_run"
        return status
    if mode == "inprocess":
        from medtransfer_jax.training import loop
        for run in todo:
            try:
                loop.train_and_evaluate(load_config(run), run.workdir)
                status[run.name] = "done"
            except Exception as e:  # keep sweeping; the run can be resumed later
                logging.exception("run %s failed", run.name)
                status[run.name] = f"failed:{type(e).__name__}"
        return status
    if mode != "subprocess":
        raise ValueError(f"mode={mode!r}; choose subprocess or inprocess")
    slots = None
    if gpu_slots:
        import queue
        slots = queue.Queue()
        for s in gpu_slots:
            slots.put(str(s))
        parallel = len(gpu_slots)

    def one(run: Run) -> str:
        if slots is None:
            return _run_subprocess(run, python, timeout, env, train_flags)
        slot = slots.get()
        try:
            run_env = dict(os.environ if env is None else env, CUDA_VISIBLE_DEVICES=slot)
            return _run_subprocess(run, python, timeout, run_env, train_flags)
        finally:
            slots.put(slot)

    with concurrent.futures.ThreadPoolExecutor(max(1, int(parallel))) as pool:
        futures = {pool.submit(one, r): r for r in todo}
        for fut in concurrent.futures.as_completed(futures):
            run = futures[fut]
            status[run.name] = fut.result()
            logging.info("run %s: %s", run.name, status[run.name])
    return status


def _flatten(prefix: str, d: Dict[str, Any], out: Dict[str, Any]):
    for k, v in d.items():
        if isinstance(v, dict):
            _flatten(f"{prefix}{k}.", v, out)
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[prefix + k] = v


def collect(runs: Sequence[Run], csv_path: Optional[str] = None) -> List[Dict[str, Any]]:
    """One row per run: grid keys, status, best step, val/test/extra-test metrics.

    Writes ``csv_path`` if given (columns = union over rows, stable order).
    """
    rows = []
    for run in runs:
        row: Dict[str, Any] = {"name": run.name, **run.keys, "status": run.status(),
                               "workdir": os.path.abspath(run.workdir)}
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
    if csv_path:
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
