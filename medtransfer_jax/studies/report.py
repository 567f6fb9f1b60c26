"""The study report: ``report.md`` and ``report.html`` (figures embedded) from the tables.

Built from a list of blocks (heading, paragraph, table, figure) rendered twice, so the
Markdown and the HTML page always say the same thing. Everything comes from the CSV
tables the stages wrote, so the report can be rebuilt alone (``--stages=report --force``).
"""
from __future__ import annotations

import base64
import datetime
import html
import math
import os
from typing import Any, Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Block = Tuple[str, Any]


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def mean_std(values: Sequence[float]) -> str:
    """'0.912 ± 0.013 (n=5)' over finite values."""
    xs = np.array([v for v in values if v is not None and np.isfinite(v)], float)
    if xs.size == 0:
        return "n/a"
    return f"{xs.mean():.3f} ± {xs.std():.3f} (n={xs.size})"


def auc_table(run_rows: Sequence[Dict[str, Any]], sources: Sequence[str],
              metric: str = "test.auc") -> Tuple[List[str], List[List[str]]]:
    """The Revisiting table: one row per target, one column per source, mean ± std over folds
    of ``metric`` (runs without a confounder only)."""
    targets = list(dict.fromkeys(r["target"] for r in run_rows))
    header = ["target"] + list(sources)
    rows = []
    for t in targets:
        line = [t]
        for s in sources:
            vals = [float(r[metric]) for r in run_rows
                    if r["target"] == t and r["source"] == s and r.get("confounder", "none")
                    in ("none", "") and r.get(metric) not in (None, "")]
            line.append(mean_std(vals))
        rows.append(line)
    return header, rows


def plot_robustness(summary: Sequence[Dict[str, Any]], path: str) -> str:
    """AUC on the o.o.d. test (confounder reversed) vs artefact fraction p, per source."""
    kinds = list(dict.fromkeys(r["confounder"] for r in summary))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for src in dict.fromkeys(r["source"] for r in summary if r["confounder"] == kind):
            pts = sorted((float(r["p"]), r) for r in summary
                         if r["confounder"] == kind and r["source"] == src)
            xs = [p for p, _ in pts]
            ax.errorbar(xs, [r["auc_ood"] for _, r in pts],
                        yerr=[r.get("auc_ood_std", 0.0) for _, r in pts], marker="o",
                        capsize=3, label=f"{src} (o.o.d.)")
            ax.plot(xs, [r["auc_iid"] for _, r in pts], ls="--", alpha=0.6,
                    label=f"{src} (i.i.d.)")
        ax.set_xlabel("fraction p of positives with the artefact")
        ax.set_ylabel("test AUC")
        ax.set_title(f"confounder: {kind}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render_markdown(blocks: Sequence[Block], root: str) -> str:
    out = []
    for kind, val in blocks:
        if kind == "h1":
            out.append(f"# {val}\n")
        elif kind == "h2":
            out.append(f"## {val}\n")
        elif kind == "p":
            out.append(f"{val}\n")
        elif kind == "table":
            header, rows = val
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
            out.append("")
        elif kind == "img":
            path, caption = val
            out.append(f"![{caption}]({os.path.relpath(path, root)})\n")
    return "\n".join(out)


def render_html(blocks: Sequence[Block], title: str) -> str:
    """A self-contained page: figures are embedded as base64 PNG."""
    body = []
    for kind, val in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(val)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(val)}</p>")
        elif kind == "table":
            header, rows = val
            cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r)
                          + "</tr>" for r in rows)
            body.append(f"<table><thead><tr>{cells}</tr></thead><tbody>{trs}</tbody></table>")
        elif kind == "img":
            path, caption = val
            with open(path, "rb") as f:
                data = base64.b64encode(f.read()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="'
                        f'{html.escape(caption)}"><figcaption>{html.escape(caption)}'
                        "</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;}"
             "table{border-collapse:collapse;margin:1em 0;}td,th{border:1px solid #bbb;"
             "padding:3px 8px;text-align:right;}th{background:#eee;}img{max-width:100%;}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>")


def _table(rows: Sequence[Dict[str, Any]], cols: Sequence[str]) -> Tuple[List[str], List[list]]:
    return list(cols), [[r.get(c, "") for c in cols] for r in rows]


def similarity_pivot(rows: Sequence[Dict[str, Any]]) -> Tuple[List[str], List[list]]:
    """One row per (target, pair, method), one column per layer: 'mean ± std (over folds)'."""
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    keyed: Dict[tuple, Dict[str, Any]] = {}
    for r in rows:
        cell = _fmt(r.get("value"))
        if r.get("value_std") not in (None, ""):
            cell += f" ± {_fmt(r['value_std'])}"
        keyed.setdefault((r["target"], r["pair"], r["method"]), {})[r["layer"]] = cell
    header = ["target", "pair", "method"] + layers
    return header, [list(k) + [cells.get(l, "") for l in layers] for k, cells in keyed.items()]


def build_blocks(study) -> List[Block]:
    from medtransfer_jax.studies.runner import read_csv

    cfg = study.config
    tables = lambda name: study.path("tables", name)  # noqa: E731
    fig = lambda name: study.path("figures", name)  # noqa: E731
    sources = list(cfg.sources)
    blocks: List[Block] = [
        ("h1", f"Study report: {cfg.get('name', 'study')}"),
        ("p", f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} in "
              f"{study.workdir}. Sources: {', '.join(sources)}; targets: "
              f"{', '.join(cfg.targets)}; folds: {list(cfg.folds)}; model: ResNet"
              f"{cfg.model.depth} (width {cfg.model.width}, {cfg.model.layout})."),
    ]
    runs = read_csv(tables("runs.csv")) if os.path.exists(tables("runs.csv")) else []
    blocks.append(("h2", "Fine-tuning AUC (test split, mean ± std over folds)"))
    if runs:
        blocks.append(("table", auc_table(runs, sources, "test.auc")))
        blocks.append(("p", "Validation AUC of the same runs (best checkpoint):"))
        blocks.append(("table", auc_table(runs, sources, "val.auc")))
    else:
        blocks.append(("p", "No fine-tuning results yet."))

    if os.path.exists(tables("representations_summary.csv")):
        blocks.append(("h2", "Layer-wise representation similarity"))
        blocks.append(("p", f"Method(s): {', '.join(cfg.analysis.cca.methods)}; "
                            f"{cfg.analysis.cca.spatial} datapoints (~{cfg.analysis.cca.positions}"
                            f" per layer), {cfg.analysis.cca.num_channels} shared channels, "
                            f"{cfg.analysis.cca.repeats} repeats, averaged over folds."))
        summ = read_csv(tables("representations_summary.csv"))
        for t in cfg.targets:
            if os.path.exists(fig(f"similarity_{t}.png")):
                blocks.append(("img", (fig(f"similarity_{t}.png"), f"{t}: similarity per layer")))
        blocks.append(("table", similarity_pivot(summ)))

    if os.path.exists(tables("prediction_similarity_summary.csv")):
        blocks.append(("h2", "Prediction similarity (test split)"))
        blocks.append(("p", "observed = fraction of images both models get right or both "
                            "wrong; expected = acc_A·acc_B + (1−acc_A)(1−acc_B) if their "
                            "errors were independent."))
        summ = read_csv(tables("prediction_similarity_summary.csv"))
        blocks.append(("table", _table(summ, ("target", "pair", "observed",
                                              "expected_independent", "excess", "agreement",
                                              "cohen_kappa", "prob_correlation", "n"))))
        if os.path.exists(fig("prediction_similarity.png")):
            blocks.append(("img", (fig("prediction_similarity.png"), "prediction similarity")))
        if os.path.exists(tables("auc_gain_vs_similarity.csv")):
            gain = read_csv(tables("auc_gain_vs_similarity.csv"))
            blocks.append(("p", "Relative AUC gain over random init vs pre/post fine-tuning "
                                "similarity, per layer:"))
            blocks.append(("table", _table(gain, ("layer", "n", "pearson_r", "spearman_r",
                                                  "slope"))))
            blocks.append(("img", (fig("auc_gain_vs_cca.png"), "AUC gain vs similarity")))

    if os.path.exists(tables("filter_drift_summary.csv")):
        blocks.append(("h2", "3×3 filter distributions"))
        drift = read_csv(tables("filter_drift_summary.csv"))
        per_src = {}
        for r in drift:
            if r["comparison"] == "pre_vs_finetuned":
                per_src.setdefault(r["a"], []).append(r["drift"])
        blocks.append(("p", "Explained-variance-weighted symmetric KL between the PCA-"
                            "coefficient histograms of the pre-trained and fine-tuned filters "
                            "(mean over layers and runs): " + "; ".join(
                                f"{k}: {np.mean(v):.4f}" for k, v in per_src.items()) + "."))
        blocks.append(("img", (fig("filter_kl_drift.png"), "filter KL drift per layer")))
        layers = read_csv(tables("filter_layers.csv"))
        stats = {}
        for r in layers:
            stats.setdefault(r["model"].split(":")[0] + (":pre" if r["model"].endswith(":pre")
                                                         else ":fine-tuned"), []).append(r)
        rows = [[k, mean_std([x["sparsity"] for x in v]),
                 mean_std([x["variance_entropy"] for x in v]),
                 mean_std([x["spikiness"] for x in v])] for k, v in stats.items()]
        blocks.append(("table", (["model", "sparsity", "variance entropy", "spikiness"], rows)))
        for s in sources:
            if os.path.exists(fig(f"weight_change_{s}.png")):
                blocks.append(("img", (fig(f"weight_change_{s}.png"),
                                       f"{s}: weight change per layer")))

    if os.path.exists(tables("robustness_summary.csv")):
        summ = read_csv(tables("robustness_summary.csv"))
        if summ:
            blocks.append(("h2", "Robustness to confounders"))
            blocks.append(("p", "AUC on the i.i.d. test (artefact as in training), the clean "
                                "test (no artefact) and the o.o.d. test (artefact on every "
                                "negative); drop = i.i.d. − o.o.d."))
            blocks.append(("table", _table(summ, ("target", "source", "confounder", "p",
                                                  "auc_iid", "auc_clean", "auc_ood",
                                                  "drop_iid_to_ood", "n"))))
            if os.path.exists(fig("robustness.png")):
                blocks.append(("img", (fig("robustness.png"), "robustness")))
    return blocks


def write_report(study) -> Dict[str, str]:
    """Writes report.md and report.html into the study's workdir; returns their paths."""
    blocks = build_blocks(study)
    md_path, html_path = study.path("report.md"), study.path("report.html")
    with open(md_path, "w") as f:
        f.write(render_markdown(blocks, study.workdir))
    with open(html_path, "w") as f:
        f.write(render_html(blocks, f"Study report: {study.config.get('name', 'study')}"))
    print(f"[study] report: {md_path}\n[study] report: {html_path}", flush=True)
    return {"markdown": md_path, "html": html_path}
