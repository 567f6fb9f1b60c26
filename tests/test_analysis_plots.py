"""What a reader sees in the study figures: the drawn data, legends and titles (the
figure objects are inspected before they are saved)."""
import numpy as np
import pytest

from medtransfer_jax.analysis import plots


@pytest.fixture
def drawn(monkeypatch):
    """Collects the figures the plot functions would save."""
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    yield figs
    plots.plt.close("all")   # the real _save closes each figure


def test_robustness_series_at_one_p_are_dodged_not_stacked(drawn):
    rows = [dict(target="chest", confounder="tag", source=s, p=p, n_rows=5,
                 **{f"auc_{t}": 0.7 + 0.01 * i for i, t in enumerate(plots.TEST_STYLES)},
                 **{f"auc_{t}_sd": 0.02 for t in plots.TEST_STYLES})
            for s in ("imagenet", "radimagenet") for p in (0.0, 0.1, 0.5, 1.0)]
    plots.plot_robustness(rows, "unused.png")
    (ax,) = drawn[0].axes
    series = [c.lines[0].get_xdata() for c in ax.containers]  # one errorbar per series
    assert len(series) == 2 * len(plots.TEST_STYLES)
    xs = np.array(series, dtype=float)             # (series, p)
    true_p = np.array([0.0, 0.1, 0.5, 1.0])
    # every series is off the others at each p, and stays within 0.15 of the 0.1 gap
    for j in range(4):
        assert len(set(np.round(xs[:, j], 9))) == len(series)
    assert np.abs(xs - true_p).max() <= 0.15 * 0.1 + 1e-12
    np.testing.assert_allclose(ax.get_xticks(), true_p)


def test_auc_gain_has_a_panel_row_per_source_points_coloured_by_target(drawn):
    def row(source, layer, slope):
        return dict(source=source, layer=layer, n=4, pearson_r=0.5, slope=slope, intercept=0.0,
                    similarity=[0.1, 0.2, 0.3, 0.4], gain=[0.0, 0.1, 0.1, 0.3],
                    target=["breast", "knee", "breast", "knee"])
    rows = [row("imagenet", "conv1_relu", 1.0), row("imagenet", "conv5_block3_out", 0.5),
            row("radimagenet", "conv1_relu", -1.0)]
    plots.plot_auc_vs_similarity(rows, "unused.png", method="paper_cca")
    fig = drawn[0]
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(fig.axes) == 4 and len(shown) == 3   # 2 sources x 2 layers, one pair absent
    titles = [ax.get_title() for ax in shown]
    assert titles[0].startswith("imagenet: conv1_relu\n") and "n = 4 runs" in titles[0]
    assert titles[2].startswith("radimagenet: conv1_relu\n")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["breast", "knee", "least squares, this source"]
    for ax, slope in zip(shown, (1.0, 0.5, -1.0)):  # each panel its own source's line
        colours = {tuple(c.get_facecolor()[0]) for c in ax.collections}
        assert len(colours) == 2                    # one colour per target
        (line,) = [l for l in ax.get_lines() if l.get_label().startswith("least squares")]
        xs, ys = line.get_data()
        assert (ys[-1] - ys[0]) / (xs[-1] - xs[0]) == pytest.approx(slope)
    assert plots.sim.label("paper_cca") in shown[0].get_xlabel()
    assert "AUC_random" in shown[0].get_ylabel() and "AUC_random" in shown[2].get_ylabel()

def test_the_random_sources_weight_change_starts_from_its_initialisation(tmp_path,
                                                                          monkeypatch):
    """a is the random initialisation for the random source, not 'pre-trained'."""
    import types
    import ml_collections
    from medtransfer_jax.studies import analyses
    titles = []
    monkeypatch.setattr(plots, "plot_weight_change",
                        lambda rows, path, title="": titles.append(title) or path)
    study = types.SimpleNamespace(
        config=ml_collections.ConfigDict({"sources": {"random": {"kind": "random"},
                                                      "imagenet": {"kind": "convert"}}}),
        path=lambda *p: str(tmp_path.joinpath(*p)))
    change = [dict(source=s, target="t", fold=0, layer="conv1", kind="conv", status="ok",
                   rel_l2=0.1, cosine=0.9) for s in ("random", "imagenet")]
    analyses._filter_figures(study, [], [], change)
    assert titles == ["random: a = its random initialisation, b = fine-tuned weights (mean "
                      "over 1 runs)", "imagenet: a = pre-trained, b = fine-tuned weights "
                      "(mean over 1 runs)"]


def test_weight_change_says_what_was_compared(drawn):
    rows = [dict(layer=f"l{i}", kind="conv", status="ok", rel_l2=0.01 * i, cosine=1 - 1e-4 * i)
            for i in range(3)]
    plots.plot_weight_change(rows, "unused.png", title="imagenet: a = pre-trained, b = "
                                                       "fine-tuned weights (mean over 5 runs)")
    assert "mean over 5 runs" in drawn[0].axes[0].get_title()
    # a ResNet's 106 conv + bn rows: each bn at its conv's position, every position named
    names = [f"conv{s}_block{b}_{k}" for s in (2, 3) for b in (1, 2) for k in (1, 2, 3)]
    rows = [dict(layer=f"{n}_{kind}", kind=kind, status="ok", rel_l2=0.1, cosine=0.9)
            for n in names for kind in ("conv", "bn")]
    plots.plot_weight_change(rows, "unused.png")
    ax = drawn[1].axes[1]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        plots.short_layer(n) for n in names]
    conv, bn = ax.get_lines()
    assert list(conv.get_xdata()) == list(bn.get_xdata()) == list(range(len(names)))


def test_prediction_similarity_over_folds_shows_the_spread_and_the_fold_count(drawn):
    rows = [dict(pair="a vs b", observed=0.6, observed_sd=0.1, observed_n=5,
                 expected_independent=0.5, expected_independent_sd=0.02, n=38)]
    plots.plot_prediction_similarity(rows, "unused.png")
    ax = drawn[0].axes[0]
    assert "38 test images per fold" in ax.get_title() and "over 5 folds" in ax.get_title()
    caps = [c for c in ax.containers if hasattr(c, "errorbar") and c.errorbar is not None]
    assert len(caps) == 2                                  # both bars carry the sd
    single = [dict(pair="a vs b", observed=0.6, expected_independent=0.5, n=38)]
    plots.plot_prediction_similarity(single, "unused.png")  # one comparison: no folds
    assert "folds" not in drawn[1].axes[0].get_title()
    assert "acc_A·acc_B" in drawn[1].legends[0].get_texts()[1].get_text()
    # the paper's mode: its val split and its baseline (A's accuracy twice), named as such
    paper = [dict(single[0], split="val", mode="paper")]
    plots.plot_prediction_similarity(paper, "unused.png")
    ax = drawn[2].axes[0]
    assert "38 val images" in ax.get_title() and "(fraction of val images)" in ax.get_ylabel()
    assert "acc_A² + (1−acc_A)²" in drawn[2].legends[0].get_texts()[1].get_text()
    # a study: one panel per target, each with its own pairs
    per_target = [dict(rows[0], target=t, pair=p) for t in ("breast", "chest", "knee")
                  for p in ("imagenet vs radimagenet", "imagenet vs random")]
    plots.plot_prediction_similarity(per_target, "unused.png", panel_key="target")
    shown = [ax for ax in drawn[3].axes if ax.get_visible()]
    assert [ax.get_title().split(":")[0] for ax in shown] == ["breast", "chest", "knee"]
    assert all([t.get_text() for t in ax.get_xticklabels()] == [
        "imagenet vs radimagenet", "imagenet vs random"] for ax in shown)


def test_filter_statistics_tell_pre_trained_from_fine_tuned_in_the_legend(drawn):
    rows = [dict(model=f"imagenet:{k}", layer=f"l{i}", sparsity=0.01 * i, sparsity_sd=0.0,
                 variance_entropy=0.9, variance_entropy_sd=0.01)
            for k in ("pre", "fine-tuned") for i in range(3)]
    plots.plot_layer_statistics(rows, "unused.png")
    handles, labels = drawn[0].axes[1].get_legend_handles_labels()
    styles = {lab: (h.get_linestyle(), h.get_marker()) for h, lab in zip(handles, labels)}
    assert styles["imagenet:pre"] != styles["imagenet:fine-tuned"]
    assert styles["imagenet:fine-tuned"][0] == "--"


def test_robustness_bars_are_the_bootstrap_ci_when_asked(drawn):
    """Source Matters' band (seaborn's 95 % bootstrap CI of the mean): the bar ends are the
    rows' CI ends, asymmetric; the axis says which bars it shows."""
    row = dict(target="chest", confounder="tag", source="imagenet", n_rows=5,
               **{f"auc_{t}": 0.7 for t in plots.TEST_STYLES},
               **{f"auc_{t}_sd": 0.05 for t in plots.TEST_STYLES},
               **{f"auc_{t}_ci_low": 0.66 for t in plots.TEST_STYLES},
               **{f"auc_{t}_ci_high": 0.72 for t in plots.TEST_STYLES})
    plots.plot_robustness([dict(row, p=p) for p in (0.0, 1.0)], "unused.png", errorbar="ci95",
                          metric="auc_keras")
    ax = drawn[0].axes[0]
    for c in ax.containers:
        segs = c.lines[2][0].get_segments()
        assert [tuple(np.round(sg[:, 1], 9)) for sg in segs] == [(0.66, 0.72)] * 2
    assert "95 % bootstrap CI of the mean" in ax.get_ylabel() and "auc_keras" in ax.get_ylabel()
    plots.plot_robustness([dict(row, p=p) for p in (0.0, 1.0)], "unused.png")
    segs = drawn[1].axes[0].containers[0].lines[2][0].get_segments()
    assert tuple(np.round(segs[0][:, 1], 9)) == (0.65, 0.75)   # sd: 0.7 +- 0.05
    assert "sd over folds" in drawn[1].axes[0].get_ylabel()


def test_auc_figures_draw_the_chance_line_and_similarities_stop_at_one(drawn):
    plots.plot_auc_bars([dict(target="breast", source="imagenet", auc=0.9, auc_sd=0.01,
                              auc_n=5)], "unused.png", sources=["imagenet"])
    rows = [dict(target="chest", confounder="tag", source="imagenet", p=p, n_rows=5,
                 **{f"auc_{t}": 0.7 for t in plots.TEST_STYLES},
                 **{f"auc_{t}_sd": 0.02 for t in plots.TEST_STYLES}) for p in (0.0, 1.0)]
    plots.plot_robustness(rows, "unused.png")
    for fig in drawn:
        ax = fig.axes[0]
        chance = [ln for ln in ax.lines if ln.get_label() == "chance (AUC 0.5)"]
        assert len(chance) == 1 and set(chance[0].get_ydata()) == {0.5}
    drawn.clear()
    plots.plot_layer_similarity(
        [dict(pair="a vs b", layer=l, method="linear_cka", value=v, std=0.01)
         for l, v in (("conv1_relu", 0.99), ("conv2_block1_out", 0.6))], "unused.png")
    assert drawn[0].axes[0].get_ylim()[1] <= 1.0


def test_many_pairs_get_panel_rows_and_lines_that_never_look_alike(drawn):
    """A Revisiting study has 15 pairs per target: in one panel with the 10-colour cycle
    pairs 11-15 looked like pairs 1-5. Panel rows by kind, and no two lines of a panel
    share colour and style; the axis stops at 1 even where mean + sd passes it."""
    rows = [dict(pair=f"pair {i}", layer=l, method="paper_cca", value=0.9, std=0.2,
                 kind="before vs after" if i < 4 else "between networks")
            for i in range(16) for l in ("conv1_relu", "conv2_block3_out")]
    plots.plot_layer_similarity(rows, "unused.png", panel_key="kind", title="breast")
    fig = drawn[0]
    assert [ax.get_title() for ax in fig.axes] == ["breast · before vs after",
                                                   "breast · between networks"]
    for ax, n in zip(fig.axes, (4, 12)):
        looks = {(c.lines[0].get_color(), c.lines[0].get_linestyle()) for c in ax.containers}
        assert len(looks) == n, looks
        assert ax.get_ylim()[1] == 1.0
    assert len({(plots.line_look(i)["color"], plots.line_look(i)["ls"]) for i in range(40)}) == 40


def test_first_layer_filters_are_the_papers_panels(drawn):
    """filter_plot.py's picture: the first 36 output filters of input channel 0 of the stem,
    (W - min) / (max - min) over the whole kernel; here on one shared 0..1 grey scale."""
    rng = np.random.default_rng(5)
    k = rng.normal(size=(7, 7, 3, 40))
    m = plots.filter_mosaic(k)
    assert m.shape == (6 * 8 - 1, 6 * 8 - 1)
    scaled = (k - k.min()) / (k.max() - k.min())
    for i in (0, 7, 35):
        r, c = divmod(i, 6)
        np.testing.assert_allclose(m[r * 8:r * 8 + 7, c * 8:c * 8 + 7], scaled[:, :, 0, i])
    assert np.isnan(m[7, :]).all() and np.isnan(m[:, 7]).all()   # the gaps between filters
    small = plots.filter_mosaic(k[..., :8], in_channel=2)        # a tiny stem: 8 filters
    assert small.shape == (3 * 8 - 1, 3 * 8 - 1) and np.isnan(small[16:, 16:]).all()  # 9th cell
    plots.plot_first_layer_filters({"imagenet: pre-trained": k, "fine-tuned: breast fold0": k * 2},
                                   "unused.png")
    fig = drawn[0]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["imagenet: pre-trained",
                                                 "fine-tuned: breast fold0"]
    for ax in panels:
        assert ax.images[0].get_clim() == (0, 1)
    title = fig._suptitle.get_text()
    assert "input channel 0" in title and "filters 1-36" in title


def test_robustness_stars_are_drawn_once_per_setting_not_on_every_source(drawn):
    """Three sources drawn, imagenet vs radimagenet tested: a star belongs to the test,
    not to each source's point (it used to sit on random's too)."""
    from medtransfer_jax.studies import analyses
    rows = [dict(target="tag", confounder="tag", source=s, p=p, n_rows=5,
                 **{f"auc_{t}": 0.7 + 0.05 * i for t in plots.TEST_STYLES},
                 **{f"auc_{t}_sd": 0.02 for t in plots.TEST_STYLES})
            for i, s in enumerate(("imagenet", "radimagenet", "random")) for p in (0.0, 1.0)]
    tests = [dict(target="tag", confounder="tag", p=1.0, test="ood", source_a="imagenet",
                  source_b="radimagenet", mark="**"),
             dict(target="tag", confounder="tag", p=0.0, test="ood", source_a="imagenet",
                  source_b="radimagenet", mark="")]
    plots.plot_robustness(rows, "unused.png", marks=analyses.robustness_marks(tests),
                          compared="imagenet vs radimagenet")
    ax = drawn[0].axes[0]
    stars = [t for t in ax.texts if t.get_text()]
    assert [(t.get_text(), t.xy[0]) for t in stars] == [("**", 1.0)]
    assert stars[0].xy[1] == pytest.approx(0.8 + 0.02)   # above the highest o.o.d. bar end
    assert ax.get_title() == "tag confounder (n = 5 folds)"
    labels = [t.get_text() for t in drawn[0].legends[0].get_texts()]
    assert labels[-1] == "* p<.05, ** p<.01: permutation t-test, imagenet vs radimagenet"
    markers = {c.lines[0].get_marker() for c in ax.containers}
    assert markers == set(plots.TEST_MARKERS.values())
    # several pairs tested: each significant one named
    two = tests + [dict(tests[0], source_b="random", mark="*")]
    assert analyses.robustness_marks(two)[("tag", "tag", 1.0, "ood")] == (
        "imagenet/radimagenet ** imagenet/random *")


def test_full_study_figures_keep_twins_apart_and_scales_honest(drawn):
    """What a 5-source study drew badly: imagenet_frz's drift looked like imagenet's and its
    (identical) noise floor was drawn twice; a negative debiased CKA painted as 0; eight
    stem panels in one strip."""
    from medtransfer_jax.analysis import layer_map as LM
    rows = [dict(source=s, key=k, drift=0.1, drift_sd=0.01, drift_n=5, noise_floor=0.05)
            for s in ("imagenet", "imagenet_frz") for k in ("[0.0, 0.1]", "(0.1, 0.2]")]
    plots.plot_depth_drift(rows, "unused.png")
    ax = drawn[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum("noise floor" in l for l in labels) == 1
    lines = {c.get_label(): c.lines[0] for c in ax.containers}
    twin = lines["imagenet_frz: pre vs fine-tuned (n = 5 runs)"]
    own = lines["imagenet: pre vs fine-tuned (n = 5 runs)"]
    assert (twin.get_marker(), twin.get_markerfacecolor()) != (own.get_marker(),
                                                              own.get_markerfacecolor())
    assert plots.short_layer("conv3_block2_2_conv") == "conv3.2_2"
    assert plots.short_layer("conv4_block6_out") == "conv4.6"
    mat = np.array([[1.0, -0.2], [0.3, 1.0]])
    two = ("conv1_relu", "conv2_block1_out")
    m = LM.LayerMap("a", "b", two, two, {"debiased_cka": mat}, 10, 10, "pool", (8, 8), (8, 8))
    plots.plot_layer_map(m, "debiased_cka", "unused.png")
    assert drawn[1].axes[0].images[0].get_clim() == (-0.2, 1.0)
    k = np.random.default_rng(0).normal(size=(7, 7, 3, 8))
    plots.plot_first_layer_filters({f"m{i}": k for i in range(8)}, "unused.png")
    shown = [a for a in drawn[2].axes if a.get_title()]
    rows_of = sorted({round(a.get_position().y0, 3) for a in shown})
    assert len(shown) == 8 and len(rows_of) == 2   # 2 rows of 4, not one strip of 8


def test_a_pair_keeps_its_colour_across_stages_and_the_chance_line_is_in_the_legend(drawn):
    looks = plots.pair_looks(["a vs b (pre)", "a vs b (fine-tuned)", "a (pre) vs a (fine-tuned)",
                              "r vs r (pre)"])
    assert looks["a vs b (pre)"]["color"] == looks["a vs b (fine-tuned)"]["color"]
    assert (looks["a vs b (pre)"]["ls"], looks["a vs b (fine-tuned)"]["ls"]) == ("-", "--")
    assert len({l["color"] for l in looks.values()}) == 3
    assert looks["a (pre) vs a (fine-tuned)"]["ls"] == "-"   # one pair across stages, solid
    rows = [dict(pair=p, layer=l, method=m, value=0.5, std=0.01,
                 null_mean=0.1 if m == "paper_cca" else None)
            for p in ("a vs b (pre)", "a vs b (fine-tuned)") for l in ("l1", "l2")
            for m in ("paper_cca", "linear_cka")]
    plots.plot_layer_similarity(rows, "unused.png")
    labels = [t.get_text() for t in drawn[0].axes[-1].get_legend().get_texts()]
    assert any(l.startswith("chance") for l in labels)   # drawn in the CCA panel only


def test_auc_gain_with_two_runs_shows_no_fit(drawn):
    row = dict(source="imagenet", layer="conv1_relu", n=2, pearson_r=1.0, slope=1.0,
               intercept=0.0, similarity=[0.1, 0.2], gain=[0.0, 0.1], target=["t", "t"])
    plots.plot_auc_vs_similarity([row], "unused.png")
    ax = drawn[0].axes[0]
    assert "no fit with < 3 runs" in ax.get_title() and "Pearson" not in ax.get_title()
    assert not [l for l in ax.get_lines() if l.get_label().startswith("least squares")]


def _box_stats(ax):
    """(median, q1, q3) of each box drawn on ``ax``, left to right, from the artists."""
    medians = [ln for ln in ax.lines if ln.get_color() == "black" and len(ln.get_xdata()) == 2
               and ln.get_ydata()[0] == ln.get_ydata()[1] and ln.get_linestyle() == "-"]
    from matplotlib.patches import PathPatch
    boxes = sorted((p for p in ax.patches if isinstance(p, PathPatch)),
                   key=lambda p: p.get_path().vertices[:, 0].min())
    out = []
    for box in boxes:
        ys = box.get_path().vertices[:, 1]
        x0 = box.get_path().vertices[:, 0].min()
        med = [m.get_ydata()[0] for m in medians if abs(m.get_xdata()[0] - x0) < 1e-9]
        out.append((med[0], ys.min(), ys.max()))
    return out


def test_fold_boxes_are_the_papers_boxplots_of_the_fold_values(drawn):
    rng = np.random.default_rng(0)
    folds = [dict(target=t, source=s, fold=k, auc=float(rng.uniform(0.6, 0.95)))
             for t in ("breast", "chest") for s in ("imagenet", "random") for k in range(5)]
    folds.append(dict(target="chest", source="random", fold=5, auc=float("nan")))  # failed
    summary = [dict(target=t, source=s, auc=0.8, auc_sd=0.05, auc_n=5)
               for t in ("breast", "chest") for s in ("imagenet", "random")]
    plots.plot_auc_bars(summary, "unused.png", sources=["imagenet", "random"], folds=folds)
    ax = drawn[0].axes[0]
    want = []
    for t in ("breast", "chest"):
        for s in ("imagenet", "random"):
            v = [f["auc"] for f in folds if (f["target"], f["source"]) == (t, s)
                 and np.isfinite(f["auc"])]
            want.append(tuple(np.percentile(v, [50, 25, 75])))
    assert np.allclose(_box_stats(ax), want)               # breast/imagenet, breast/random, ...
    assert "median and quartiles over folds" in ax.get_ylabel()
    legend = dict(zip((t.get_text() for t in ax.get_legend().get_texts()),
                      ax.get_legend().legend_handles))
    assert legend["imagenet"].get_facecolor() != legend["random"].get_facecolor()
    assert not any(c for c in ax.containers if getattr(c, "errorbar", None))  # no sd bars
    # prediction similarity: per pair, a box of observed and one of the baseline
    rows = [dict(target="breast", pair=p, fold=k, observed=float(rng.uniform(0.6, 0.9)),
                 expected_independent=float(rng.uniform(0.4, 0.6)), n=38)
            for p in ("a vs b", "a vs c") for k in range(5)]
    summ = [dict(target="breast", pair=p, observed=0.7, observed_sd=0.1, observed_n=5,
                 expected_independent=0.5, expected_independent_sd=0.05, n=38)
            for p in ("a vs b", "a vs c")]
    plots.plot_prediction_similarity(summ, "unused.png", panel_key="target", folds=rows)
    ax = drawn[1].axes[0]
    want = [tuple(np.percentile([r[k] for r in rows if r["pair"] == p], [50, 25, 75]))
            for p in ("a vs b", "a vs c") for k in ("observed", "expected_independent")]
    assert np.allclose(_box_stats(ax), want)
    assert "boxes over 5 folds" in ax.get_title()
