"""Device-resident data: warp vs the NumPy reference, order/resume, batches vs the grain path."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from medtransfer_jax import data
from medtransfer_jax.data import device_cache, pipeline
from medtransfer_jax.data.base import ArraySource, DataError
from medtransfer_jax import sharding


def _source(n=24, size=20, seed=0, rgb=False):
    rng = np.random.default_rng(seed)
    shape = (n, size, size, 3) if rgb else (n, size, size)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    return ArraySource(images, np.arange(n) % 2, ("a", "b"))


@pytest.mark.parametrize("fill", ["nearest", "constant"])
def test_warp_matches_numpy_reference(fill):
    """Same (M, t) -> the jitted warp equals pipeline.affine_warp within rounding."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(4, 24, 20, 3), dtype=np.uint8)
    cfg = dict(pipeline._AUG_DEFAULTS, rotation_deg=10, shift=0.1, shear=0.1, zoom=0.1)
    params = [pipeline.augment_params(rng, cfg, (24, 20)) for _ in range(4)]
    mats = np.stack([p[2] for p in params]).astype(np.float32)
    shifts = np.stack([p[3] for p in params]).astype(np.float32)
    ours = np.asarray(jax.jit(device_cache.warp, static_argnums=3)(img, mats, shifts, fill))
    for i in range(4):
        ref = pipeline.affine_warp(img[i], mats[i], shifts[i], fill).astype(np.float32)
        # float32 coordinate rounding may move a pixel across an integer boundary: allow
        # 1 grey level almost everywhere, and require most pixels exact after rounding.
        diff = np.abs(np.round(ours[i]) - ref)
        assert diff.max() <= 2, diff.max()
        assert np.mean(diff == 0) > 0.97


def test_identity_warp_is_exact():
    img = np.random.default_rng(0).integers(0, 256, size=(2, 9, 7, 1), dtype=np.uint8)
    eye = np.tile(np.eye(2, dtype=np.float32), (2, 1, 1))
    out = device_cache.warp(jnp.asarray(img), eye, np.zeros((2, 2), np.float32))
    np.testing.assert_array_equal(np.asarray(out), img.astype(np.float32))


def test_random_params_follow_the_configured_ranges():
    cfg = dict(pipeline._AUG_DEFAULTS, flip=True, rotation_deg=10, shift=0.1, zoom=0.2)
    fh, fv, m, t = device_cache.random_params(jax.random.key(0), 4000, cfg, (100, 50))
    fh, fv, m, t = map(np.asarray, (fh, fv, m, t))
    assert 0.45 < fh.mean() < 0.55 and not fv.any()  # vflip off
    assert np.all(np.abs(t[:, 0]) <= 10 + 1e-4) and np.all(np.abs(t[:, 1]) <= 5 + 1e-4)
    assert np.abs(t[:, 0]).max() > 9  # the range is used
    det = np.linalg.det(m)  # rotation keeps the determinant; zoom in [0.8, 1.2] per axis
    assert det.min() >= 0.8 ** 2 - 1e-4 and det.max() <= 1.2 ** 2 + 1e-4


def test_train_order_epochs_are_permutations_and_state_resumes():
    order = device_cache.TrainOrder(num_examples=10, global_batch_size=4, seed=3)
    stream = np.concatenate([next(order) for _ in range(5)])  # 20 elements = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:])  # reshuffled per epoch
    state = order.get_state()
    a = [next(order) for _ in range(3)]
    resumed = device_cache.TrainOrder(num_examples=10, global_batch_size=4, seed=3)
    resumed.set_state(state)
    b = [next(resumed) for _ in range(3)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    other = device_cache.TrainOrder(num_examples=11, global_batch_size=4, seed=3)
    with pytest.raises(DataError, match="num_examples"):
        other.set_state(state)


@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("mode", ["unit", "caffe", "radimagenet"])
def test_unaugmented_batches_equal_the_grain_eval_pipeline(rgb, mode):
    src = _source(n=13, rgb=rgb)
    images, labels = device_cache.decode_split(src, 16)
    assert images.shape == (13, 16, 16, 3 if rgb else 1)
    mesh = sharding.make_mesh()
    cache = device_cache.DeviceCache(images, labels, mesh)
    batch_fn = cache.make_batch_fn(mode)
    it = data.make_eval_iter(src, image_size=16, preprocessing=mode, global_batch_size=8,
                             process_index=0, process_count=1)
    for idx, ref in zip(cache.eval_indices(8), it):
        got = jax.device_get(batch_fn(idx))
        np.testing.assert_array_equal(got["index"], ref["index"])
        np.testing.assert_array_equal(got["weight"], ref["weight"])
        keep = ref["weight"] > 0
        np.testing.assert_array_equal(got["label"][keep], ref["label"][keep])
        np.testing.assert_allclose(got["image"][keep], ref["image"][keep], atol=1e-5)


def test_augmented_batches_are_a_function_of_seed_and_step():
    src = _source(n=16)
    images, labels = device_cache.decode_split(src, 16)
    cache = device_cache.DeviceCache(images, labels, sharding.make_mesh())
    aug = dict(flip=True, rotation_deg=10, shift=0.1, shear=0.1, zoom=0.1)
    fn = cache.make_batch_fn("unit", augment=aug, seed=0)
    idx = np.arange(8, dtype=np.int32)
    a, b, c = (np.asarray(fn(idx, s)["image"]) for s in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    plain = np.asarray(cache.make_batch_fn("unit")(idx)["image"])
    assert not np.array_equal(a, plain)
    # Warped values stay on the uint8 grid (the grain path rounds too) and in range.
    np.testing.assert_allclose(a * 255, np.round(a * 255), atol=1e-3)
    assert a.min() >= 0 and a.max() <= 1


def test_sharded_placement_gives_the_same_batches():
    src = _source(n=13)
    images, labels = device_cache.decode_split(src, 16)
    mesh = sharding.make_mesh()
    rep = device_cache.DeviceCache(images, labels, mesh).make_batch_fn("unit")
    shd = device_cache.DeviceCache(images, labels, mesh, placement="sharded").make_batch_fn("unit")
    idx = np.array([12, 0, 5, -1, 3, 7, 11, -1], np.int32)
    for k in ("image", "label", "weight", "index"):
        np.testing.assert_array_equal(np.asarray(rep(idx)[k]), np.asarray(shd(idx)[k]))


def test_too_large_for_the_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(device_cache, "device_memory_bytes", lambda d: 1000)
    with pytest.raises(DataError, match="data.cache=none"):
        device_cache.check_fits(10_000, "replicated", sharding.make_mesh())


def test_device_input_bench_runs_and_reports_the_ratio():
    from medtransfer_jax.bench import device_input
    rows = device_input.run(depth=18, image_size=32, batch_size=8, width=8, num_examples=24,
                            iters=1, repeats=1)
    assert [r["input"] for r in rows] == ["in_memory", "device_cache"]
    assert rows[0]["vs_in_memory"] == 1.0
    assert rows[1]["cache_mb"] > 0 and np.isfinite(rows[1]["vs_in_memory"])
    assert all(r["img_per_s"] > 0 for r in rows)
