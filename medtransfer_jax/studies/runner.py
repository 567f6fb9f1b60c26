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
* ``targets``: ``{name: {config, overrides}}`` training configs (one per target).
* ``folds``, ``confounders`` (a list of ``{kind, ps}``; empty for Revisiting-style
  studies), ``model`` (depth/width/layout shared by sources and targets), ``analysis``.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from medtransfer_jax import interrupts
from medtransfer_jax.errors import UserError
from medtransfer_jax.training import sweep

STAGES = ("sources", "finetune", "representations", "predictions", "filters", "robustness",
          "report")


class StudyError(UserError):
    """A study config or workdir that cannot be used; the message says how to fix it."""


# ----------------------------------------------------------------------------- helpers

def _write_csv(path: str, rows: Sequence[Dict[str, Any]]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cols: List[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols and not isinstance(r[c], (list, dict))]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    return path


def read_csv(path: str) -> List[Dict[str, Any]]:
    """CSV rows with numbers parsed back to float where they parse."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = float(v)
            except (TypeError, ValueError):
                pass
    return rows


def _write_json(path: str, obj: Any):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


class Study:
    """Paths and grid of one study; the stages are methods."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
                 mode: str = "inprocess", parallel: int = 1):
        if not config.get("sources"):
            raise StudyError("study config has no `sources`.")
        if not config.get("targets"):
            raise StudyError("study config has no `targets`.")
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.mode = mode
        self.parallel = parallel

    # -- layout
    def path(self, *parts) -> str:
        return os.path.join(self.workdir, *parts)

    def source_dir(self, source: str) -> str:
        """The pre-trained ("before fine-tuning") weights directory of ``source``."""
        spec = self.config.sources[source]
        if spec.kind == "weights":
            return os.path.abspath(spec.path)
        if spec.kind == "pretrain":
            return self.path("sources", source, "run", "export", "best")
        return self.path("sources", source, "weights")

    @property
    def folds(self) -> List[int]:
        return list(self.config.folds)

    def finetune_runs(self) -> List[sweep.Run]:
        """target x source x fold (x confounder kind x p): sweep runs."""
        runs = []
        model_ov = [f"model.{k}={v}" for k, v in self.config.model.items()]
        for target, tspec in self.config.targets.items():
            settings = [(None, None)]
            for conf in self.config.get("confounders", []) or []:
                settings += [(conf.kind, p) for p in conf.ps]
            for source, fold, (kind, p) in itertools.product(self.config.sources, self.folds,
                                                               settings):
                name = f"{target}/{source}"
                ov = list(tspec.get("overrides", [])) + model_ov + [
                    f"model.init={self.source_dir(source)}", f"fold={fold}"]
                keys = {"target": target, "source": source, "fold": fold,
                        "confounder": kind or "none", "p": p if p is not None else ""}
                if kind:
                    name += f"/{kind}-p{p:g}"
                    ov += [f"data.confounder.kind={kind}", f"data.confounder.p={p}"]
                name += f"/fold{fold}"
                runs.append(sweep.Run(name, tspec.config, self.path("finetune", name), ov, keys))
        return runs

    def run_dir(self, target: str, source: str, fold: int) -> str:
        return self.path("finetune", target, source, f"fold{fold}")

    # -- stage bookkeeping
    def _marker(self, stage: str) -> str:
        return self.path("stages", f"{stage}.done")

    def is_done(self, stage: str) -> bool:
        return os.path.exists(self._marker(stage))

    def run(self, stages: Optional[Sequence[str]] = None, force: bool = False) -> Dict[str, str]:
        """Runs the stages in order; returns {stage: 'done' | 'skipped'}."""
        stages = list(stages or STAGES)
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise StudyError(f"unknown stage(s) {bad}; choose from {STAGES}.")
        status = {}
        os.makedirs(os.path.join(self.workdir, "stages"), exist_ok=True)  # after validation
        for stage in STAGES:
            if stage not in stages:
                continue
            # A stop request whose immediate raise got lost (signals can land in a gc
            # callback, where exceptions are dropped) still stops here, between stages.
            interrupts.check(f"before stage {stage}")
            if self.is_done(stage) and not force:
                logging.info("stage %s: already done, skipping", stage)
                print(f"[study] {stage}: done earlier, skipped", flush=True)
                status[stage] = "skipped"
                continue
            t0 = time.time()
            print(f"[study] {stage}: running ...", flush=True)
            getattr(self, f"stage_{stage}")()
            with open(self._marker(stage), "w") as f:
                f.write(f"{time.time() - t0:.1f}s\n")
            print(f"[study] {stage}: done in {time.time() - t0:.0f}s", flush=True)
            status[stage] = "done"
        return status

    # ------------------------------------------------------------------------- stages
    def stage_sources(self):
        from medtransfer_jax.weights import conversion as convert_lib
        from medtransfer_jax.models import resnet
        from medtransfer_jax.weights import checkpoint

        for name, spec in self.config.sources.items():
            out = self.source_dir(name)
            if spec.kind == "weights":
                checkpoint.load_metadata(out)  # clear error if missing/corrupt
            elif spec.kind == "convert":
                if not os.path.exists(os.path.join(out, checkpoint.METADATA_FILE)):
                    convert_lib.convert(spec.format, spec.input, out,
                                        source_name=name, overwrite=True)
            elif spec.kind == "random":
                if not os.path.exists(os.path.join(out, checkpoint.METADATA_FILE)):
                    m = self.config.model
                    model = resnet.ResNet(depth=m.depth, layout=m.layout, width=m.width,
                                          num_classes=None)
                    variables = resnet.init_variables(model, jax.random.key(spec.get("seed", 0)),
                                                      32)
                    checkpoint.save_weights(out, variables, checkpoint.WeightsMetadata(
                        source=name, layout=m.layout, depth=m.depth, width=m.width,
                        num_classes=None, preprocessing=spec.get("preprocessing", "unit"),
                        extra={"init": "random", "seed": spec.get("seed", 0)}))
            elif spec.kind == "pretrain":
                model_ov = [f"model.{k}={v}" for k, v in self.config.model.items()]
                run = sweep.Run(f"sources/{name}", spec.config, self.path("sources", name, "run"),
                                list(spec.get("overrides", [])) + model_ov,
                                {"source": name, "stage": "pretrain"})
                self._run_all([run])
            else:
                raise StudyError(f"sources.{name}.kind={spec.kind!r}; choose weights, convert, "
                                 "pretrain or random.")
            checkpoint.load_metadata(out)

    def _run_all(self, runs: Sequence[sweep.Run]):
        status = sweep.run_all(runs, parallel=self.parallel, mode=self.mode)
        failed = {k: v for k, v in status.items() if v.startswith("failed")}
        if failed:
            raise StudyError(f"{len(failed)} run(s) failed: {failed}. Fix the cause and rerun "
                             "the study: finished runs are skipped, interrupted ones resume.")

    def stage_finetune(self):
        runs = self.finetune_runs()
        print(f"[study] finetune: {len(runs)} runs "
              f"({sum(r.status() == 'done' for r in runs)} already done)", flush=True)
        self._run_all(runs)
        rows = sweep.collect(runs, self.path("tables", "runs.csv"))
        _write_csv(self.path("tables", "runs.csv"), rows)

    def _target_images(self, target: str, fold: int, num_images: int) -> np.ndarray:
        """Raw uint8 test images (N, S, S, 3) of a target's fold, S = the run's image size."""
        from medtransfer_jax import data as data_lib
        from medtransfer_jax.data import pipeline
        from medtransfer_jax.preprocessing import to_three_channels

        cfg = sweep.load_config(sweep.Run("probe", self.config.targets[target].config, "",
                                          list(self.config.targets[target].get("overrides", []))))
        splits = data_lib.get_splits(cfg.data, fold=fold)
        src = splits.test if len(splits.test) >= 2 else splits.val
        n = min(num_images, len(src))
        size = cfg.data.image_size
        return np.stack([to_three_channels(pipeline.resize(src[i]["image"], size))
                         for i in range(n)])

    def stage_representations(self):
        from medtransfer_jax.analysis import compare, plots

        acfg = self.config.analysis.cca
        sources = list(self.config.sources)
        all_rows = []
        for target, fold in itertools.product(self.config.targets, self.folds):
            out_csv = self.path("representations", f"{target}_fold{fold}.csv")
            if os.path.exists(out_csv):
                all_rows += read_csv(out_csv)
                continue
            images = self._target_images(target, fold, acfg.num_images)
            pairs = []
            for s in sources:
                pairs.append((f"{s} (pre) vs {s} (fine-tuned)", "pre_vs_finetuned",
                              self.source_dir(s), os.path.join(self.run_dir(target, s, fold),
                                                               "export", "best")))
            for s1, s2 in itertools.combinations(sources, 2):
                pairs.append((f"{s1} vs {s2} (pre)", "between_sources_pre",
                              self.source_dir(s1), self.source_dir(s2)))
                pairs.append((f"{s1} vs {s2} (fine-tuned)", "between_sources_finetuned",
                              os.path.join(self.run_dir(target, s1, fold), "export", "best"),
                              os.path.join(self.run_dir(target, s2, fold), "export", "best")))
            rows = []
            for label, kind, wa, wb in pairs:
                # Both networks see the same images, each normalised its own way.
                r = compare.compare_networks(
                    wa, wb, images, method=list(acfg.methods), spatial=acfg.spatial,
                    positions=acfg.positions, num_channels=acfg.num_channels,
                    repeats=acfg.repeats, seed=acfg.seed, name_a=label.split(" vs ")[0],
                    name_b=label.split(" vs ")[1])
                for row in r:
                    row.update(pair=label, comparison=kind, target=target, fold=fold)
                rows += r
            _write_csv(out_csv, rows)
            all_rows += rows
        _write_csv(self.path("tables", "representations.csv"), all_rows)
        summary = _mean_over(all_rows, ("target", "pair", "comparison", "layer", "method"),
                             "value")
        _write_csv(self.path("tables", "representations_summary.csv"), summary)
        for target in self.config.targets:
            sel = [dict(r, std=r["value_std"]) for r in summary if r["target"] == target]
            plots.plot_layer_similarity(sel, self.path("figures", f"similarity_{target}.png"),
                                        title=f"{target}: layer-wise similarity (mean over folds)")

    def stage_predictions(self):
        from medtransfer_jax.analysis import plots
        from medtransfer_jax.analysis import predictions as pred

        sources = list(self.config.sources)
        rows, gain_records = [], []
        sim_rows = self._representation_summary()
        for target, fold in itertools.product(self.config.targets, self.folds):
            paths = {s: os.path.join(self.run_dir(target, s, fold), "predictions.csv")
                     for s in sources}
            random_path = paths.get("random")
            for s1, s2 in itertools.combinations(sources, 2):
                r = pred.compare_prediction_files(paths[s1], paths[s2], split="test")
                rows.append(dict(target=target, fold=fold, pair=f"{s1} vs {s2}", model_a=s1,
                                 model_b=s2, **r))
            if random_path:
                for s in sources:
                    if s == "random":
                        continue
                    r = pred.compare_prediction_files(paths[s], random_path, split="test",
                                                      random_path=random_path)
                    per_layer = {row["layer"]: row["value"] for row in sim_rows
                                 if row["target"] == target and row["fold"] == fold
                                 and row["comparison"] == "pre_vs_finetuned"
                                 and row["pair"].startswith(f"{s} (pre)")
                                 and row["method"] == self.config.analysis.cca.methods[0]}
                    if per_layer:
                        gain_records.append(dict(auc=r["auc_a"], auc_random=r["auc_random"],
                                                 similarity=per_layer, source=s, target=target,
                                                 fold=fold))
        _write_csv(self.path("tables", "prediction_similarity.csv"), rows)
        summary = _mean_over(rows, ("target", "pair"),
                             ("observed", "expected_independent", "excess", "agreement",
                              "cohen_kappa", "prob_correlation"))
        _write_csv(self.path("tables", "prediction_similarity_summary.csv"), summary)
        if summary:
            plots.plot_prediction_similarity(
                [dict(r, pair=f"{r['target']}: {r['pair']}") for r in summary],
                self.path("figures", "prediction_similarity.png"))
        if len(gain_records) >= 2:
            gain_rows = pred.auc_gain_vs_similarity(gain_records)
            _write_csv(self.path("tables", "auc_gain_vs_similarity.csv"), gain_rows)
            plots.plot_auc_vs_similarity(gain_rows, self.path("figures", "auc_gain_vs_cca.png"))

    def _representation_summary(self) -> List[Dict[str, Any]]:
        path = self.path("tables", "representations.csv")
        return read_csv(path) if os.path.exists(path) else []

    def stage_filters(self):
        from medtransfer_jax.analysis import filters, plots, weight_change
        from medtransfer_jax.weights import checkpoint

        models, groups = {}, {}
        change_rows = []
        for s in self.config.sources:
            pre, _ = checkpoint.load_weights(self.source_dir(s))
            models[f"{s}:pre"] = pre["params"]
            groups.setdefault(f"{s}:pre", []).append(f"{s}:pre")
            for target, fold in itertools.product(self.config.targets, self.folds):
                ft_dir = os.path.join(self.run_dir(target, s, fold), "export", "best")
                ft, _ = checkpoint.load_weights(ft_dir)
                key = f"{s}:{target}:fold{fold}"
                models[key] = ft["params"]
                groups.setdefault(f"{s}:finetuned", []).append(key)
                for row in weight_change.weight_change(pre, ft):
                    row.update(source=s, target=target, fold=fold)
                    change_rows.append(row)
        report = filters.analyse_filters(models, groups=groups)
        _write_csv(self.path("tables", "filter_layers.csv"), report.layer_rows)
        # Keep the drifts a reader wants: pre vs fine-tuned of one source, and between sources.
        drift = []
        for r in report.drift_rows:
            sa, sb = r["a"].split(":")[0], r["b"].split(":")[0]
            if r["scope"] == "layer":
                if sa == sb and r["a"].endswith(":pre"):
                    drift.append(dict(r, comparison="pre_vs_finetuned", source=sa))
                elif r["a"].endswith(":pre") and r["b"].endswith(":pre"):
                    drift.append(dict(r, comparison="between_sources_pre"))
            elif r["a"] in groups and r["b"] in groups:
                drift.append(dict(r, comparison="groups"))
        _write_csv(self.path("tables", "filter_drift.csv"), drift)
        layer_drift = _mean_over([r for r in drift if r["scope"] == "layer"],
                                 ("a", "comparison", "key", "depth"), "drift")
        _write_csv(self.path("tables", "filter_drift_summary.csv"), layer_drift)
        plots.plot_kl_drift([dict(r, b="fine-tuned (mean over runs)", scope="layer",
                                  drift=r["drift"])
                             for r in layer_drift if r["comparison"] == "pre_vs_finetuned"],
                            self.path("figures", "filter_kl_drift.png"), scope="layer")
        _write_csv(self.path("tables", "weight_change.csv"), change_rows)
        for s in self.config.sources:
            mean_rows = _mean_over([r for r in change_rows if r["source"] == s],
                                   ("layer", "kind", "status"), ("rel_l2", "cosine"))
            plots.plot_weight_change(mean_rows, self.path("figures", f"weight_change_{s}.png"))

    def stage_robustness(self):
        confs = self.config.get("confounders", []) or []
        rows = []
        for run in self.finetune_runs():
            if run.keys["confounder"] == "none":
                continue
            res = sweep.read_results(run.workdir) or {}
            extra = res.get("extra_tests", {})
            row = dict(run.keys)
            for name in ("iid", "clean", "ood"):
                row[f"auc_{name}"] = extra.get(name, {}).get("auc", float("nan"))
            row["drop_iid_to_ood"] = row["auc_iid"] - row["auc_ood"]
            row["drop_clean_to_ood"] = row["auc_clean"] - row["auc_ood"]
            rows.append(row)
        _write_csv(self.path("tables", "robustness.csv"), rows)
        summary = _mean_over(rows, ("target", "source", "confounder", "p"),
                             ("auc_iid", "auc_clean", "auc_ood", "drop_iid_to_ood"))
        _write_csv(self.path("tables", "robustness_summary.csv"), summary)
        if confs and summary:
            from medtransfer_jax.studies import report
            report.plot_robustness(summary, self.path("figures", "robustness.png"))

    def stage_report(self):
        from medtransfer_jax.studies import report
        report.write_report(self)


def _mean_over(rows: Sequence[Dict[str, Any]], keys: Sequence[str], values) -> List[Dict[str, Any]]:
    """Groups ``rows`` by ``keys`` and averages ``values`` (mean and std over the group)."""
    values = [values] if isinstance(values, str) else list(values)
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for key, members in groups.items():
        row = dict(zip(keys, key), n=len(members))
        for v in values:
            xs = np.array([float(m[v]) for m in members if m.get(v) not in (None, "")], float)
            row[v] = float(np.mean(xs)) if xs.size else float("nan")
            row[f"{v}_std"] = float(np.std(xs)) if xs.size else float("nan")
        out.append(row)
    return out


def run_study(config: ml_collections.ConfigDict, workdir: str, *,
              stages: Optional[Sequence[str]] = None, force: bool = False,
              mode: str = "inprocess", parallel: int = 1) -> Dict[str, str]:
    """Runs (or resumes) a study; returns the stage status."""
    return Study(config, workdir, mode=mode, parallel=parallel).run(stages, force)
