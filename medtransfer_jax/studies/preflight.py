"""Pre-flight of a study: everything it needs, checked before the first of its runs.

A real study is 100+ runs over hours; a missing data root or a mistyped checkpoint path
should stop it in the first second with one message listing *everything* missing, not
after the first 40 runs. :func:`check` looks at every source (weights dirs, ``.h5`` files
to convert and their file signatures, pre-training configs), every target (its run config
loads; its data root has the dataset's layout, as the parser that builds the run's source
sees it, listing files without decoding any; every fold's CSV files exist; the folds are
within the protocol) and the free disk space against an estimate of what the runs write,
and describes the grid (runs, runs already done, images processed at most: the training
splits' sizes from the fold CSVs where a run splits by them). Each finding names the
study config argument that fixes it (``configs/study_source_matters.py:nih=DIR``) when
the config records it (``studies/study_args.py``).
:func:`stage_work` counts each stage's work in the units of the study's cost model
(``progress.py``); with rates measured earlier in the same workdir the pre-flight adds
a time estimate.

It reads a study object (``config``, ``path()``, ``source_dir()``, ``finetune_runs()``,
``folds``, ``clean_targets``, ``random_twin_dir()``, ``is_done()``, ``mode``,
``parallel``) and never imports the runner.
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
import zipfile
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp

from medtransfer_jax import paths
from medtransfer_jax.configs import study_options
from medtransfer_jax.data import builders, splits
from medtransfer_jax.data.base import DataError
from medtransfer_jax.analysis import layer_map as layer_map_lib
from medtransfer_jax.analysis import similarity as sim
from medtransfer_jax.inference import activations as act
from medtransfer_jax.models import resnet
from medtransfer_jax.studies import analyses, progress, study_args
from medtransfer_jax.training import phases, sweep
from medtransfer_jax.weights import _common as weights_common
from medtransfer_jax.weights import checkpoint
from medtransfer_jax.weights.checkpoint import CheckpointError

#: Examples per dataset (REFERENCE / the papers), for the images-processed estimate.
DATASET_SIZES = {"chest": 5856, "breast": 780, "thyroid": 480, "mammograms": 3568,
                 "knee": 5222, "isic": 10015, "pcam": 10000}
#: Bytes per parameter of a run's 3 orbax checkpoints (max_to_keep=2 + best) of params +
#: Adam's two moments (3 x 4 bytes each): on disk while it runs, and after it unless
#: ``checkpoint.keep_when_done``.
CHECKPOINT_BYTES_PER_PARAM = 3 * 3 * 4
#: Bytes per parameter a finished run keeps: export/best and export/last, float32.
EXPORT_BYTES_PER_PARAM = 2 * 4
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
        imgs = (f"<= {self.images:,} training images to process" if self.images is not None
                else "training images to process: unknown until the data is there")
        free = ("a bucket: no disk limit" if self.bytes_free >= UNLIMITED
                else f"{self.bytes_free / 1e9:.1f} GB free")
        lines = [f"[study] pre-flight: {self.runs} fine-tuning runs ({self.runs_done} done), "
                 f"{imgs}, ~{self.bytes_needed / 1e9:.1f} GB to "
                 f"write ({free})"]
        lines += [f"[study]   {g}" for g in self.grid]
        lines += [self.estimate_line()] if self.estimate else []
        lines += [f"[study] MISSING: {m}" for m in self.missing] or ["[study] pre-flight: ok"]
        return "\n".join(lines)

    def error_message(self) -> str:
        more = len(self.missing) - 1
        return (f"{len(self.missing)} thing(s) missing before the study can start: "
                + self.missing[0]
                + (f"; and {more} more (the MISSING lines above)" if more else "")
                + ". Fix them (config args or --config.<field>=...) and rerun; nothing was "
                "trained.")


#: What each source format's reader opens, by the file's first bytes (``sniff``): a Keras
#: .h5 (or a Keras 3 .keras zip), a torch.save zip or a legacy pickle.
READABLE = {"keras_h5": ("hdf5", "zip"), "torchvision": ("zip", "pickle")}
WHAT = {"keras_h5": "a Keras .h5 weights file", "torchvision": "a PyTorch .pth/.pt state dict"}
#: The member a readable zip of each format holds (a name ending so).
ZIP_MEMBER = {"keras_h5": "model.weights.h5", "torchvision": "data.pkl"}


def checkpoint_problem(path: str, fmt: str) -> Optional[str]:
    """Why the ``fmt`` reader (``weights/keras_h5.py``, ``torchvision.py``) would reject
    ``path``, from its first 8 bytes and, for a local zip, its directory; None if it
    looks right. Cheap: no weights are read."""
    try:
        path = weights_common.check_input_file(path, WHAT.get(fmt, "checkpoint"))
        kind = weights_common.sniff(path)
    except CheckpointError as e:
        return str(e).rstrip(".")
    except OSError as e:
        return f"{path} cannot be read ({e})"
    if kind not in READABLE.get(fmt, (kind,)):
        with paths.open(path, "rb") as f:
            head = f.read(8)
        lacks = "no HDF5 signature" if fmt == "keras_h5" else "neither a zip nor a pickle"
        return f"{path} is not {WHAT[fmt]} ({lacks}: it starts with {head!r})"
    if kind == "zip" and not paths.is_remote(path):
        try:
            with zipfile.ZipFile(path) as z:
                ok = any(n.endswith(ZIP_MEMBER[fmt]) for n in z.namelist())
        except (zipfile.BadZipFile, OSError) as e:
            return f"{path} is a damaged zip ({e}); download it again"
        if not ok:
            return f"{path} is a zip without {ZIP_MEMBER[fmt]}, so not {WHAT[fmt]}"
    return None


def _fix(hint: Optional[str], fallback: str) -> str:
    return f"give {hint}" if hint else fallback


def _who(target: str) -> str:
    """The line's subject: ``targets.<target>: `` in a study, nothing for one run ('')."""
    return f"targets.{target}: " if target else ""


def check_source(name: str, spec, source_dir: str, info=None) -> List[str]:
    """What a source lacks: a weights dir, a readable input file to convert (HDF5 / zip /
    pickle signature), a pre-train config. ``info``: the study config's ``args``, whose
    argument (the source's ``study_arg``) the hint names."""
    if spec.get("weights_of"):
        return []
    hint = study_args.usage(info, spec.get("study_arg"),
                            "DIR" if spec.kind == "weights" else "FILE")
    if spec.kind == "weights" and not paths.exists(paths.join(source_dir,
                                                               checkpoint.METADATA_FILE)):
        return [f"sources.{name}.path={spec.path}: no weights dir ({checkpoint.METADATA_FILE} "
                "missing); convert the checkpoint with medtransfer_jax.convert"
                + (f" or give {hint}" if hint else "")]
    if spec.kind == "convert":
        if paths.exists(paths.join(source_dir, checkpoint.METADATA_FILE)):
            return []
        fix = _fix(hint, f"fix sources.{name}.input in the study config")
        if not paths.isfile(paths.expand(str(spec.input))):
            return [f"sources.{name}.input={spec.input}: checkpoint file not found ({fix})"]
        problem = checkpoint_problem(paths.expand(str(spec.input)), spec.get("format", ""))
        if problem:
            what = WHAT.get(spec.get("format"), "a checkpoint file")
            return [f"sources.{name}.input: {problem} ({fix} with {what})"]
    if spec.kind == "pretrain" and not os.path.isfile(spec.config.partition(":")[0]):
        return [f"sources.{name}.config={spec.config}: config file not found"]
    return []


def layout_problem(d) -> Optional[str]:
    """The first line of the dataset parser's complaint about ``d.root`` (the check each
    run makes when it builds its source: folders, CSV, listed files exist), or None.
    Lists folders and reads the label files only; decodes no image."""
    if d.name not in builders.BUILDERS or d.get("tfds_data_dir"):
        return None
    listing = paths.Listings()
    try:
        found = builders.get_builder(d.name).examples(paths.expand(d.root), d, listing)
        missing = ([] if d.get("skip_corrupt") else
                   paths.missing_files((ex.path for ex in found), listing))
    except DataError as e:
        return str(e).splitlines()[0].rstrip(". ")
    except Exception as e:  # noqa: BLE001 -- any parser failure is a finding, not a crash
        return f"{d.name}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    if missing:
        return (f"{d.name}: {len(missing)} of {len(found)} listed files do not exist, e.g. "
                f"{missing[0]}")
    return None


def check_data(target: str, d, hint: Optional[str], layouts: Dict) -> List[str]:
    """A target's data root: a directory with the dataset's layout (``layouts``: results
    by (name, root), so targets sharing a dataset parse it once). ``hint``: the study
    config argument that sets the root."""
    if d.name == "synthetic":
        return []
    fix = _fix(hint, "fix data.root in the target's overrides")
    if not (d.get("root") and paths.isdir(paths.expand(d.root))):
        return [f"{_who(target)}data root {d.get('root')!r} is not a directory ({fix})"]
    key = (d.name, d.root)
    if key not in layouts:
        layouts[key] = layout_problem(d)
    if layouts[key]:
        return [f"{_who(target)}{layouts[key]} ({fix}; the layout: "
                f"medtransfer_jax.data.builders.instructions({d.name!r}))"]
    return []


def check_fold_csvs(target: str, d, folds: Sequence[int], hint: Optional[str]) -> List[str]:
    """With ``data.folds='paper'``: the folder and the first per-fold file a run of
    ``folds`` would read that is missing (``splits.read_fold_csvs``' names:
    ``{train,val}_fold{K+1}.csv``, and ``test_fold{K+1}.csv`` where the folder has
    test files per fold); folds outside the protocol are :func:`check_folds`' report."""
    if d.get("folds", "kfold") != "paper":
        return []
    where = d.get("fold_csv_origin") or "the paper repository's data/<task>/ folder"
    fix = (f"give {hint}, the CSVs from {where}" if hint else f"get them from {where}")
    csv_dir = d.get("fold_csv_dir")
    if not csv_dir or not paths.isdir(paths.expand(csv_dir)):
        return [f"{_who(target)}data.fold_csv_dir={csv_dir!r} not found: runs split by "
                f"the paper's fold CSVs ({fix})"]
    csv_dir = paths.expand(csv_dir)
    names = set(paths.Listings().names(csv_dir))
    per_fold_test = any(n.startswith("test_fold") for n in names)
    for fold in (f for f in folds if 0 <= f < d.num_folds):
        want = [splits.fold_csv_name(s, fold) for s in ("train", "val")
                + (("test",) if per_fold_test else ())]
        absent = [w for w in want if w not in names]
        if absent:
            return [f"{_who(target)}fold CSV {os.path.join(csv_dir, absent[0])} not found "
                    f"(fold {fold} reads {', '.join(want)}; {fix})"]
    test = d.get("fold_csv_test")
    if test and not paths.isfile(paths.expand(test)):
        return [f"{_who(target)}data.fold_csv_test={test!r} not found (the test CSV "
                f"every fold reads; {fix})"]
    return []


def run_problems(cfg) -> List[str]:
    """What one training run lacks, all at once (the ``train`` main asks when a run stops
    on a missing input, so a user fixes everything in one go, as the study's pre-flight
    lets them): the data root and its layout, its fold's CSVs, a ``model.init`` weights
    directory. Lists folders and label files only."""
    d = cfg.data
    out = check_data("", d, "--config.data.root=DIR", {})
    out += check_fold_csvs("", d, [int(d.get("fold", 0))], "--config.data.fold_csv_dir=DIR")
    init = cfg.model.get("init") or "random"
    if init != "random" and not paths.exists(paths.join(paths.expand(init),
                                                        checkpoint.METADATA_FILE)):
        out.append(f"model.init={init}: not a weights directory ({checkpoint.METADATA_FILE} "
                   "missing); convert the checkpoint with medtransfer_jax.convert")
    return out


def check_folds(study, d) -> Optional[str]:
    """The study's folds outside ``[0, data.num_folds)`` of a target's protocol, or None
    (one message for every target with that protocol)."""
    bad = [f for f in study.folds if not 0 <= f < d.num_folds]
    if not bad:
        return None
    info = study.config.get("args")
    fix = (f"e.g. {info['config']}:folds=0,1" if info else "fix the study config's folds")
    return (f"folds {bad}: outside the protocol's {d.num_folds} folds (0-{d.num_folds - 1}, "
            f"0-based; {fix})")


def _target_hint(study, target: str, field: str) -> Optional[str]:
    """``configs/study_X.py:ARG=DIR`` for the study argument behind ``data.<field>``."""
    return study_args.usage(study.config.get("args"),
                            study.config.targets[target].get("from_args", {}).get(field))


def check_run_config(study, target: str, run: sweep.Run,
                     layouts: Optional[Dict] = None) -> List[str]:
    """What a target's run config needs that is not there: the config loads; data root
    and its layout; fold CSVs of every study fold; folds within the protocol; csv_path."""
    try:
        cfg = sweep.load_config(run)
    except Exception as e:  # any error loading the config is a finding, not a crash
        return [f"targets.{target}: config {run.config} does not load ({e})"]
    d = cfg.data
    out = check_data(target, d, _target_hint(study, target, "root"),
                     {} if layouts is None else layouts)
    out += check_fold_csvs(target, d, study.folds, _target_hint(study, target, "fold_csv_dir"))
    folds = check_folds(study, d)
    out += [folds] if folds else []
    p = d.get("csv_path")
    if p and not paths.exists(p if paths.is_absolute(p) else os.path.join(d.root or "", p)):
        out.append(f"targets.{target}: data.csv_path={p!r} not found")
    return out


def disk_needed(study, todo: Sequence[sweep.Run], params: int) -> int:
    """Bytes the runs left write: their exports, plus the checkpoints of the runs that
    keep them when done (``checkpoint.keep_when_done``, read from each target's first
    run config) and of the runs in flight at once."""
    keeps = {}
    for r in todo:
        if r.keys["target"] not in keeps:
            keeps[r.keys["target"]] = _keeps_checkpoints(r)
    keep = sum(keeps[r.keys["target"]] for r in todo)
    at_once = study.parallel if getattr(study, "mode", "inprocess") == "subprocess" else 1
    in_flight = min(len(todo) - keep, at_once)
    return params * (len(todo) * EXPORT_BYTES_PER_PARAM
                     + (keep + in_flight) * CHECKPOINT_BYTES_PER_PARAM)


def _keeps_checkpoints(run: sweep.Run) -> bool:
    try:
        return bool(sweep.load_config(run).checkpoint.get("keep_when_done", False))
    except Exception:  # noqa: BLE001 -- a config that does not load is reported elsewhere
        return False


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


def csv_train_size(d, fold: int) -> Optional[int]:
    """Rows of the paper's ``train_fold{K+1}.csv`` a run of ``fold`` trains on (with
    ``data.folds='paper'``), or None when that file is not there (yet)."""
    if d.get("folds", "kfold") != "paper" or not d.get("fold_csv_dir"):
        return None
    path = os.path.join(paths.expand(d.fold_csv_dir), splits.fold_csv_name("train", fold))
    try:
        return len(splits.read_fold_csv(path)) if paths.isfile(path) else None
    except (DataError, OSError, UnicodeDecodeError):
        return None


def epoch_images(cfg, num_train: Optional[int] = None) -> float:
    """Images one epoch trains on: its steps (``train.epoch_steps``, as the run counts
    them: ``phases.steps_per_epoch``) x the batch. The training split is ``num_train``
    (e.g. :func:`csv_train_size`, a finished run's), else 4/5 of the dataset's N; NaN when
    neither is known (Source Matters' CSVs before they exist)."""
    ex = _examples(cfg)
    n = num_train or (0.8 * ex if ex else None)
    if not n:
        return math.nan
    t = cfg.train
    return float(phases.steps_per_epoch(int(n), int(t.batch_size),
                                        t.get("epoch_steps", "floor")) * int(t.batch_size))


def training_images(cfg, num_train: Optional[int] = None) -> Optional[int]:
    """Upper bound of images one run trains on: steps x batch, or epochs x
    :func:`epoch_images`; None when unknown."""
    t = cfg.train
    if t.get("num_steps"):
        return int(t.num_steps) * int(t.batch_size)
    n = t.num_epochs * epoch_images(cfg, num_train)
    return int(n) if math.isfinite(n) else None


def run_units(cfg, num_train: Optional[int] = None) -> float:
    """Cost of one run in 224-px training-image equivalents: :func:`training_images`, plus
    a frozen-base head phase's images at 1/3 (forward only through the base), times
    (image_size / 224)^2. An upper bound (early stopping ends runs sooner), which the
    measured seconds per unit absorb. A dataset whose size only its split files know
    (Source Matters' CSVs) needs ``num_train`` (a finished run's), else NaN."""
    t, epoch = cfg.train, epoch_images(cfg, num_train)
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
                cfg = sweep.load_config(r)
                n = num_train.get(r.keys["target"]) or csv_train_size(cfg.data, cfg.data.fold)
                items[r.name] = run_units(cfg, n)
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
        items = {analyses.item_name(t, f, s): 2 * mparams for s in cfg.sources for t, f in tf}
        if analyses.option(study, "filters.basis") == "study" and tf:
            # two passes that load and scale each model: ~1/5 of a pair's work per model
            # and pass (ResNet50 on 2 CPU cores, BENCHMARKS.md section 9: 0.68 s per model
            # and pass against ~6 s per pair)
            n = len(analyses.filter_models(study, tf))
            items[analyses.basis_item_name(n)] = 2 * n * mparams * 0.2
        return progress.StageWork(2 * n_src * len(tf), "models", items=items)
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


def _target_images(target: str, trs: List[sweep.Run], todo) -> tuple:
    """(images the target's runs not done train on at most, the most one run does), each
    None when unknown (no config, or a dataset size only its missing fold CSVs know)."""
    try:
        cfg = sweep.load_config(trs[0])
    except Exception:  # already reported by check_run_config
        return None, None
    per_fold = {f: training_images(cfg, csv_train_size(cfg.data, f))
                for f in {r.keys["fold"] for r in trs}}
    if any(v is None for v in per_fold.values()):
        return None, None
    return (sum(per_fold[r.keys["fold"]] for r in trs if r in todo),
            max(per_fold.values(), default=0))


def config_problems(study) -> List[str]:
    """The analysis settings outside their choices (study_options) or ranges (the cca and
    layer-map sections): checked at every start, also of a study whose training is done."""
    return study_options.problems(study.config) + check_analysis_sections(study)


def _int_at_least(section: str, key: str, value, low: int) -> List[str]:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        return [f"{section}.{key}={value!r}; use an integer >= {low}"]
    return []


#: analysis.cca's fields: those the stage reads by name, then the optional ones.
CCA_FIELDS = ("methods", "spatial", "positions", "num_channels", "repeats", "seed",
              "num_images")
CCA_OPTIONAL = ("between", "pairs", "random_vs_random")
#: analysis.layer_maps' fields (all optional but ``comparisons``).
MAP_FIELDS = ("comparisons", "methods", "num_images", "spatial", "folds", "max_channels", "seed")


def _fields(section: str, given, required: Sequence[str], optional: Sequence[str]) -> List[str]:
    """A section's unknown fields (a typo would be ignored) and missing required ones."""
    known = tuple(required) + tuple(optional)
    out = [f"{section} has no field {k!r}; its fields: {', '.join(known)}"
           for k in given if k not in known]
    return out + [f"{section}.{k} is not set" for k in required if k not in given]


def check_analysis_sections(study) -> List[str]:
    """``analysis.cca`` and ``analysis.layer_maps`` (the sections that turn the
    representations stage and the maps on): each value outside its choices or range, and
    each source or fold they name that the study has not, one line each. Why here: these
    are read only after the fine-tuning stage, where a typo used to stop a study that had
    trained for hours."""
    cfg, out = study.config, []
    sources, folds = list(cfg.sources), list(study.folds)
    cca = cfg.get("analysis", {}).get("cca", None)
    if cca:
        sec = "analysis.cca"
        out += _fields(sec, list(cca), CCA_FIELDS, CCA_OPTIONAL)
        methods = list(cca.get("methods", None) or ())
        bad = [m for m in methods if m not in sim.METHODS]
        if bad or not methods:
            out.append(f"{sec}.methods={methods}: " + (f"{bad} unknown" if bad else "none given")
                       + f"; use some of {list(sim.METHODS)}")
        if cca.get("spatial", "positions") not in act.SPATIAL_MODES:
            out.append(f"{sec}.spatial={cca.spatial!r}; use one of {list(act.SPATIAL_MODES)}")
        for key, low in (("positions", 1), ("repeats", 1), ("num_images", 2)):
            if key in cca:
                out += _int_at_least(sec, key, cca[key], low)
        if cca.get("num_channels", None) is not None:
            out += _int_at_least(sec, "num_channels", cca.num_channels, 1)
        for pair in cca.get("between", None) or ():
            unknown = [s for s in pair if s not in sources]
            if len(pair) != 2 or unknown:
                out.append(f"{sec}.between: {list(pair)}: give two of the study's sources "
                           f"{sources}")
        for pair in cca.get("pairs", None) or ():
            if (len(pair) != 4 or any(s not in sources for s in pair[::2])
                    or any(st not in ("pre", "fine-tuned") for st in pair[1::2])):
                out.append(f"{sec}.pairs: {list(pair)}: give [source, stage, source, stage] "
                           f"with sources from {sources} and stage 'pre' or 'fine-tuned'")
    lm = cfg.get("analysis", {}).get("layer_maps", None)
    if lm and lm.get("comparisons", None):
        sec = "analysis.layer_maps"
        out += _fields(sec, list(lm), ("comparisons",), MAP_FIELDS[1:])
        bad = [c for c in lm.comparisons if c not in analyses.SIMILARITY_PANELS]
        if bad:
            out.append(f"{sec}.comparisons: {bad} unknown; use some of "
                       f"{list(analyses.SIMILARITY_PANELS)}")
        methods = list(lm.get("methods", None) or layer_map_lib.DEFAULT_MAP_METHODS)
        bad = [m for m in methods if m not in layer_map_lib.MAP_METHODS]
        if bad:
            out.append(f"{sec}.methods: {bad} cannot be mapped; use some of "
                       f"{list(layer_map_lib.MAP_METHODS)}")
        if lm.get("spatial", "pool") not in layer_map_lib.MAP_SPATIAL:
            out.append(f"{sec}.spatial={lm.spatial!r}; use one of {list(layer_map_lib.MAP_SPATIAL)}")
        if "num_images" in lm:
            out += _int_at_least(sec, "num_images", lm.num_images, 4)
        bad = [f for f in (lm.get("folds", None) or ()) if f not in folds]
        if bad:
            out.append(f"{sec}.folds: {bad} not among the study's folds {folds}; give some "
                       f"of them (--config.{sec}.folds=\"({folds[0]},)\")")
    return out


def check(study) -> Preflight:
    """Checks a study (see module docstring); never trains or writes anything."""
    cfg = study.config
    missing = []
    for name, spec in cfg.sources.items():
        missing += check_source(name, spec, study.source_dir(name), cfg.get("args"))
        if spec.get("weights_of") and spec.weights_of not in cfg.sources:
            missing.append(f"sources.{name}.weights_of={spec.weights_of}: no such source")
    missing += config_problems(study)
    runs = study.finetune_runs()
    todo = [r for r in runs if r.status() != "done"]
    images, grid, layouts = 0, [], {}
    for target in cfg.targets:
        trs = [r for r in runs if r.keys["target"] == target]
        if trs:
            missing += [m for m in check_run_config(study, target, trs[0], layouts)
                        if m not in missing]   # a fold range is said once per study
        left_images, per_run = _target_images(target, trs, todo) if trs else (0, 0)
        images = None if images is None or left_images is None else images + left_images
        left = sum(r in todo for r in trs)
        grid.append(f"{target}: {len(trs)} runs ({len(trs) - left} done) = sources "
                    f"{list(cfg.sources)} x folds {study.folds} x settings "
                    f"{len(trs) // max(len(cfg.sources) * len(study.folds), 1)}"
                    + (f", <= {per_run:,} images/run" if per_run is not None else ""))
    m = cfg.model
    need = disk_needed(study, todo, param_count(m.depth, m.width, m.layout))
    free = _free_bytes(study.workdir)
    if need > free:
        missing.append(f"disk space: ~{need / 1e9:.1f} GB needed under {study.workdir}, "
                       f"{free / 1e9:.1f} GB free")
    eta, basis = estimate(study)
    return Preflight(missing, len(runs), len(runs) - len(todo), images, need, free, grid,
                     eta, basis)
