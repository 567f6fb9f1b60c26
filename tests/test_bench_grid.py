"""bench grid, scaled down: the real protocol files through the real loop, projected."""
import jax
import pytest

from medtransfer_jax import compile_cache
from medtransfer_jax.bench import grid
from medtransfer_jax.errors import UserError


@pytest.fixture()
def persistent_cache(tmp_path):
    """A fresh persistent cache that keeps every program (CPU compiles are quick)."""
    old = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield tmp_path / "xla"
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def test_grid_projects_the_full_study_from_measured_epochs(persistent_cache, tmp_path):
    rows = grid.run(targets=("breast", "knee"), scale=0.1, width=8, depth=18, max_image_size=32,
                    max_batch=16, dtype="float32", cache="device", workdir=str(tmp_path / "w"))
    breast, knee, total = rows
    assert breast["size"] == 32 and breast["batch"] == 16 and breast["epochs"] == 30
    assert knee["images"] == round(5222 * 0.1)  # the paper's N, scaled
    for r in (breast, knee):
        assert r["epoch_s"] > 0 and r["run_s"] >= r["epochs"] * r["epoch_s"]
        assert r["frz_run_s"] > r["run_s"]
        assert r["target_grid_s"] == pytest.approx(5 * (3 * r["run_s"] + 2 * r["frz_run_s"]))
        # The second run of the same shapes reads its programs from the persistent cache.
        assert r["warm_cache_hits"] > 0
    assert total["target_grid_s"] == pytest.approx(breast["target_grid_s"] + knee["target_grid_s"])
    assert total["target"].startswith("TOTAL (50 runs)")
    assert any(persistent_cache.iterdir())


def test_unknown_target_is_a_user_error():
    with pytest.raises(UserError, match="unknown target"):
        grid.run(targets=("lung",))
