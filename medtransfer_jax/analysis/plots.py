"""Matplotlib (Agg) figures for the analysis tables; each function writes one PNG.

Inputs are the row dicts the analysis functions return, so figures can be redrawn from
the CSV/JSON files without recomputing anything.
"""
from __future__ import annotations

import io
import textwrap
from typing import Dict, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medtransfer_jax import paths  # noqa: E402
from medtransfer_jax.analysis import predictions as pred  # noqa: E402
from medtransfer_jax.analysis import similarity as sim  # noqa: E402

#: Line styles per test set / phase, so curves of one source share a colour (hue) and
#: differ in style: i.i.d. solid, clean dotted, o.o.d. dashed.
TEST_STYLES = {"iid": "-", "clean": ":", "ood": "--"}
TEST_NAMES = {"iid": "i.i.d.", "clean": "clean", "ood": "o.o.d."}


def source_colours(names: Sequence[str]) -> Dict[str, str]:
    """One colour per source base name: 'imagenet' and 'imagenet_frz' share a hue family
    (the frozen variant is drawn dashed by :func:`source_style`)."""
    bases = list(dict.fromkeys(n.split("_")[0] for n in names))
    palette = {b: f"C{i % 10}" for i, b in enumerate(bases)}
    return {n: palette[n.split("_")[0]] for n in names}


def source_style(name: str) -> str:
    return "--" if name.endswith("_frz") else "-"


def source_marker(name: str) -> dict:
    """The frozen variant's open squares beside its twin's filled circles: a short legend
    line may not show the dashes of :func:`source_style`."""
    return dict(marker="s", mfc="none") if name.endswith("_frz") else dict(marker="o")


def _save(fig, path: str) -> str:
    """Renders ``fig`` into memory, then writes it in one go (paths.write_bytes_atomic):
    ``path`` may be a gs:// URL (one upload, no half-written PNG), or a local file."""
    target = paths.workdir(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=target.suffix[1:] or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    paths.makedirs(target.parent)
    paths.write_bytes_atomic(target, buf.getvalue())
    return path


def _panel_grid(n: int, max_cols: int, panel_in: tuple, extra: tuple = (0.0, 0.0)):
    """A figure of ``n`` panels, ``max_cols`` to a row (unused cells hidden): (fig, the n
    axes in reading order). ``panel_in``: a panel's (width, height) in inches."""
    ncols = min(max_cols, n)
    nrows = -(-n // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(panel_in[0] * ncols + extra[0],
                                                    panel_in[1] * nrows + extra[1]),
                             squeeze=False)
    for ax in grid.ravel()[n:]:
        ax.set_visible(False)
    return fig, list(grid.ravel()[:n])


def _legend_entries(axes):
    """(handles, labels) of every axis, each label once: a shared legend for panels that
    each draw only some of the series."""
    seen = {}
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(l, h)
    return list(seen.values()), list(seen)


#: Line styles after the 10 colours of the cycle: line i of a panel is colour i % 10 in
#: style i // 10, so up to 40 lines of one panel never look alike.
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v")


def line_look(i: int) -> dict:
    """Colour, line style and marker of a panel's i-th line (all distinct up to 40)."""
    return dict(color=f"C{i % 10}", ls=LINE_STYLES[(i // 10) % len(LINE_STYLES)],
                marker=MARKERS[i % len(MARKERS)])


def plot_layer_similarity(rows: Sequence[Mapping], path: str, *, title: str = "",
                          label_key: str = "pair", error_label: str = "sd over repeats",
                          panel_key: Optional[str] = None) -> str:
    """Similarity per layer, one line per comparison (``row[label_key]``, default
    'model_a vs model_b'), one panel column per method and, with ``panel_key``, one panel
    row per value of ``row[panel_key]`` (its title), so that a study's 15 pairs are not
    one tangle; error bars = ``row['std']`` (say what they are in ``error_label``). Rows
    with ``null_mean`` add the chance level of that layer (shuffled-rows null) as a grey
    dotted line. The y axis ends at 1, where similarities end.

    For the Revisiting figures pass rows of e.g. 'ImageNet vs ImageNet-finetuned',
    'RadImageNet vs RadImageNet-finetuned' (before vs after fine-tuning per source) and
    'ImageNet vs RadImageNet' (between sources)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups = list(dict.fromkeys(r.get(panel_key, "") for r in rows)) if panel_key else [""]
    fig, axes = plt.subplots(len(groups), len(methods),
                             figsize=(5.5 * len(methods) + 3.2, 4 * len(groups)),
                             squeeze=False)
    for gi, group in enumerate(groups):
        for ax, m in zip(axes[gi], methods):
            sel = [r for r in rows if r["method"] == m
                   and (not panel_key or r.get(panel_key, "") == group)]
            _similarity_panel(ax, sel, label_key, m, error_label)
            ax.set_title(" · ".join(t for t in (title or m, group) if t), fontsize=10)
        # The legend beside the row's last panel (inside an axis it hides the curves), with
        # every panel's entries: the chance line is drawn only where a method has one.
        handles, labels = _legend_entries(axes[gi])
        axes[gi, -1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                            fontsize=8, handlelength=3)
    fig.tight_layout()
    return _save(fig, path)


def pair_looks(labels: Sequence[str]) -> Dict[str, dict]:
    """label -> line look. 'a vs b (pre)' and 'a vs b (fine-tuned)' are one pair at two
    stages: one colour and marker, solid before fine-tuning and dashed after; any other
    label is a pair of its own (:func:`line_look`)."""
    bases: Dict[str, int] = {}
    out = {}
    for lab in labels:
        base, stage = lab, None
        for st in ("pre", "fine-tuned"):   # 'a vs b (pre)'; not 'a (pre) vs a (fine-tuned)'
            if lab.endswith(f" ({st})") and "(" not in lab[:-len(st) - 3]:
                base, stage = lab[:-len(st) - 3], st
        look = line_look(bases.setdefault(base, len(bases)))
        if stage:
            look["ls"] = "-" if stage == "pre" else "--"
        out[lab] = look
    return out


def _similarity_panel(ax, sel, label_key, method, error_label):
    layers = list(dict.fromkeys(r["layer"] for r in sel))
    labels = list(dict.fromkeys(_label(r, label_key) for r in sel))
    looks = pair_looks(labels)
    for lab in labels:
        pts = {r["layer"]: r for r in sel if _label(r, label_key) == lab}
        xs = [k for k, l in enumerate(layers) if l in pts]
        ax.errorbar(xs, [pts[layers[k]]["value"] for k in xs],
                    yerr=[_finite_or_0(pts[layers[k]].get("std")) for k in xs],
                    capsize=3, label=lab, **looks[lab])
    null = [max((_finite_or_0(r.get("null_mean")) for r in sel if r["layer"] == l),
                default=0.0) for l in layers]
    if any(null):
        ax.plot(range(len(layers)), null, ":", color="grey",
                label="chance (shuffled rows; highest over the pairs)")
    low = min((_finite_or_0(r["value"]) - _finite_or_0(r.get("std")) for r in sel),
              default=0.0)
    ax.set_ylim(min(0.0, low - 0.02), 1.0)   # similarities end at 1 (debiased CKA dips < 0)
    ax.set_xticks(range(len(layers)))
    # Anchored rotation and half a slot of margin: the first name stays clear of the
    # y label instead of running under it.
    ax.set_xticklabels(layers, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.set_xlabel("layer (Keras name)")
    ax.set_ylabel(f"{sim.label(method)}\n(unitless; error bars: {error_label})")
    ax.grid(alpha=0.3)


def _interval_err(ys, rows, prefix: str):
    """errorbar's asymmetric yerr from each row's ``<prefix>_low/_high`` around ys (0
    where the interval is unknown)."""
    lo = [y - _nan(r.get(f"{prefix}_low")) for y, r in zip(ys, rows)]
    hi = [_nan(r.get(f"{prefix}_high")) - y for y, r in zip(ys, rows)]
    return [[max(_finite_or_0(v), 0.0) for v in lo], [max(_finite_or_0(v), 0.0) for v in hi]]


def _finite_or_0(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return 0.0
    return v if np.isfinite(v) else 0.0


def _label(r, key):
    return r.get(key) or f"{r.get('model_a', 'A')} vs {r.get('model_b', 'B')}"


def plot_kl_drift(drift_rows: Sequence[Mapping], path: str, *, scope: str = "layer") -> str:
    """Filter KL drift per layer (``scope='layer'``) or per depth bin, one line per pair."""
    sel = [r for r in drift_rows if r["scope"] == scope]
    fig, ax = plt.subplots(figsize=(7, 4))
    for pair in dict.fromkeys((r["a"], r["b"]) for r in sel):
        pts = [r for r in sel if (r["a"], r["b"]) == pair]
        xs = [r.get("depth", i) if scope == "layer" else i for i, r in enumerate(pts)]
        line, = ax.plot(xs, [r["drift"] for r in pts], marker="o",
                        label=f"{pair[0]} vs {pair[1]}")
        if any(np.isfinite(_nan(r.get("noise_floor"))) for r in pts):
            ax.plot(xs, [_nan(r.get("noise_floor")) for r in pts], ":", color=line.get_color(),
                    label=f"{pair[0]}: noise floor (two halves)")
        if scope != "layer":
            ax.set_xticks(range(len(pts)))
            ax.set_xticklabels([r["key"] for r in pts], rotation=30)
    ax.set_xlabel("normalised depth" if scope == "layer" else "depth bin")
    ax.set_ylabel("EV-weighted symmetric KL (nats)")
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
        ax.set_xlabel(f"PCA coefficient c{i} (of max-|w|-scaled filters)")
        ax.set_ylabel("density (log)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(keys), 4), fontsize=8)
    return _save(fig, path)


def plot_prediction_similarity(rows: Sequence[Mapping], path: str, *,
                               panel_key: Optional[str] = None,
                               folds: Optional[Sequence[Mapping]] = None) -> str:
    """Bars: observed both-right-or-both-wrong vs the independent-errors baseline, one
    panel per value of ``row[panel_key]`` (a study: per target; up to 10 source pairs in
    each, where one axis of 70 bars could not be read). Rows summarised over folds
    (``observed_sd``, ``observed_n``) get sd error bars and the number of folds in the
    title; the rows' ``split`` and ``mode`` (``paper``: the val split and
    acc_A² + (1−acc_A)²) name the images and the baseline. Given ``folds`` (the per-fold
    rows, keyed like ``rows`` by ``pair``), boxes of the folds replace the bars (the
    paper's similarity_plot.py)."""
    groups = list(dict.fromkeys(r.get(panel_key, "") for r in rows)) if panel_key else [""]
    most = max(sum(r.get(panel_key, "") == g for r in rows) if panel_key else len(rows)
               for g in groups)
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(5.0, 0.9 * most + 1.5),
                                                      3.9 * len(groups)), squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        def mine(rs):
            return [r for r in rs if not panel_key or r.get(panel_key, "") == g]
        _prediction_panel(ax, mine(rows), g, None if folds is None else mine(folds))
    fig.tight_layout()
    # one legend under the panels, clear of the pair names
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center",
               bbox_to_anchor=(0.5, 0.0), fontsize=8)
    return _save(fig, path)


def _prediction_panel(ax, rows, heading: str, folds=None):
    splits = list(dict.fromkeys(str(r.get("split") or "test") for r in rows))
    modes = list(dict.fromkeys(str(r.get("mode") or "corrected") for r in rows))
    labels = [r.get("pair", f"{r.get('model_a', 'A')} vs {r.get('model_b', 'B')}") for r in rows]
    x = np.arange(len(rows))
    over_folds = any("observed_sd" in r for r in rows)

    def err(key):
        return [_finite_or_0(r.get(f"{key}_sd")) for r in rows] if over_folds else None

    names = {"observed": "observed",
             "expected_independent": "independent errors: " + "; ".join(
                 pred.BASELINES.get(m, m) for m in modes)}
    for shift, (key, label) in zip((-0.2, 0.2), names.items()):
        look = dict(color="C0" if key == "observed" else "C1")
        if folds is not None:
            _fold_boxes(ax, x + shift, [[_nan(f.get(key)) for f in folds
                                         if f.get("pair") == r.get("pair")] for r in rows],
                        0.4, label=label, **look)
        else:
            ax.bar(x + shift, [r[key] for r in rows], 0.4, yerr=err(key), capsize=3,
                   label=label, **look)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_ylim(0, 1)
    where = "/".join(splits)
    ax.set_ylabel(f"both right or both wrong\n(fraction of {where} images)")
    ns = sorted({int(r["n"]) for r in rows if _finite_or_0(r.get("n"))})
    what = [f"n = {', '.join(map(str, ns))} {where} images" + (" per fold" if over_folds
                                                              else "")] if ns else []
    if over_folds:
        n_folds = sorted({int(_finite_or_0(r.get("observed_n"))) for r in rows})
        what.append(("boxes over " if folds is not None else "mean ± sd over ")
                    + ", ".join(map(str, n_folds)) + (" fold" if n_folds == [1] else " folds"))
    ax.set_title(f"{heading + ': ' if heading else ''}prediction similarity"
                 + (f"\n({'; '.join(what)})" if what else ""), fontsize=10)


def plot_auc_vs_similarity(rows: Sequence[Mapping], path: str, method: str = "") -> str:
    """Relative AUC gain vs similarity (``method``): one panel row per source, one panel
    per layer (as the paper's ``simVSauc_plot.py``), one point per run coloured by
    target, and that source's least-squares line."""
    sources = list(dict.fromkeys(r.get("source", "") for r in rows))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(len(sources), len(layers),
                             figsize=(3.5 * len(layers), 3.4 * len(sources) + 0.6),
                             squeeze=False, sharey=True)
    targets = list(dict.fromkeys(t for r in rows for t in r.get("target") or []))
    colours = {t: f"C{i}" for i, t in enumerate(targets)}
    for ax in axes.ravel():
        ax.set_visible(False)
    for r in rows:
        i, j = sources.index(r.get("source", "")), layers.index(r["layer"])
        ax = axes[i, j]
        ax.set_visible(True)
        x, y = np.asarray(r["similarity"]), np.asarray(r["gain"])
        tgt = list(r.get("target") or [""] * len(x))
        for t in dict.fromkeys(tgt):
            idx = [k for k, v in enumerate(tgt) if v == t]
            ax.scatter(x[idx], y[idx], color=colours.get(t, "C0"), s=14, label=t or None)
        few = int(r["n"]) < 3   # two points: r is +-1 and the line joins them, by construction
        if np.isfinite(r["slope"]) and not few:
            xs = np.linspace(min(r["similarity"]), max(r["similarity"]), 10)
            ax.plot(xs, r["slope"] * xs + r["intercept"], color="grey",
                    label="least squares, this source")
        ax.axhline(0, color="black", linewidth=0.5)
        # Two short lines: the layer names are long and the panels narrow.
        who = f"{r['source']}: " if r.get("source") else ""
        fit = ("no fit with < 3 runs" if few else f"Pearson r = {r['pearson_r']:.2f}")
        ax.set_title(f"{who}{r['layer']}\n{fit}, n = {int(r['n'])} runs", fontsize=9)
        ax.set_xlabel(f"{sim.label(method) if method else 'similarity'}, pre vs fine-tuned",
                      fontsize=8)
    for i in range(len(sources)):
        axes[i, 0].set_ylabel("relative AUC gain over random init\n"
                              "(AUC - AUC_random) / AUC_random")
    handles, labels = _legend_entries(axes.ravel())
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
        fig.tight_layout(rect=(0, 0.6 / (3.4 * len(sources) + 0.6), 1, 1))
    return _save(fig, path)


def filter_mosaic(kernel: np.ndarray, n: int = 36, in_channel: int = 0) -> np.ndarray:
    """The first ``n`` output filters of one input channel of an HWIO kernel, min-max
    scaled over the whole kernel (Revisiting ``filter_plot.py``: (W - min) / (max - min)),
    tiled row-major on a square grid with a 1-pixel NaN gap (drawn blank)."""
    k = np.asarray(kernel, np.float64)
    lo, hi = k.min(), k.max()
    k = (k - lo) / (hi - lo) if hi > lo else np.zeros_like(k)
    n = min(n, k.shape[3])
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    h, w = k.shape[:2]
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = k[:, :, in_channel, i]
    return out


def plot_first_layer_filters(kernels: Mapping[str, np.ndarray], path: str, *, n: int = 36,
                             in_channel: int = 0, title: str = "") -> str:
    """The first conv layer's filters as pictures, one panel per model (``kernels``: label
    -> HWIO ``conv1_conv`` kernel): Revisiting's ``filter_plot.py`` figure (the first 36
    filters of input channel 0, min-max over the whole kernel). Unlike its per-filter
    auto-scaled ``imshow``, every filter of a panel shares one grey scale, with a colour
    bar, so that a reader can compare filters and panels."""
    fig, axes = _panel_grid(len(kernels), 4, (2.6, 2.9), extra=(0.8, 0.3))
    im = None
    for ax, (label, kernel) in zip(axes, kernels.items()):
        im = ax.imshow(filter_mosaic(kernel, n, in_channel), cmap="gray", vmin=0, vmax=1,
                       interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    k0 = np.shape(next(iter(kernels.values())))
    fig.suptitle(title or f"conv1_conv filters 1-{min(n, k0[3])}, input channel {in_channel} "
                          f"({k0[0]}x{k0[1]}), each panel min-max scaled over its whole kernel",
                 fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes, fraction=0.02, pad=0.02,
                     label="(w - min) / (max - min)")
    return _save(fig, path)


def plot_weight_change(rows: Sequence[Mapping], path: str, title: str = "") -> str:
    """Relative L2 change and cosine per layer (network order); ``title`` names a and b
    (a PNG opened on its own has no caption to say which weights were compared)."""
    ok = [r for r in rows if r["status"] == "ok"]
    # a BatchNorm sits at its conv's x (conv2_block1_1_bn beside conv2_block1_1_conv), so
    # every position can carry its (short) name
    base = [_layer_base(r["layer"]) for r in ok]
    slots = list(dict.fromkeys(base))
    fig, axes = plt.subplots(2, 1, figsize=(max(10.0, 0.2 * len(slots) + 2), 6), sharex=True)
    if title:
        axes[0].set_title(title)
    for kind in dict.fromkeys(r["kind"] for r in ok):  # one line per layer kind
        idx = [i for i, r in enumerate(ok) if r["kind"] == kind]
        xs = [slots.index(base[i]) for i in idx]
        axes[0].plot(xs, [ok[i]["rel_l2"] for i in idx], ".-", label=kind)
        axes[1].plot(xs, [ok[i]["cosine"] for i in idx], ".-", label=kind)
    axes[0].set_ylabel("relative L2 change ||b-a||/||a||")
    axes[1].set_ylabel("cosine(a, b)")
    axes[1].set_xlabel("layer (network order; conv3.2_1 = conv3_block2_1_conv and its _bn)")
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(range(len(slots)))
    axes[1].set_xticklabels([short_layer(b) for b in slots], rotation=90, fontsize=6)
    return _save(fig, path)


def _layer_base(name: str) -> str:
    """'conv2_block1_1_bn' and 'conv2_block1_1_conv' -> 'conv2_block1_1'."""
    for tail in ("_conv", "_bn"):
        if name.endswith(tail):
            return name[:-len(tail)]
    return name


def _nan(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


#: Markers per test set, so the legend tells the tests apart even where a short legend
#: line cannot show its dashes.
TEST_MARKERS = {"iid": "o", "clean": "s", "ood": "^"}


def plot_robustness(summary: Sequence[Mapping], path: str, *,
                    marks: Optional[Mapping[tuple, str]] = None, metric: str = "auc",
                    errorbar: str = "sd", compared: str = "") -> str:
    """Source Matters' figure: AUC vs artefact fraction p, one panel per (target,
    confounder); one colour per source, one line style and marker per test set (i.i.d.
    solid o, clean dotted s, o.o.d. dashed ^); error bars = sample sd over folds
    (``errorbar='sd'``) or the 95 % bootstrap CI of the mean (``'ci95'``: the rows'
    ``auc_<test>_ci_low/high``, the band of the paper's seaborn figures).
    ``marks[(target, kind, p, test)]`` = significance stars of the between-source test
    (``compared``: which sources, for the legend), drawn once per setting in black above
    that test set's points. The series are dodged sideways (within 0.3 of the smallest
    gap between p values) so that error bars at the same p do not hide each other; the x
    ticks are the true p."""
    panels = list(dict.fromkeys((r["target"], r["confounder"]) for r in summary))
    colours = source_colours(list(dict.fromkeys(r["source"] for r in summary)))
    fig, axes = _panel_grid(len(panels), 2, (6.2, 4.4))
    for ax, (target, kind) in zip(axes, panels):
        sel = [r for r in summary if r["target"] == target and r["confounder"] == kind]
        folds = sorted({int(_finite_or_0(r.get("n_rows"))) for r in sel})
        sources = list(dict.fromkeys(r["source"] for r in sel))
        ps = sorted({float(r["p"]) for r in sel})
        gap = min(np.diff(ps)) if len(ps) > 1 else 1.0
        n_series = len(sources) * len(TEST_STYLES)
        step = 0.3 * gap / max(n_series, 1)
        k = 0
        tops: Dict[tuple, float] = {}   # (p, test) -> highest bar end, for the stars
        for src in sources:
            pts = sorted((float(r["p"]), r) for r in sel if r["source"] == src)
            for test, style in TEST_STYLES.items():
                dx = (k - (n_series - 1) / 2) * step
                k += 1
                ys = [_nan(r.get(f"auc_{test}")) for _, r in pts]
                rs = [r for _, r in pts]
                yerr = (_interval_err(ys, rs, f"auc_{test}_ci") if errorbar == "ci95"
                        else [_finite_or_0(r.get(f"auc_{test}_sd")) for r in rs])
                ax.errorbar([p + dx for p, _ in pts], ys, yerr=yerr, ls=style,
                            marker=TEST_MARKERS[test], ms=3.5, capsize=2, color=colours[src],
                            label=f"{src}, {TEST_NAMES[test]}")
                ups = yerr[1] if errorbar == "ci95" else yerr
                for (p, _), y, up in zip(pts, ys, ups):
                    if np.isfinite(y):
                        tops[(p, test)] = max(tops.get((p, test), -np.inf), y + up)
        for (p, test), top in tops.items():
            mark = (marks or {}).get((target, kind, p, test), "")
            if mark:
                ax.annotate(mark, (p, top), textcoords="offset points", xytext=(0, 3),
                            ha="center", color="black", fontsize=9)
        ax.axhline(0.5, ls=":", color="grey", lw=1, label="chance (AUC 0.5)")
        ax.set_xticks(ps)
        ax.set_xlabel("fraction p of positive training images with the artefact")
        bars = "95 % bootstrap CI of the mean" if errorbar == "ci95" else "sd over folds"
        ax.set_ylabel(f"test ROC-AUC ({metric};\nerror bars: {bars})")
        what = f"{kind} confounder" if target == kind else f"{target}: {kind} confounder"
        ax.set_title(f"{what} (n = {', '.join(map(str, folds))} folds)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if marks:
        handles.append(plt.Line2D([], [], ls="none"))
        labels.append("* p<.05, ** p<.01: permutation t-test"
                      + (f", {compared}" if compared else " between sources"))
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=min(len(labels), 3), fontsize=8, handlelength=3)
    return _save(fig, path)


#: What a box of :func:`_fold_boxes` is (``analysis.fold_plot=box``: Revisiting's
#: AUC_plot.py and similarity_plot.py draw seaborn boxplots of the folds).
BOX_WORDS = "boxes: median and quartiles over folds, whiskers to 1.5 IQR, ◆ beyond"


def _fold_boxes(ax, positions, values, width, *, label=None, **look):
    """One box per position over its fold values (non-finite ones dropped, empty ones
    skipped), filled with ``look`` (color, hatch); ``label`` names them once in the legend."""
    kept = [(x, [v for v in vs if np.isfinite(v)]) for x, vs in zip(positions, values)]
    kept = [(x, vs) for x, vs in kept if vs]
    if kept:
        boxes = ax.boxplot([vs for _, vs in kept], positions=[x for x, _ in kept],
                           widths=0.85 * width, patch_artist=True, manage_ticks=False,
                           medianprops=dict(color="black"),
                           flierprops=dict(marker="D", markersize=3, markerfacecolor="black"))
        for box in boxes["boxes"]:
            box.set(facecolor=look.get("color"), hatch=look.get("hatch"))
    if label:   # a zero-size bar as the legend's swatch (an empty bar has no colour)
        ax.bar([positions[0] if len(positions) else 0.0], [0.0], width=0.0,
               color=look.get("color"), hatch=look.get("hatch"), label=label)


def plot_auc_bars(rows: Sequence[Mapping], path: str, *, sources: Sequence[str],
                  folds: Optional[Sequence[Mapping]] = None) -> str:
    """Revisiting's AUC table per target and source: bars of the mean (``auc``, ``auc_sd``,
    ``auc_n`` folds per summary row) with sample-sd error bars; or, given ``folds`` (one
    row per run: ``target``, ``source``, ``auc``), the paper's boxplots of the folds."""
    targets = list(dict.fromkeys(r["target"] for r in rows))
    colours = source_colours(list(sources))
    fig, ax = plt.subplots(figsize=(min(12.0, max(5.0, 0.35 * len(targets) * len(sources)
                                                  + 1.5)), 4.2))
    width = 0.8 / max(len(sources), 1)
    for j, s in enumerate(sources):
        pts = {r["target"]: r for r in rows if r["source"] == s}
        xs = [i + (j - (len(sources) - 1) / 2) * width for i, t in enumerate(targets) if t in pts]
        look = dict(color=colours[s], hatch="//" if s.endswith("_frz") else None)
        if folds is not None:
            _fold_boxes(ax, xs, [[_nan(f.get("auc")) for f in folds if f["source"] == s
                                  and f["target"] == t] for t in targets if t in pts],
                        width, label=s, **look)
            continue
        ys = [_nan(pts[t].get("auc")) for t in targets if t in pts]
        err = [_finite_or_0(pts[t].get("auc_sd")) for t in targets if t in pts]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=s, **look)
    ax.axhline(0.5, ls=":", color="grey", lw=1, label="chance (AUC 0.5)")
    ax.set_xticks(range(len(targets)))
    ax.set_xticklabels(targets)
    ax.set_xlim(-0.6, len(targets) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_xlabel("target")
    ax.set_ylabel("test ROC-AUC\n(" + (BOX_WORDS if folds is not None
                                       else "bars: mean, error bars: sd over folds") + ")",
                  fontsize=9)
    ns = sorted({int(_finite_or_0(r.get("auc_n"))) for r in rows})
    # above the axes: inside, it covered the tallest bars
    ax.legend(fontsize=8, ncol=min(len(sources) + 1, 6), loc="lower center",
              bbox_to_anchor=(0.5, 1.1))
    ax.set_title(f"fine-tuning AUC per target and source (n = {', '.join(map(str, ns))} folds)")
    return _save(fig, path)


def plot_depth_drift(rows: Sequence[Mapping], path: str) -> str:
    """Filter KL drift pre vs fine-tuned per depth bin, one line per source (``drift`` mean,
    ``drift_sd`` sample sd over runs), with the noise floor (drift between two random
    halves of the pre-trained filters of that bin) dotted in the same colour."""
    colours = source_colours(list(dict.fromkeys(r["source"] for r in rows)))
    bins = list(dict.fromkeys(r["key"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    floors = set()   # a frozen variant starts from its twin's weights: one floor for both
    for src in dict.fromkeys(r["source"] for r in rows):
        pts = {r["key"]: r for r in rows if r["source"] == src}
        xs = [i for i, b in enumerate(bins) if b in pts]
        runs = int(_finite_or_0(pts[bins[xs[0]]].get("drift_n"))) if xs else 0
        ax.errorbar(xs, [_nan(pts[bins[i]]["drift"]) for i in xs],
                    yerr=[_finite_or_0(pts[bins[i]].get("drift_sd")) for i in xs],
                    color=colours[src], ls=source_style(src), capsize=3,
                    label=f"{src}: pre vs fine-tuned (n = {runs} runs)", **source_marker(src))
        floor = tuple(np.round([_nan(pts[bins[i]].get("noise_floor")) for i in xs], 12))
        if floor not in floors:
            floors.add(floor)
            ax.plot(xs, list(floor), ":", color=colours[src],
                    label=f"{src.split('_frz')[0]}: noise floor (two halves of its "
                          "pre-trained filters)")
    ax.set_xticks(range(len(bins)))
    ax.set_xticklabels(bins, rotation=30)
    ax.set_xlabel("normalised depth bin of the 3x3 conv layers")
    ax.set_ylabel("EV-weighted symmetric KL (nats;\nerror bars: sd over runs)")
    ax.set_title("3x3 filter distribution drift by depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), handlelength=3)
    return _save(fig, path)


def plot_layer_statistics(rows: Sequence[Mapping], path: str) -> str:
    """Sparsity and variance entropy of the 3x3 filters per layer, one line per model
    group (``model``), mean over its runs (``<stat>_sd`` error bars = sd over runs)."""
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    colours = source_colours([m.split(":")[0] for m in models])
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2))
    looks = {m: i for i, m in enumerate(models)}
    dodge = 0.5 / max(len(models), 1)   # each model's points a little aside, bars apart
    for ax, stat, label in ((axes[0], "sparsity", "sparsity (fraction of filters ~ 0)"),
                            (axes[1], "variance_entropy",
                             "variance entropy (log10; max log10 9 = 0.954)")):
        for m in models:
            pts = {r["layer"]: r for r in rows if r["model"] == m}
            xs = [i for i, l in enumerate(layers) if l in pts]
            ys = [_nan(pts[layers[i]][stat]) for i in xs]
            x = [i + (looks[m] - (len(models) - 1) / 2) * dodge for i in xs]
            colour, tuned = colours[m.split(":")[0]], m.endswith("fine-tuned")
            frozen = m.split(":")[0].endswith("_frz")
            # The line carries the legend entry (dashed = fine-tuned, solid = pre-trained;
            # squares = the frozen variant, filled when fine-tuned); bars without one.
            ax.plot(x, ys, color=colour, ls="--" if tuned else "-",
                    marker="s" if frozen else "o", ms=4,
                    mfc=colour if tuned else "none", label=m)
            ax.errorbar(x, ys, yerr=[_finite_or_0(pts[layers[i]].get(f"{stat}_sd"))
                                     for i in xs], fmt="none", ecolor=colour, capsize=2)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([short_layer(l) for l in layers], rotation=60, ha="right",
                           rotation_mode="anchor", fontsize=7)
        ax.set_xlabel("3x3 conv layer (network order; conv3.2_2 = conv3_block2_2_conv)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), handlelength=3)
    fig.suptitle("3x3 filter statistics per layer (error bars: sd over fine-tuned runs)")
    return _save(fig, path)


def short_layer(name: str) -> str:
    """'conv3_block2_2_conv' -> 'conv3.2_2', 'conv4_block6_out' -> 'conv4.6'."""
    for tail in ("_conv", "_out", "_relu"):
        name = name[:-len(tail)] if name.endswith(tail) else name
    return name.replace("_block", ".")


def plot_layer_map(lmap, method: str, path: str) -> str:
    """Heatmap of a layer_map.LayerMap's ``values[method]``: rows = A's layers, columns =
    B's layers, colour scale 0..1 with a colorbar; the title names the method, the
    spatial handling and n (wrapped to the figure's width). Writes a PNG (local or
    gs://) and returns its path."""
    mat = lmap.values[method]
    fig, ax = plt.subplots(figsize=(1.2 + 0.35 * len(lmap.layers_b),
                                    1.2 + 0.35 * len(lmap.layers_a)))
    low = float(np.nanmin(mat)) if np.isfinite(mat).any() else 0.0
    # debiased CKA dips below 0: the scale says so instead of painting it as 0
    im = ax.imshow(mat, vmin=min(0.0, low), vmax=1.0, cmap="magma", origin="lower")
    ax.set_xticks(range(len(lmap.layers_b)), [short_layer(l) for l in lmap.layers_b],
                  rotation=90)
    ax.set_yticks(range(len(lmap.layers_a)), [short_layer(l) for l in lmap.layers_a])
    ax.set_xlabel(f"{lmap.name_b} layer (conv3.2 = conv3_block2_out)")
    ax.set_ylabel(f"{lmap.name_a} layer")
    fig.colorbar(im, ax=ax, label=sim.label(method), fraction=0.046, pad=0.04)
    width = max(40, int(15 * fig.get_figwidth()))  # ~characters at 8 pt across the figure
    title = "\n".join(textwrap.fill(line, width) for line in lmap.title(method).split("\n"))
    ax.set_title(title, fontsize=8)
    return _save(fig, path)
