"""A whole study as one resumable chain of stages.

    sources -> finetune -> representations -> predictions -> filters -> robustness -> report

Each stage reads what earlier stages wrote under ``WORKDIR`` and writes its own files;
a finished stage leaves ``WORKDIR/stages/<stage>.done`` and is skipped on a rerun, and
the fine-tuning stage delegates to the sweep runner, whose runs resume from their own
checkpoints. So an interrupted study continues where it stopped, and any stage can be
forced again with ``--stages=<name> --force``.

The study config (``configs/study_*.py``) names:

* ``sources``: ``{name: {kind, ...}}`` with kind ``weights`` (an existing weights dir,
  ``path``), ``convert`` (``format`` + ``input``, converted once), ``pretrain`` (a
  training config + overrides; its exported weights become the source, as the demo's
  stand-ins for ImageNet/RadImageNet) or ``random`` (a seeded random init, saved, so
  the "before fine-tuning" network of the random baseline exists on disk too).
  A source may add ``about`` (one sentence on where its weights come from, for the
  report; default: said from its kind), ``arg`` (appended to every target's config
  argument, e.g. ``imagenet,freeze=true`` for the Revisiting "frozen first" variant) and
  ``weights_of`` (reuse another source's weights dir: ``imagenet_frz`` starts from
  ``imagenet``).
* ``targets``: ``{name: {config, overrides[, confounders][, clean]}}`` training configs
  (``path.py`` or ``path.py:arg``); a target's own ``confounders`` replace the study's,
  ``clean=False`` drops its no-confounder run. Empty for a filters-only study.
* ``folds``, ``confounders`` (a list of ``{kind, ps}``; empty for Revisiting-style
  studies), ``model`` (depth/width/layout shared by sources and targets), ``analysis``
  (``cca``, ``layer_maps`` (optional layer x layer maps per pair), and the options of
  ``configs/study_options.py``: ``auc_metric``, ``bootstrap``, ``fold_plot``, ...),
  ``published`` (which paper's numbers
  the report compares with, ``studies/published.json``).

Progress: one line per finished run (``run 7/175 breast/imagenet/fold2: test AUC
0.912, 41 s, ETA 1h12m``) followed by the stage and overall ETA (``[study] stage 2/7
finetune (175 runs): stage ETA 1h12m, overall ETA 1h31m``), also printed at each stage's
start; the analysis stages print one line per finished item (a CCA pair, a filter pair,
...) with both ETAs on it (``progress.StageItems``). The cost model and its rates
(``WORKDIR/stages/rates.json``) are in ``progress.py``. The report stage writes what
exists at any time but is only marked done once every other stage is, so a report made
mid-study is rebuilt later.
Before any training, :func:`preflight` checks data roots, checkpoint files and disk
space and lists everything missing at once (``--dry_run`` stops there).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import itertools
import math
import os
import time
from typing import Dict, List, Optional, Sequence

import jax
import ml_collections

from medtransfer_jax import interrupts, paths, provenance
from medtransfer_jax.errors import UserError
from medtransfer_jax.models import resnet
from medtransfer_jax.studies import analyses, preflight as preflight_lib, progress, report
from medtransfer_jax.training import sweep
from medtransfer_jax.weights import checkpoint
from medtransfer_jax.weights.checkpoint import CheckpointError
from medtransfer_jax.weights import conversion as convert_lib

STAGES = progress.STAGES
#: The stages each stage reads: it runs only once they (and what they need) are done or
#: run before it in the same call (robustness over untrained runs wrote NaN rows and
#: marked itself done).
NEEDS = {"finetune": ("sources",), "representations": ("sources", "finetune"),
         "predictions": ("finetune",), "filters": ("sources", "finetune"),
         "robustness": ("finetune",)}
SOURCE_KINDS = ("weights", "convert", "pretrain", "random")


class StudyError(UserError):
    """A study config or workdir that cannot be used; the message says how to fix it."""


class Study:
    """Paths and grid of one study; each stage is one call into ``analyses``/``report``."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
                 mode: str = "inprocess", parallel: int = 1,
                 gpu_slots: Sequence[str] = ()):
        if not config.get("sources"):
            raise StudyError("study config has no `sources`.")
        bad = {n: s.get("kind") for n, s in config.sources.items()
               if s.get("kind") not in SOURCE_KINDS and not s.get("weights_of")}
        if bad:
            raise StudyError(f"sources {bad}: kind must be one of {SOURCE_KINDS} (or give "
                             "weights_of=<another source>).")
        if not config.get("targets"):  # a filters-only study fine-tunes nothing
            with config.unlocked():
                config.targets = ml_collections.ConfigDict()
        self.config = config
        self.workdir = paths.to_str(paths.workdir(workdir))  # gs:// stays a URL
        if gpu_slots and mode != "subprocess":
            raise StudyError("--gpu_slots applies to --mode=subprocess only (a slot is the "
                             "GPU(s) of one run's process; --mode=inprocess runs one run at a "
                             "time in this process); add --mode=subprocess or leave it out")
        self.mode = mode
        # one subprocess run per slot at a time (sweep.RunEnvs): as many at once as slots
        self.gpu_slots = [str(s) for s in gpu_slots]
        self.parallel = len(self.gpu_slots) or parallel
        self.tracker: Optional[progress.StudyProgress] = None  # set while run() runs

    # -- layout
    def path(self, *parts) -> str:
        """``WORKDIR/part/...`` as a string (a URL for a ``gs://`` study)."""
        return paths.to_str(paths.join(self.workdir, *parts))

    def source_dir(self, source: str) -> str:
        """The pre-trained ("before fine-tuning") weights directory of ``source``."""
        spec = self.config.sources[source]
        if spec.get("weights_of"):
            return self.source_dir(spec.weights_of)
        if spec.kind == "weights":
            return paths.to_str(paths.workdir(spec.path))
        if spec.kind == "pretrain":
            return self.path("sources", source, "run", "export", "best")
        return self.path("sources", source, "weights")

    def random_twin_dir(self, source: str) -> Optional[str]:
        """A second seeded random init beside a ``random`` source (the random-vs-random
        CCA baseline), or None for other sources or when the config turns it off."""
        spec = self.config.sources[source]
        cca = self.config.get("analysis", {}).get("cca", {})
        if spec.get("kind") != "random" or spec.get("weights_of") or not cca.get(
                "random_vs_random", True):
            return None
        return self.path("sources", f"{source}_twin", "weights")

    @property
    def folds(self) -> List[int]:
        return list(self.config.folds)

    def target_config(self, target: str, source: Optional[str] = None) -> str:
        """``path.py[:arg]`` of a target's run, the source's ``arg`` appended."""
        path, _, arg = self.config.targets[target].config.partition(":")
        src_arg = self.config.sources[source].get("arg", "") if source else ""
        args = ",".join(a for a in (arg, src_arg) if a)
        return f"{path}:{args}" if args else path

    def _settings(self, target: str):
        tspec = self.config.targets[target]
        settings = [(None, None)] if tspec.get("clean", True) else []
        confs = tspec.get("confounders", None)
        for conf in (self.config.get("confounders", []) or []) if confs is None else confs:
            settings += [(conf.kind, p) for p in conf.ps]
        return settings

    def finetune_runs(self) -> List[sweep.Run]:
        """target x source x fold (x confounder kind x p): sweep runs."""
        runs = []
        model_ov = [f"model.{k}={v}" for k, v in self.config.model.items()]
        for target, tspec in self.config.targets.items():
            for source, fold, (kind, p) in itertools.product(self.config.sources, self.folds,
                                                               self._settings(target)):
                ov = list(tspec.get("overrides", [])) + model_ov + [
                    f"model.init={self.source_dir(source)}", f"data.fold={fold}"]
                keys = {"target": target, "source": source, "fold": fold,
                        "confounder": kind or "none", "p": p if p is not None else ""}
                name = f"{target}/{source}"
                if kind:
                    name += f"/{kind}-p{p:g}"
                    ov += [f"data.confounder.kind={kind}", f"data.confounder.p={p}"]
                name += f"/fold{fold}"
                runs.append(sweep.Run(name, self.target_config(target, source),
                                      self.path("finetune", name), ov, keys))
        return runs

    @property
    def clean_targets(self) -> List[str]:
        """Targets with a no-confounder run per source and fold: the ones the
        representation, prediction and filter analyses compare."""
        return [t for t, spec in self.config.targets.items() if spec.get("clean", True)]

    def run_dir(self, target: str, source: str, fold: int) -> str:
        return self.path("finetune", target, source, f"fold{fold}")

    def fine_tuned_dir(self, target: str, source: str, *, fold: int,
                       export: bool = True) -> str:
        """The clean run's exported best weights (or its workdir with ``export=False``)."""
        d = self.run_dir(target, source, fold)
        return paths.to_str(paths.join(d, "export", "best")) if export else d

    # -- stage bookkeeping
    def _marker(self, stage: str) -> str:
        return self.path("stages", f"{stage}.done")

    def config_fingerprint(self) -> str:
        """12 hex digits of the study config (every field, sorted): a stage's marker keeps
        the fingerprint it was done with."""
        text = self.config.to_json_best_effort(sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def _marker_lines(self, stage: str) -> List[str]:
        try:
            return paths.read_text(self._marker(stage)).split("\n")
        except (OSError, ValueError):   # missing, or damaged: says nothing
            return []

    def _stale(self, stage: str) -> bool:
        """``stage`` was done with other study settings (its marker's config fingerprint
        differs; a marker from before fingerprints were kept counts as current)."""
        if not paths.exists(self._marker(stage)):
            return False
        done_with = next((l.split(" ", 1)[1] for l in self._marker_lines(stage)
                          if l.startswith("config ")), None)
        return done_with is not None and done_with != self.config_fingerprint()

    def is_done(self, stage: str) -> bool:
        """Done, with this study config: a stage done with other settings (more folds, a
        changed analysis option) is run again, so nothing mixes old and new results."""
        return paths.exists(self._marker(stage)) and not self._stale(stage)

    def _report_current(self) -> bool:
        """The report is done, its files are there, and no other stage finished after
        it was written."""
        if not self.is_done("report") or not all(
                paths.exists(self.path(f)) for f in ("report.md", "report.html")):
            return False
        t = _mtime(self._marker("report"))
        return all(_mtime(self._marker(s)) <= t for s in STAGES[:-1]
                   if self.is_done(s))

    def _skip(self, stage: str, force: bool) -> bool:
        if force:
            return False
        return self._report_current() if stage == "report" else self.is_done(stage)

    def run(self, stages: Optional[Sequence[str]] = None, force: bool = False) -> Dict[str, str]:
        """Runs the stages in order; returns {stage: 'done' | 'skipped' | 'partial'}.

        'partial': the report was written from what exists while earlier stages are
        unfinished, and is deliberately not marked done.
        """
        stages = list(stages or STAGES)
        self.check_stages(stages, force)
        paths.makedirs(self.path("stages"))
        status, t_study = {}, time.time()
        todo = [s for s in STAGES if s in stages]
        self.tracker = self._tracker([s for s in todo if s == "report"
                                      or not self._skip(s, force)])
        for i, stage in enumerate(todo, 1):
            # A stop request whose immediate raise got lost (signals can land in a gc
            # callback, where exceptions are dropped) still stops here, between stages.
            interrupts.check(f"before stage {stage}")
            if self._skip(stage, force):
                print(f"[study] stage {i}/{len(todo)} {stage}: done earlier, skipped"
                      + self._older_code(stage), flush=True)
                status[stage] = "skipped"
                self.tracker.skip(stage)
                continue
            stale = self._stale(stage)
            if stale:
                print(f"[study] stage {i}/{len(todo)} {stage}: done earlier with other study "
                      "settings, running it again", flush=True)
            if force or stale:
                self._forget(stage)
            t0 = time.time()
            self.tracker.start(stage, i, len(todo))
            getattr(self, f"stage_{stage}")()
            self.tracker.finish(stage, time.time() - t0)
            status[stage] = self._finish(stage, time.time() - t0)
            print(f"[study] stage {i}/{len(todo)} {stage}: {status[stage]} in "
                  f"{progress.format_duration(time.time() - t0)} (study: "
                  f"{progress.format_duration(time.time() - t_study)})", flush=True)
        return status

    def check_stages(self, stages: Sequence[str], force: bool = False) -> None:
        """StudyError unless every stage in ``stages`` is known and every stage that would
        run has the stages it needs (:data:`NEEDS`, and theirs) done or among ``stages``."""
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise StudyError(f"unknown stage(s) {bad}; choose from {STAGES}.")
        for stage in (s for s in STAGES if s in stages and not self._skip(s, force)):
            needed, todo = set(), list(NEEDS.get(stage, ()))
            while todo:
                n = todo.pop()
                if n not in needed and n not in stages and not self.is_done(n):
                    needed.add(n)
                    todo.extend(NEEDS.get(n, ()))
            if needed:
                missing = [s for s in STAGES if s in needed]
                with_them = ",".join(s for s in STAGES if s in stages or s in needed)
                raise StudyError(
                    f"--stages={','.join(stages)}: the {stage} stage needs the "
                    f"{' and '.join(missing)} stage{'s' if len(missing) > 1 else ''} first "
                    f"(not done in {self.workdir}); run --stages={with_them}, or leave "
                    "--stages out to run every stage (--stages=report writes a report of "
                    "what exists)")

    def _tracker(self, stages: Sequence[str]) -> progress.StudyProgress:
        """The ETA of ``stages`` from their work (``preflight.stage_work``) and the rates
        this workdir measured so far."""
        parallel = self.parallel if self.mode == "subprocess" else 1
        return progress.StudyProgress(
            preflight_lib.stage_work(self, stages, parallel),
            progress.Rates.load(self.path(*progress.RATES_FILE)))

    def _finish(self, stage: str, seconds: float) -> str:
        if stage == "report" and not all(self.is_done(s) for s in STAGES[:-1]):
            missing = [s for s in STAGES[:-1] if not self.is_done(s)]
            print(f"[study] report: written from what exists; stages {missing} are not done, "
                  "so it is not marked done and will be rebuilt.", flush=True)
            return "partial"
        paths.write_text_atomic(self._marker(stage),
                                f"{seconds:.1f}s\ncode {provenance.code_fingerprint()}\n"
                                f"config {self.config_fingerprint()}\n")
        return "done"

    def _forget(self, stage: str) -> None:
        """Before a forced stage: its marker and its per-item caches go (a forced stage
        redoes its work, not only the tables over cached items; one interrupted halfway is
        not done, and its rerun keeps the items already redone)."""
        for rel in (f"stages/{stage}.done",) + analyses.STAGE_CACHES.get(stage, ()):
            target = paths.as_path(self.path(*rel.split("/")))
            if paths.isdir(target):
                target.rmtree()
            elif paths.exists(target):
                target.unlink()

    def _older_code(self, stage: str) -> str:
        """'' when ``stage`` was finished by this code, else what to know about it: its
        results are kept, and how to redo them."""
        lines = self._marker_lines(stage)   # a damaged marker: said as made by other code
        made_by = next((l.split(" ", 1)[1] for l in lines if l.startswith("code ")), None)
        if made_by == provenance.code_fingerprint():
            return ""
        return (f" (by {'code ' + made_by if made_by else 'an older version'}, not this code "
                f"({provenance.code_fingerprint()}): its results are kept; "
                f"--stages={stage} --force redoes it)")

    # ------------------------------------------------------------------------- stages
    def stage_sources(self):
        pretrain = [self._prepare_source(name, spec)
                    for name, spec in self.config.sources.items()
                    if not spec.get("weights_of")]
        pretrain = [r for r in pretrain if r is not None]
        if pretrain:  # one counter over all of them (pretrain 1/2, 2/2)
            self._run_all(pretrain, "pretrain")
        for name, spec in self.config.sources.items():
            twin = self.random_twin_dir(name)
            if twin:
                self._save_random(twin, name, spec, spec.get("seed", 0) + 1)
            checkpoint.load_metadata(self.source_dir(name))  # clear error if missing/corrupt

    def _prepare_source(self, name: str, spec) -> Optional[sweep.Run]:
        """Converts or draws a source now; a 'pretrain' source is returned as the run
        that makes it (stage_sources runs them together)."""
        out = self.source_dir(name)
        if spec.kind == "convert" and not self._readable_weights(
                out, name, lambda meta: self._converted_differs(meta, spec)):
            convert_lib.convert(spec.format, paths.to_str(paths.workdir(spec.input)), out,
                                source_name=name, overwrite=True,
                                **({"preprocessing": spec.preprocessing}
                                   if spec.get("preprocessing") else {}))
        elif spec.kind == "random":
            self._save_random(out, name, spec, spec.get("seed", 0))
        elif spec.kind == "pretrain":
            model_ov = [f"model.{k}={v}" for k, v in self.config.model.items()]
            run = sweep.Run(f"sources/{name}", spec.config, self.path("sources", name, "run"),
                            list(spec.get("overrides", [])) + model_ov,
                            {"source": name, "stage": "pretrain"})
            return run
        return None

    @staticmethod
    def _readable_weights(out: str, name: str, differs=None) -> bool:
        """Whether a source the study converts or draws is there, its metadata reads (a
        damaged one is made again: same input file, same seed, same weights) and it was
        made as the config now asks (``differs(metadata)``: None, or how it differs)."""
        if not paths.exists(paths.join(out, checkpoint.METADATA_FILE)):
            return False
        try:
            meta = checkpoint.load_metadata(out)
        except CheckpointError as e:
            print(f"[study] source {name}: making it again ({e})", flush=True)
            return False
        why = differs(meta) if differs else None
        if why:
            print(f"[study] source {name}: making it again ({why})", flush=True)
            return False
        return True

    @staticmethod
    def _converted_differs(meta, spec) -> Optional[str]:
        """How converted weights differ from what ``spec`` asks: another input file (by
        its SHA-256) or another preprocessing; None if they match, or if the input file is
        gone (the converted weights are all there is)."""
        src = paths.to_str(paths.workdir(spec.input))
        if not paths.exists(src):
            return None
        if meta.extra.get("sha256") != convert_lib.file_sha256(src):
            return f"converted from another file than {spec.input} as it is now"
        if spec.get("preprocessing") and spec.preprocessing != meta.preprocessing:
            return f"preprocessing {meta.preprocessing}, the config asks {spec.preprocessing}"
        return None

    def _save_random(self, out: str, name: str, spec, seed: int):
        """Draws the seeded random init into ``out`` unless it is there, readable and
        drawn with this seed for this model."""
        m = self.config.model
        pre = spec.get("preprocessing", "unit")

        def differs(meta) -> Optional[str]:
            drawn = (meta.extra.get("seed"), meta.layout, meta.depth, meta.width,
                     meta.preprocessing)
            wanted = (seed, m.layout, m.depth, m.width, pre)
            return None if drawn == wanted else (
                f"drawn as (seed, layout, depth, width, preprocessing) {drawn}, the config "
                f"asks {wanted}")
        if self._readable_weights(out, name, differs):
            return
        model = resnet.ResNet(depth=m.depth, layout=m.layout, width=m.width, num_classes=None)
        variables = resnet.init_variables(model, jax.random.key(seed), 32)
        checkpoint.save_weights(out, variables, checkpoint.WeightsMetadata(
            source=name, layout=m.layout, depth=m.depth, width=m.width, num_classes=None,
            preprocessing=pre, extra={"init": "random", "seed": seed}))

    def _run_all(self, runs: Sequence[sweep.Run], kind: str = "run"):
        """Runs ``runs`` (``parallel`` at a time in subprocess mode), one progress line
        per finished run; raises StudyError naming the failed ones at the end."""
        todo = [r for r in runs if r.status() != "done"]
        tracker = self.tracker
        prog = progress.Progress(kind, len(runs), done_before=len(runs) - len(todo),
                                 parallel=self.parallel if self.mode == "subprocess" else 1,
                                 eta_fn=tracker.stage_eta if tracker else None)
        failed = {}

        workers = self.parallel if self.mode == "subprocess" else 1
        # a GPU slot per run, or runs sharing the GPUs, which split their memory
        envs = (sweep.RunEnvs(self.gpu_slots, min(workers, len(todo)))
                if self.mode == "subprocess" else None)

        def one(run):
            t0 = time.time()
            with (envs.borrow() if envs else contextlib.nullcontext()) as env:
                st = sweep.run_all([run], parallel=1, mode=self.mode, env=env)[run.name]
            return run, st, time.time() - t0

        with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
            for fut in concurrent.futures.as_completed([pool.submit(one, r) for r in todo]):
                run, st, secs = fut.result()
                if st.startswith("failed"):
                    failed[run.name] = st
                # the cost model learns from finished runs only; the run line shows its
                # stage ETA and the next line the overall one
                counted = not failed.get(run.name) and self._count_run(run, secs)
                prog.item_done(run.name, secs, sweep.run_detail(run, st))
                if counted:
                    tracker.echo_line()
        if failed:
            raise StudyError(f"{len(failed)} run(s) failed: {failed}. Fix the cause and rerun "
                             "the study: finished runs are skipped, interrupted ones resume.")

    def _count_run(self, run: sweep.Run, seconds: float) -> bool:
        """Feeds a finished run to the cost model. A run whose size only its split files
        knew (NaN units) is measured from its results, and the runs left are recounted
        with its dataset size."""
        t = self.tracker
        w = t.work.get(t.stage) if t else None
        if w is None or run.name not in w.items:
            return False
        if not math.isfinite(w.items[run.name]):
            w.items[run.name] = preflight_lib.finished_run_units(run)
            rest = preflight_lib.stage_work(self, [t.stage], w.parallel)[t.stage].items
            w.items.update({k: v for k, v in rest.items() if k in w.items})
        return t.record(run.name, seconds)

    def stage_finetune(self):
        runs = self.finetune_runs()
        print(f"[study] finetune: {len(runs)} runs "
              f"({sum(r.status() == 'done' for r in runs)} already done)", flush=True)
        self._run_all(runs)
        analyses.finetune_tables(self, sweep.collect(runs))

    def stage_representations(self):
        analyses.representations(self)

    def stage_predictions(self):
        analyses.predictions(self)

    def stage_filters(self):
        analyses.filters_stage(self)

    def stage_robustness(self):
        analyses.robustness(self)

    def stage_report(self):
        report.write_report(self)


def _mtime(path: str) -> float:
    """Modification time of a stage marker: float seconds locally (two stages can end
    within one second), the object's (whole-second) time on a bucket."""
    if paths.is_remote(path):
        return float(paths.as_path(path).stat().mtime)
    return os.path.getmtime(path)


def preflight(config: ml_collections.ConfigDict, workdir: str, *, mode: str = "inprocess",
              parallel: int = 1, gpu_slots: Sequence[str] = ()) -> preflight_lib.Preflight:
    """What a study would run and what it lacks, without running anything (``--dry_run``);
    ``mode``/``parallel``/``gpu_slots`` as the study would run (the time estimate divides
    by the runs at once)."""
    return preflight_lib.check(Study(config, workdir, mode=mode, parallel=parallel,
                                     gpu_slots=gpu_slots))


def run_study(config: ml_collections.ConfigDict, workdir: str, *,
              stages: Optional[Sequence[str]] = None, force: bool = False,
              mode: str = "inprocess", parallel: int = 1,
              gpu_slots: Sequence[str] = ()) -> Dict[str, str]:
    """Runs (or resumes) a study; returns the stage status.

    Before a stage that trains, :func:`preflight` runs and a StudyError lists everything
    missing (data roots, checkpoint files, disk space) in one message.
    """
    study = Study(config, workdir, mode=mode, parallel=parallel, gpu_slots=gpu_slots)
    wanted = list(stages or STAGES)
    study.check_stages(wanted, force)   # before the pre-flight's lines
    if any(s in wanted and not study.is_done(s) for s in ("sources", "finetune")):
        pf = preflight_lib.check(study)
        print(pf.text(), flush=True)
        if pf.missing:
            raise StudyError(pf.error_message())
    else:   # training done: the analysis settings are still checked before any stage
        problems = preflight_lib.config_problems(study)
        if problems:
            raise StudyError(f"{len(problems)} analysis setting(s) to fix: "
                             + "; ".join(problems) + ". Fix them (--config.<field>=...) and "
                             "rerun; nothing was changed.")
    return study.run(stages, force)
