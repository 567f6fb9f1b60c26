"""Matplotlib (Agg) figures for the analysis tables; each function writes one PNG.

Inputs are the row dicts the analysis functions return, so figures can be redrawn from
the CSV/JSON files without recomputing anything.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SHORT_LAYER = {"conv1_relu": "conv1", "conv2_block3_out": "block1", "conv3_block4_out": "block2",
               "conv4_block6_out": "block3", "conv5_block3_out": "block4"}


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_layer_similarity(rows: Sequence[Mapping], path: str, *, title: str = "",
                          label_key: str = "pair") -> str:
    """Similarity per layer, one line per comparison (``row[label_key]``, default
    'model_a vs model_b'), one panel per method; error bars = std over repeats.

    For the Revisiting figures pass rows of e.g. 'ImageNet vs ImageNet-finetuned',
    'RadImageNet vs RadImageNet-finetuned' (before vs after fine-tuning per source) and
    'ImageNet vs RadImageNet' (between sources)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4), squeeze=False)
    for ax, m in zip(axes[0], methods):
        sel = [r for r in rows if r["method"] == m]
        layers = list(dict.fromkeys(r["layer"] for r in sel))
        labels = list(dict.fromkeys(_label(r, label_key) for r in sel))
        for lab in labels:
            pts = {r["layer"]: r for r in sel if _label(r, label_key) == lab}
            xs = [i for i, l in enumerate(layers) if l in pts]
            ax.errorbar(xs, [pts[layers[i]]["value"] for i in xs],
                        yerr=[pts[layers[i]].get("std", 0.0) for i in xs], marker="o",
                        capsize=3, label=lab)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([SHORT_LAYER.get(l, l) for l in layers], rotation=30, ha="right")
        ax.set_ylabel(m.replace("_", " "))
        ax.set_title(title or m)
        ax.grid(alpha=0.3)
    # One legend under the panels: inside an axis it hides the curves when pairs are many.
    fig.tight_layout()
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 3), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    return _save(fig, path)


def _label(r, key):
    return r.get(key) or f"{r.get('model_a', 'A')} vs {r.get('model_b', 'B')}"


def plot_kl_drift(drift_rows: Sequence[Mapping], path: str, *, scope: str = "layer") -> str:
    """Filter KL drift per layer (``scope='layer'``) or per depth bin, one line per pair."""
    sel = [r for r in drift_rows if r["scope"] == scope]
    fig, ax = plt.subplots(figsize=(7, 4))
    for pair in dict.fromkeys((r["a"], r["b"]) for r in sel):
        pts = [r for r in sel if (r["a"], r["b"]) == pair]
        xs = [r.get("depth", i) if scope == "layer" else i for i, r in enumerate(pts)]
        ax.plot(xs, [r["drift"] for r in pts], marker="o", label=f"{pair[0]} vs {pair[1]}")
        if scope != "layer":
            ax.set_xticks(range(len(pts)))
            ax.set_xticklabels([r["key"] for r in pts], rotation=30)
    ax.set_xlabel("normalised depth" if scope == "layer" else "depth bin")
    ax.set_ylabel("EV-weighted symmetric KL")
    ax.set_title("Filter distribution drift")
    ax.grid(alpha=0.3)
    if sel:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_filter_histograms(histograms: Mapping, bin_edges: np.ndarray, path: str, *,
                           keys: Optional[Sequence] = None,
                           explained: Optional[np.ndarray] = None) -> str:
    """Densities of the 9 PCA coefficients (3x3 panels), one line per histogram key."""
    keys = list(keys or histograms)
    fig, axes = plt.subplots(3, 3, figsize=(11, 9))
    for i, ax in enumerate(axes.ravel()):
        edges = bin_edges[i]
        centres = 0.5 * (edges[1:] + edges[:-1])
        width = edges[1] - edges[0]
        for k in keys:
            ax.step(centres, histograms[k][i] / width, where="mid", lw=1,
                    label=" / ".join(map(str, k)) if isinstance(k, tuple) else str(k))
        ax.set_yscale("log")
        ax.set_title(f"c{i}" + (f" ({explained[i]:.1%} var.)" if explained is not None else ""))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(keys), 4), fontsize=8)
    return _save(fig, path)


def plot_prediction_similarity(rows: Sequence[Mapping], path: str) -> str:
    """Bars: observed both-right-or-both-wrong vs the independent-errors baseline."""
    labels = [r.get("pair", f"{r.get('model_a', 'A')} vs {r.get('model_b', 'B')}") for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows)), 4))
    ax.bar(x - 0.2, [r["observed"] for r in rows], 0.4, label="observed")
    ax.bar(x + 0.2, [r["expected_independent"] for r in rows], 0.4,
           label="independent errors")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction both right or both wrong")
    ax.legend()
    return _save(fig, path)


def plot_auc_vs_similarity(rows: Sequence[Mapping], path: str) -> str:
    """One panel per layer: relative AUC gain vs similarity, with the least-squares line."""
    fig, axes = plt.subplots(1, len(rows), figsize=(3.5 * len(rows), 3.5), squeeze=False,
                             sharey=True)
    for ax, r in zip(axes[0], rows):
        ax.scatter(r["similarity"], r["gain"])
        if np.isfinite(r["slope"]):
            xs = np.linspace(min(r["similarity"]), max(r["similarity"]), 10)
            ax.plot(xs, r["slope"] * xs + r["intercept"])
        ax.set_title(f"{SHORT_LAYER.get(r['layer'], r['layer'])} (r={r['pearson_r']:.2f})")
        ax.set_xlabel("similarity")
    axes[0, 0].set_ylabel("relative AUC gain")
    return _save(fig, path)


def plot_weight_change(rows: Sequence[Mapping], path: str) -> str:
    """Relative L2 change and cosine per layer (network order)."""
    ok = [r for r in rows if r["status"] == "ok"]
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    x = np.arange(len(ok))
    for kind in dict.fromkeys(r["kind"] for r in ok):  # one line per layer kind
        idx = [i for i, r in enumerate(ok) if r["kind"] == kind]
        axes[0].plot(idx, [ok[i]["rel_l2"] for i in idx], ".-", label=kind)
        axes[1].plot(idx, [ok[i]["cosine"] for i in idx], ".-", label=kind)
    axes[0].set_ylabel("relative L2 change")
    axes[1].set_ylabel("cosine")
    axes[0].legend(fontsize=8)
    step = max(1, len(ok) // 25)
    axes[1].set_xticks(x[::step])
    axes[1].set_xticklabels([r["layer"] for r in ok][::step], rotation=60, ha="right",
                            fontsize=7)
    return _save(fig, path)
