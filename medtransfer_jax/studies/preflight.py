"""Pre-flight of a study: everything it needs, checked before the first of its runs.

A real study is 100+ runs over hours; a missing data root or a mistyped checkpoint path
should stop it in the first second with one message listing *everything* missing, not
after the first 40 runs. :func:`check` looks at every source (weights dirs, ``.h5`` files
to convert, pre-training configs), every target (its run config loads; data root, fold
CSVs and CSV files exist) and the free disk space against an estimate of what the runs
write, and describes the grid (runs, runs already done, images processed at most).
:func:`stage_work` counts each stage's work in the units of the study's cost model
(``progress.py``); with rates measured earlier in the same workdir the pre-flight adds
a time estimate.

It reads a study object (``config``, ``path()``, ``source_dir()``, ``finetune_runs()``,
``folds``, ``clean_targets``, ``random_twin_dir()``, ``is_done()``) and never imports
the runner.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import math
import os
import shutil
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp

from medtransfer_jax import paths
from medtransfer_jax.models import resnet
from medtransfer_jax.studies import analyses, progress
from medtransfer_jax.training import sweep
from medtransfer_jax.weights import checkpoint

#: Examples per dataset (REFERENCE / the papers), for the images-processed estimate.
DATASET_SIZES = {"chest": 5856, "breast": 780, "thyroid": 480, "mammograms": 3568,
                 "knee": 5222, "isic": 10015, "pcam": 10000}
#: Bytes written per parameter by one run: 3 orbax checkpoints (max_to_keep=2 + best) of
#: params + Adam's two moments (3 x 4 bytes each) plus the exported float32 weights.
BYTES_PER_PARAM = 3 * 3 * 4 + 4
#: "Free bytes" of a gs:// workdir: a bucket has no disk to fill (its quota is not checked).
UNLIMITED = 1 << 62


@dataclasses.dataclass
class Preflight:
    """The outcome of :func:`check`: ``missing`` is empty when the study can start."""
    missing: List[str]
    runs: int
    runs_done: int
    images: Optional[int]  # upper bound of training images processed by the runs left
    bytes_needed: int
    bytes_free: int
    grid: List[str]
    #: {stage: seconds} of the stages not done, from ``WORKDIR/stages/rates.json``
    #: (NaN where nothing is known); empty when that workdir has timed nothing yet.
    estimate: Dict[str, float] = dataclasses.field(default_factory=dict)
    basis: Dict[str, str] = dataclasses.field(default_factory=dict)

    def estimate_line(self) -> Optional[str]:
        """``[study] estimate: 3h05m left = finetune 2h50m + representations 15m* ...``
        (``*``: the stage's prior rate, not one measured in this workdir), or None."""
        if not self.estimate:
            return None
        parts = [f"{s} {progress.format_duration(t)}"
                 + ("*" if self.basis.get(s) == "prior" else "")
                 for s, t in self.estimate.items()]
        return (f"[study] estimate: {progress.format_duration(sum(self.estimate.values()))} "
                "left = " + " + ".join(parts) + " (rates measured in this workdir; "
                "*: a prior, progress.PRIORS)")

    def text(self) -> str:
        """The grid and what is missing, for a person (``--dry_run`` prints this)."""
        imgs = f"{self.images:,}" if self.images is not None else "unknown"
        free = ("a bucket: no disk limit" if self.bytes_free >= UNLIMITED
                else f"{self.bytes_free / 1e9:.1f} GB free")
        lines = [f"[study] pre-flight: {self.runs} fine-tuning runs ({self.runs_done} done), "
                 f"<= {imgs} training images to process, ~{self.bytes_needed / 1e9:.1f} GB to "
                 f"write ({free})"]
        lines += [f"[study]   {g}" for g in self.grid]
        lines += [self.estimate_line()] if self.estimate else []
        lines += [f"[study] MISSING: {m}" for m in self.missing] or ["[study] pre-flight: ok"]
        return "\n".join(lines)

    def error_message(self) -> str:
        return (f"{len(self.missing)} thing(s) missing before the study can start: "
                + "; ".join(self.missing) + ". Fix them (config args or --config.<field>=...) "
                "and rerun; nothing was trained.")


def check_source(name: str, spec, source_dir: str) -> List[str]:
    """What a source lacks: a weights dir, an input file to convert, a pre-train config."""
    if spec.get("weights_of"):
        return []
    if spec.kind == "weights" and not paths.exists(paths.join(source_dir,
                                                               checkpoint.METADATA_FILE)):
        return [f"sources.{name}.path={spec.path}: no weights dir ({checkpoint.METADATA_FILE} "
                "missing); convert the checkpoint with medtransfer_jax.convert"]
    if spec.kind == "convert":
        done = paths.exists(paths.join(source_dir, checkpoint.METADATA_FILE))
        if not done and not paths.isfile(paths.expand(str(spec.input))):
            return [f"sources.{name}.input={spec.input}: checkpoint file not found"]
    if spec.kind == "pretrain" and not os.path.isfile(spec.config.partition(":")[0]):
        return [f"sources.{name}.config={spec.config}: config file not found"]
    return []


def check_run_config(target: str, run: sweep.Run) -> List[str]:
    """What a target's run config points at that does not exist (data root, CSVs)."""
    try:
        cfg = sweep.load_config(run)
    except Exception as e:  # any error loading the config is a finding, not a crash
        return [f"targets.{target}: config {run.config} does not load ({e})"]
    d = cfg.data
    out = []
    if d.name != "synthetic" and not (d.get("root") and paths.isdir(paths.expand(d.root))):
        out.append(f"targets.{target}: data root {d.get('root')!r} is not a directory "
                   "(give the study config its data folder, e.g. ...study_revisiting.py:"
                   "data=DIR, or fix data.root in the target's overrides)")
    for field in ("fold_csv_dir", "csv_path"):
        p = d.get(field)
        if p and not paths.exists(p if paths.is_absolute(p) else os.path.join(d.root or "", p)):
            out.append(f"targets.{target}: data.{field}={p!r} not found")
    return out


@functools.lru_cache(maxsize=None)
def param_count(depth: int, width: int, layout: str) -> int:
    """Parameters of the (headless) ResNet, from shapes only (nothing is compiled)."""
    model = resnet.ResNet(depth=depth, layout=layout, width=width, num_classes=None)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, 32, 32, 3), jnp.float32))
    return int(sum(x.size for x in jax.tree_util.tree_leaves(shapes)))


def _examples(cfg) -> Optional[int]:
    d = cfg.data
    return (d.synthetic.num_examples if d.name == "synthetic" else
            d.get("max_examples") or DATASET_SIZES.get(d.name))


def training_images(cfg) -> Optional[int]:
    """Upper bound of images one run trains on (steps x batch, or epochs x 4/5 of N)."""
    t = cfg.train
    if t.get("num_steps"):
        return int(t.num_steps) * int(t.batch_size)
    n = _examples(cfg)
    return int(t.num_epochs * 0.8 * n) if n else None


def run_units(cfg, num_train: Optional[int] = None) -> float:
    """Cost of one run in 224-px training-image equivalents: :func:`training_images`, plus
    a frozen-base head phase's images at 1/3 (forward only through the base), times
    (image_size / 224)^2. An upper bound (early stopping ends runs sooner), which the
    measured seconds per unit absorb. A dataset whose size only its split files know
    (Source Matters' CSVs) needs ``num_train`` (a finished run's), else NaN."""
    t, ex = cfg.train, _examples(cfg)
    epoch = 0.8 * ex if ex else (num_train or math.nan)
    n = t.num_steps * t.batch_size if t.get("num_steps") else t.num_epochs * epoch
    if t.get("freeze") == "two_phase":
        h = t.head_phase
        n += (h.num_steps * t.batch_size if h.get("num_steps") else h.num_epochs * epoch) / 3
    return n * (cfg.data.image_size / 224) ** 2


def finished_run_units(run: sweep.Run) -> float:
    """:func:`run_units` of a finished run, its dataset size read from its results."""
    return run_units(sweep.load_config(run),
                     (sweep.read_results(run.workdir) or {}).get("num_train"))


def _finetune_work(study, parallel: int) -> progress.StageWork:
    """The runs not done, each weighted by :func:`run_units` (NaN if its config fails);
    a target's dataset size unknown from its config is read from a finished run's."""
    runs, items, num_train = study.finetune_runs(), {}, {}
    done = {r.name: r.status() == "done" for r in runs}
    for r in runs:
        if done[r.name] and not num_train.get(r.keys["target"]):
            num_train[r.keys["target"]] = (sweep.read_results(r.workdir) or {}).get("num_train")
    for r in runs:
        if not done[r.name]:
            try:
                items[r.name] = run_units(sweep.load_config(r), num_train.get(r.keys["target"]))
            except Exception:  # check_run_config reports it; the ETA says '?'
                items[r.name] = math.nan
    return progress.StageWork(len(runs), "runs", items=items, parallel=parallel)


def _sources_work(study, parallel: int) -> progress.StageWork:
    """One unit per source to prepare (converted, random, its random twin, pre-trained);
    the pre-training runs are timed one by one."""
    units, items = 0, {}
    for name, spec in study.config.sources.items():
        if not spec.get("weights_of"):
            units += 1 + bool(study.random_twin_dir(name))
            if spec.get("kind") == "pretrain":
                items[f"sources/{name}"] = 1.0
    return progress.StageWork(units, "sources", units - len(items), items, parallel)


def _representations_work(study, tf, cca) -> progress.StageWork:
    """CCA pairs x repeats x images x (image_size / 224)^2 (each draw is a forward pass
    of both networks, the shuffled null's again); the stimuli come from a held-out
    split, so at most ~1/5 of the target's images; the size is the target's own. One
    item per pair (``analyses.item_name``), timed one by one; a layer map
    (``analysis.layer_maps``) is one more item, counted as one repeat over its images."""
    if not cca or not tf:
        return progress.StageWork(0, "pairs")
    first = {}  # target -> its first run, whose config gives the image size and N
    for r in study.finetune_runs():
        first.setdefault(r.keys["target"], r)
    pairs, items, scale = 0, {}, {}
    for target, fold in tf:
        labels = [p[0] for p in analyses.cca_pairs(study, target, fold)]
        try:
            cfg = sweep.load_config(first[target])
            size, ex = cfg.data.image_size, _examples(cfg)
        except Exception:  # reported by check_run_config
            size, ex = math.nan, None
        scale[target] = (size / 224) ** 2, ex
        images = min(cca.num_images, 0.2 * ex) if ex else cca.num_images
        pairs += len(labels)
        items.update({analyses.item_name(target, fold, label):
                      cca.repeats * images * scale[target][0] for label in labels})
    lm = analyses.layer_map_settings(study)
    if lm is not None:  # a map: one pass of both networks over its images (one repeat)
        for name, target, *_ in analyses.map_pairs(study, lm):
            per_px, ex = scale.get(target, (math.nan, None))
            n = int(lm.get("num_images", 128))
            items[name] = (min(n, 0.2 * ex) if ex else n) * per_px
            pairs += 1
    return progress.StageWork(pairs, "pairs", items=items)


def _stage_work(study, stage: str, parallel: int) -> progress.StageWork:
    cfg = study.config
    tf = list(itertools.product(study.clean_targets, study.folds))
    n_src = len(cfg.sources)
    if stage == "sources":
        return _sources_work(study, parallel)
    if stage == "finetune":
        return _finetune_work(study, parallel)
    if stage == "representations":
        return _representations_work(study, tf, cfg.get("analysis", {}).get("cca"))
    if stage == "predictions":   # one item per target: its folds' pairs
        per = n_src * (n_src - 1) // 2 + (n_src - 1 if "random" in cfg.sources else 0)
        return progress.StageWork(per * len(tf), "pairs", items={
            t: float(per * len(study.folds)) for t in study.clean_targets})
    if stage == "filters":
        # filters-only: every source once (one step); else each (pre, fine-tuned) pair
        mparams = param_count(cfg.model.depth, cfg.model.width, cfg.model.layout) / 1e6
        if not cfg.targets:
            return progress.StageWork(n_src, "models", n_src * mparams)
        return progress.StageWork(2 * n_src * len(tf), "models", items={
            analyses.item_name(t, f, s): 2 * mparams for s in cfg.sources for t, f in tf})
    if stage == "robustness":   # one item per target: its runs with a confounder
        n = collections.Counter(r.keys["target"] for r in study.finetune_runs()
                                if r.keys["confounder"] != "none")
        return progress.StageWork(sum(n.values()), "runs",
                                  items={t: float(k) for t, k in n.items()})
    return progress.StageWork(1, "report", 1.0)


def stage_work(study, stages: Sequence[str] = progress.STAGES,
               parallel: int = 1) -> Dict[str, progress.StageWork]:
    """{stage: its work in cost units} (``progress.StageWork``), counted from the config:

    sources: sources to prepare; finetune: 224-px training-image equivalents of the runs
    not done; representations: CCA pairs x repeats x 224-px image equivalents;
    predictions: prediction-file pairs; filters: millions of parameters whose filters
    are analysed; robustness: runs with a confounder; report: 1. The analysis stages'
    units sit in ``items`` named as their loops name them (``analyses.item_name``, a
    target), each timed as it finishes. ``parallel``: runs at once (sources, finetune).
    A stage that cannot be counted gets NaN units ('?').
    """
    out = {}
    for stage in stages:
        try:
            out[stage] = _stage_work(study, stage, parallel)
        except Exception as e:  # an ETA must never stop a study
            logging.warning("study ETA: cannot count the work of stage %s (%s)", stage, e)
            out[stage] = progress.StageWork(0, "items", math.nan)
    return out


def estimate(study) -> tuple:
    """({stage: seconds}, {stage: 'measured'|'prior'|'none'}) of the stages not done, at
    the rates this workdir measured; two empty dicts when it measured none."""
    rates = progress.Rates.load(study.path(*progress.RATES_FILE))
    if not rates.measured:
        return {}, {}
    parallel = study.parallel if getattr(study, "mode", "") == "subprocess" else 1
    todo = [s for s in progress.STAGES if not study.is_done(s)]
    work = stage_work(study, todo, parallel)
    return ({s: progress.stage_eta(w, rates, s) for s, w in work.items()},
            {s: rates.source(s) for s in todo})


def _free_bytes(path: str) -> int:
    """Free bytes on the disk holding ``path`` (its nearest existing parent); a bucket has
    no such limit (quota is not checked)."""
    if paths.is_remote(path):
        return UNLIMITED
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def check(study) -> Preflight:
    """Checks a study (see module docstring); never trains or writes anything."""
    cfg = study.config
    missing = []
    for name, spec in cfg.sources.items():
        missing += check_source(name, spec, study.source_dir(name))
        if spec.get("weights_of") and spec.weights_of not in cfg.sources:
            missing.append(f"sources.{name}.weights_of={spec.weights_of}: no such source")
    runs = study.finetune_runs()
    todo = [r for r in runs if r.status() != "done"]
    images, grid = 0, []
    for target in cfg.targets:
        trs = [r for r in runs if r.keys["target"] == target]
        missing += check_run_config(target, trs[0]) if trs else []
        try:
            per_run = training_images(sweep.load_config(trs[0])) if trs else 0
        except Exception:  # already reported by check_run_config
            per_run = None
        left = sum(r in todo for r in trs)
        images = None if images is None or per_run is None else images + left * per_run
        grid.append(f"{target}: {len(trs)} runs ({len(trs) - left} done) = sources "
                    f"{list(cfg.sources)} x folds {study.folds} x settings "
                    f"{len(trs) // max(len(cfg.sources) * len(study.folds), 1)}, "
                    f"<= {per_run if per_run is not None else '?'} images/run")
    m = cfg.model
    need = len(todo) * param_count(m.depth, m.width, m.layout) * BYTES_PER_PARAM
    free = _free_bytes(study.workdir)
    if need > free:
        missing.append(f"disk space: ~{need / 1e9:.1f} GB needed under {study.workdir}, "
                       f"{free / 1e9:.1f} GB free")
    eta, basis = estimate(study)
    return Preflight(missing, len(runs), len(runs) - len(todo), images, need, free, grid,
                     eta, basis)
