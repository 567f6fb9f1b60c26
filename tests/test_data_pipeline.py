"""grain pipelines: shapes, normalisation, determinism, resume, multi-process sharding, eval padding."""
import numpy as np
import pytest

from medtransfer_jax import data
from medtransfer_jax.data import pipeline
from medtransfer_jax.data.base import ArraySource

NO_AUG = None


def _source(n=40, size=20, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    return ArraySource(images, np.arange(n) % 2, ("a", "b"))


def _train(src, **kw):
    args = dict(image_size=16, preprocessing="unit", global_batch_size=8, seed=0, augment=NO_AUG,
                process_index=0, process_count=1)
    args.update(kw)
    return data.make_train_iter(src, **args)


def _take(it, k):
    return [next(it) for _ in range(k)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batch_format_and_normalisation_match_reference():
    src = _source()
    for mode in ("unit", "caffe", "radimagenet", "torch"):
        b = next(_train(src, preprocessing=mode))
        assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
        assert b["weight"].dtype == np.float32 and np.all(b["weight"] == 1)
        np.testing.assert_array_equal(b["label"], src.labels[b["index"]])
        # Reference: PIL resize of the record, grey replicated to RGB, then the mode's formula.
        for j in range(2):
            img = src[int(b["index"][j])]["image"]
            ref = pipeline.resize(img, 16).astype(np.float64)
            ref = np.repeat(ref[..., None], 3, -1)
            if mode == "unit":
                ref = ref / 255
            elif mode == "torch":
                ref = (ref / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
            else:
                ref = ref[..., ::-1] - [103.939, 116.779, 123.68]
                ref = ref / 255 if mode == "radimagenet" else ref
            np.testing.assert_allclose(b["image"][j], ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="preprocessing"):
        _train(src, preprocessing="bogus")


def test_epochs_cover_everything_and_reshuffle():
    src = _source(n=24)
    it = _train(src, global_batch_size=8)
    epochs = [np.concatenate([next(it)["index"] for _ in range(3)]) for _ in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(24))
    assert not np.array_equal(epochs[0], epochs[1])


def test_deterministic_from_seed_with_augmentation():
    src = _source()
    aug = data.default_data_config().augment
    a = _take(_train(src, seed=5, augment=aug), 3)
    b = _take(_train(src, seed=5, augment=aug), 3)
    c = _take(_train(src, seed=6, augment=aug), 3)
    assert _same(a, b)
    assert not np.array_equal(a[0]["index"], c[0]["index"])


def test_resume_from_state_gives_identical_batches():
    src = _source()
    aug = data.default_data_config().augment
    it = _train(src, augment=aug)
    _take(it, 4)
    state = it.get_state()
    cont = _take(it, 6)        # crosses an epoch boundary (40 examples / 8 = 5 steps per epoch)
    it2 = _train(src, augment=aug)
    it2.set_state(state)
    assert _same(cont, _take(it2, 6))


def test_orbax_checkpoint_of_iterator_state(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain
    src = _source()
    it = _train(src)
    _take(it, 3)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _take(it, 2)
    it2 = _train(src)
    mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it2)))
    assert _same(expected, _take(it2, 2))


def test_process_shards_are_disjoint_and_match_the_global_batch():
    src = _source(n=32)
    single = _take(_train(src, global_batch_size=8), 4)            # one epoch
    p0 = _take(_train(src, global_batch_size=8, process_index=0, process_count=2), 4)
    p1 = _take(_train(src, global_batch_size=8, process_index=1, process_count=2), 4)
    seen = []
    for s, a, b in zip(single, p0, p1):
        assert a["image"].shape[0] == 4 and b["image"].shape[0] == 4
        assert not set(a["index"]) & set(b["index"])
        assert set(a["index"]) | set(b["index"]) == set(s["index"])
        seen += list(a["index"]) + list(b["index"])
    assert sorted(seen) == list(range(32))
    with pytest.raises(ValueError, match="divisible"):
        _train(src, global_batch_size=7, process_index=0, process_count=2)


@pytest.mark.parametrize("n,procs", [(37, 1), (37, 3), (5, 2), (24, 3)])
def test_eval_exactly_once_with_padding(n, procs):
    src = _source(n=n)
    gb = 12 if procs != 2 else 8
    per_proc = [list(data.make_eval_iter(src, image_size=16, global_batch_size=gb, process_index=p,
                                         process_count=procs)) for p in range(procs)]
    nb = data.num_eval_batches(n, gb)
    idx = []
    for batches in per_proc:
        assert len(batches) == nb
        for b in batches:
            assert b["image"].shape == (gb // procs, 16, 16, 3)
            real = b["index"] >= 0
            np.testing.assert_array_equal(b["weight"], real.astype(np.float32))
            assert np.all(b["image"][~real] == 0)
            np.testing.assert_array_equal(b["label"][real], src.labels[b["index"][real]])
            idx += b["index"][real].tolist()
    assert sorted(idx) == list(range(n))
    assert nb * gb - n == sum(int((b["index"] < 0).sum()) for bs in per_proc for b in bs)


def test_worker_processes_give_the_same_stream_and_resume():
    src = _source(n=24)
    ref = _take(_train(src, augment=True), 5)
    it = _train(src, augment=True, worker_count=2)
    try:
        got = _take(it, 3)
        state = it.get_state()
        got += _take(it, 2)
    finally:
        it.close()
    assert _same(ref, got)
    it2 = _train(src, augment=True, worker_count=2)
    try:
        it2.set_state(state)
        assert _same(ref[3:], _take(it2, 2))
    finally:
        it2.close()


# ----------------------------------------------------------------- augmentation
def test_affine_warp_matches_scipy_reference():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (21, 17), dtype=np.uint8)
    theta = np.deg2rad(8.0)
    m = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) @ np.diag([1.1, 0.9])
    t = np.array([1.5, -2.0])
    got = pipeline.affine_warp(img, m, t, "nearest")
    c = (np.array(img.shape) - 1) / 2.0
    ref = ndimage.affine_transform(img.astype(np.float64), m, offset=c - m @ c + t, order=1, mode="nearest")
    assert np.abs(got.astype(int) - np.clip(np.rint(ref), 0, 255).astype(int)).max() <= 1
    rgb = np.stack([img, 255 - img, img // 2], -1)
    got3 = pipeline.affine_warp(rgb, m, t, "nearest")
    np.testing.assert_array_equal(got3[..., 0], got)


def test_augment_identity_flip_and_rotation90():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    zero = dict(pipeline._AUG_DEFAULTS)
    np.testing.assert_array_equal(pipeline.augment_image(img, np.random.default_rng(1), zero), img)
    flips = {pipeline.augment_image(img, np.random.default_rng(s), dict(zero, flip=True)).tobytes()
             for s in range(20)}
    assert flips == {img.tobytes(), img[:, ::-1].tobytes()}
    rot = pipeline.affine_warp(img, np.array([[0.0, 1.0], [-1.0, 0.0]]), np.zeros(2))
    np.testing.assert_array_equal(rot, np.rot90(img, 1))
    with pytest.raises(ValueError, match="Unknown augment"):
        pipeline._augment_cfg({"rotaton": 3})


def test_augmentation_changes_images_but_keeps_labels():
    src = _source(n=16, size=16)
    plain = next(_train(src, global_batch_size=16))
    aug = next(_train(src, global_batch_size=16, augment=dict(rotation_deg=10, shift=0.1, zoom=0.1)))
    np.testing.assert_array_equal(plain["index"], aug["index"])
    np.testing.assert_array_equal(plain["label"], aug["label"])
    assert not np.allclose(plain["image"], aug["image"])


def test_empty_source_is_a_clear_error():
    src = ArraySource(np.zeros((0, 8, 8), np.uint8), [], ("a", "b"))
    with pytest.raises(data.DataError, match="empty"):
        _train(src)


def test_fast_pil_warp_matches_numpy_reference():
    rng = np.random.default_rng(3)
    cfg = dict(pipeline._AUG_DEFAULTS, rotation_deg=20, zoom=0.2, shift=0.2, shear=5)
    for shape in [(37, 29), (24, 24, 3)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        for s in range(4):
            _, _, m, t = pipeline.augment_params(np.random.default_rng(s), cfg, shape[:2])
            for fill in ("nearest", "constant"):
                a = pipeline.affine_warp(img, m, t, fill).astype(int)
                b = pipeline.affine_warp_pil(img, m, t, fill).astype(int)
                inner = (slice(1, -1), slice(1, -1))  # constant fill: PIL blends the border pixel
                assert np.abs(a - b)[inner if fill == "constant" else ...].max() <= 1


def test_pipeline_benchmark_smoke():
    from medtransfer_jax.bench import pipeline as bench
    rows = bench.run(image_size=32, worker_counts=(0,), num_images=16, fmt="png", source_size=48,
                     batch_size=8, warmup_batches=1, measure_batches=2)
    assert rows[0]["images"] == 16 and rows[0]["images_per_s"] > 0
    assert "images/s" in bench.format_table(rows)


def test_resize_method_nearest_vs_bilinear_on_a_known_image():
    """Keras load_img (the papers) resizes with 'nearest'; data.resize_method picks the filter
    the pipelines use. A 1-pixel checkerboard 64 -> 32: nearest keeps every other pixel
    (output (i, j) reads input (2i + 1, 2j + 1), PIL's/Keras' pixel-centre rule), so the
    result is one flat value; bilinear averages the board to mid-grey."""
    yy, xx = np.mgrid[0:64, 0:64]
    board = (((yy + xx) % 2) * 255).astype(np.uint8)
    ref_nearest = board[1::2, 1::2].astype(np.float64)           # independent NumPy reference
    assert np.all(ref_nearest == 0)
    src = ArraySource(board[None], [0], ("a", "b"))
    got = {}
    for method in ("nearest", "bilinear"):
        it = data.make_eval_iter(src, image_size=32, preprocessing="unit", global_batch_size=1,
                                 process_index=0, process_count=1, resize_method=method)
        got[method] = next(it)["image"][0, ..., 0] * 255.0
    np.testing.assert_allclose(got["nearest"], ref_nearest, atol=1e-3)
    centre = got["bilinear"][4:-4, 4:-4]
    assert np.all(np.abs(centre - 127.5) < 2.0)                  # the board averaged away
    # A smooth image: nearest picks pixels, bilinear interpolates (they differ).
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    np.testing.assert_array_equal(pipeline.resize(ramp, 32, "nearest"), ramp[1::2, 1::2])
    assert not np.array_equal(pipeline.resize(ramp, 32, "bilinear"), ramp[1::2, 1::2])
    with pytest.raises(ValueError, match="resize method"):
        pipeline.resize(ramp, 32, "cubic-ish")
