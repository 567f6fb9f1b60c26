"""studies/tables.py and studies/progress.py: atomic tables, sample-sd summaries, ETA lines."""
import math
import os
import statistics

import pytest

from medtransfer_jax.studies import progress, tables

pytestmark = pytest.mark.fast  # pure NumPy/SciPy: no JAX compilation


def test_csv_roundtrip_atomic_and_summarise(tmp_path):
    rows = [dict(target="b", source="imagenet", fold=f, auc=a, values=[1, 2])
            for f, a in enumerate((0.91, 0.88, 0.95))]
    rows.append(dict(target="b", source="random", fold=0, auc=0.5))
    path = str(tmp_path / "t" / "runs.csv")
    tables.write_csv(path, rows)
    assert not os.path.exists(path + ".tmp")
    back = tables.read_csv(path)
    assert [r["auc"] for r in back] == [0.91, 0.88, 0.95, 0.5] and "values" not in back[0]
    assert tables.read_csv_if(str(tmp_path / "missing.csv")) == []
    s = {r["source"]: r for r in tables.summarise(back, ("target", "source"), "auc")}
    assert s["imagenet"]["auc"] == pytest.approx(statistics.mean([0.91, 0.88, 0.95]))
    assert s["imagenet"]["auc_sd"] == pytest.approx(statistics.stdev([0.91, 0.88, 0.95]))
    assert s["imagenet"]["auc_n"] == 3 and s["imagenet"]["n_rows"] == 3
    assert math.isnan(s["random"]["auc_sd"]) and s["random"]["auc_n"] == 1
    tables.write_json(str(tmp_path / "x.json"), {"a": [1, 2]})
    assert tables.read_json(str(tmp_path / "x.json")) == {"a": [1, 2]}


def test_progress_lines_and_eta():
    assert [progress.format_duration(s) for s in (41, 250, 4320, float("nan"))] == [
        "41 s", "4m10s", "1h12m", "?"]
    t = [0.0]
    lines = []
    p = progress.Progress("run", 175, done_before=6, parallel=2, clock=lambda: t[0],
                          echo=lambda line, flush: lines.append(line))
    assert math.isnan(p.eta())
    line = p.item_done("breast/imagenet/fold2", 41.0, "test AUC 0.912")
    # 168 left x 41 s / 2 at once = 3444 s
    assert line == "run 7/175 breast/imagenet/fold2: test AUC 0.912, 41 s, ETA 57m24s"
    assert lines == [line]
    p.item_done("x", 59.0)
    assert p.eta() == pytest.approx(167 * 50.0 / 2)
