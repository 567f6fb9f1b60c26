"""Pre-flight of a study: everything it needs, checked before the first of its runs.

A real study is 100+ runs over hours; a missing data root or a mistyped checkpoint path
should stop it in the first second with one message listing *everything* missing, not
after the first 40 runs. :func:`check` looks at every source (weights dirs, ``.h5`` files
to convert, pre-training configs), every target (its run config loads; data root, fold
CSVs and CSV files exist) and the free disk space against an estimate of what the runs
write, and describes the grid (runs, runs already done, images processed at most).

It reads a study object (``config``, ``path()``, ``source_dir()``, ``finetune_runs()``)
and never imports the runner.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from typing import List, Optional

import jax
import jax.numpy as jnp

from medtransfer_jax import paths
from medtransfer_jax.models import resnet
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

    def text(self) -> str:
        """The grid and what is missing, for a person (``--dry_run`` prints this)."""
        imgs = f"{self.images:,}" if self.images is not None else "unknown"
        free = ("a bucket: no disk limit" if self.bytes_free >= UNLIMITED
                else f"{self.bytes_free / 1e9:.1f} GB free")
        lines = [f"[study] pre-flight: {self.runs} fine-tuning runs ({self.runs_done} done), "
                 f"<= {imgs} training images to process, ~{self.bytes_needed / 1e9:.1f} GB to "
                 f"write ({free})"]
        lines += [f"[study]   {g}" for g in self.grid]
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


def training_images(cfg) -> Optional[int]:
    """Upper bound of images one run trains on (steps x batch, or epochs x 4/5 of N)."""
    t = cfg.train
    if t.get("num_steps"):
        return int(t.num_steps) * int(t.batch_size)
    d = cfg.data
    n = (d.synthetic.num_examples if d.name == "synthetic" else
         d.get("max_examples") or DATASET_SIZES.get(d.name))
    return int(t.num_epochs * 0.8 * n) if n else None


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
    return Preflight(missing, len(runs), len(runs) - len(todo), images, need, free, grid)
