"""Confounders do what they say; the confounded splits follow the study's rules."""
import os

import numpy as np
import pytest

from medtransfer_jax import data
from medtransfer_jax.data import confounders, splits

pytestmark = pytest.mark.fast  # pure NumPy/SciPy: no JAX compilation


def _rng_image(size=96, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def test_lowpass_removes_frequencies_outside_the_circle():
    img = _rng_image(96)
    d = 30.0
    out_f = confounders.lowpass_float(img, d)
    spec_out = np.fft.fftshift(np.fft.fft2(out_f))
    spec_in = np.fft.fftshift(np.fft.fft2(img.astype(np.float64)))
    # Independent mask: radial frequency index from fftfreq.
    fy = np.fft.fftshift(np.fft.fftfreq(96)) * 96
    r = np.sqrt(fy[:, None] ** 2 + fy[None, :] ** 2)
    outside = r > d / 2
    assert np.sum(np.abs(spec_out[outside]) ** 2) < 1e-20 * np.sum(np.abs(spec_in) ** 2)
    np.testing.assert_allclose(spec_out[~outside], spec_in[~outside], rtol=1e-9, atol=1e-6)
    # The 8-bit result: almost no energy left outside (only clipping/rounding).
    out8 = confounders.lowpass(img, d / 96)
    assert out8.dtype == np.uint8 and out8.shape == img.shape
    s8 = np.abs(np.fft.fftshift(np.fft.fft2(out8.astype(np.float64) - out8.mean()))) ** 2
    s0 = np.abs(np.fft.fftshift(np.fft.fft2(img.astype(np.float64) - img.mean()))) ** 2
    assert s8[outside].sum() < 0.02 * s0[outside].sum()
    rgb = np.stack([img, img, 255 - img], -1)
    np.testing.assert_array_equal(confounders.lowpass(rgb, d / 96)[..., 0], out8)


def test_tag_changes_only_its_box():
    for size in (64, 256):
        img = np.zeros((size, size), np.uint8)
        out = confounders.add_tag(img, "R", size=0.125, x=0.25, y=0.5)
        left, top, right, bottom = confounders.tag_box(img.shape, "R", 0.125, 0.25, 0.5)
        changed = np.argwhere(out != img)
        assert len(changed) > 0.05 * (right - left) * (bottom - top)
        assert changed[:, 0].min() >= top and changed[:, 0].max() < bottom
        assert changed[:, 1].min() >= left and changed[:, 1].max() < right
        assert left >= int(0.25 * size) - 1 and top >= int(0.5 * size) - 1
        assert out.max() == 255
    rgb = np.zeros((64, 64, 3), np.uint8)
    assert confounders.add_tag(rgb, "R", 0.25, 0.1, 0.1).shape == (64, 64, 3)



def test_the_tag_font_is_the_one_include_tag_py_looked_up(tmp_path):
    """Source Matters drew the 'R' in FontProperties(family='sans-serif', weight='light')
    via findfont; tag_font='light' resolves the same way (DejaVu Sans regular before), ''
    keeps matplotlib's DejaVu Sans, and a wrong path is a DataError naming the field."""
    from matplotlib import font_manager
    want = font_manager.findfont(font_manager.FontProperties(family="sans-serif",
                                                             weight="light"))
    assert confounders.tag_font_file("light") == want
    assert confounders.tag_font_file("").endswith("DejaVuSans.ttf")
    art = confounders.make_artifact(_cfg("tag", tag_font="light").confounder)
    assert dict(art.params)["tag_font"] == want
    img = np.zeros((256, 256), np.uint8)
    light = confounders.add_tag(img, "R", 0.25, 0.1, 0.1, font=want)
    regular = confounders.add_tag(img, "R", 0.25, 0.1, 0.1)
    assert light.max() == 255
    if want != confounders.tag_font_file(""):     # a lighter face draws fewer pixels
        assert (light > 0).sum() < (regular > 0).sum()
    with pytest.raises(data.DataError, match="tag_font='/no/such.ttf'"):
        confounders.tag_font_file("/no/such.ttf")
    from medtransfer_jax import configs
    c = configs.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "configs", "source_matters", "tag.py") + ":imagenet")
    assert c.data.confounder.tag_font == "light"

@pytest.mark.parametrize("value", [60, 128])
def test_noise_statistics_follow_the_photon_count(value):
    img = np.full((256, 256), value, np.uint8)
    stds = {}
    for photons in (2e7, 1.5e7, 2e6):
        out = confounders.ct_noise(img, photons, np.random.default_rng(0))
        # Independent prediction (delta method): var(-log(Poisson(N t)/N)) ~= 1 / (N t), t = exp(-mu);
        # plus uniform de-quantisation and the truncation to uint8 (each variance 1/12).
        hu = (value + 0.5) / 255 * 2000 - 1200
        mu = hu * (0.1837 - 0.1662) / 1000 + 0.1837
        sd_hu = 1000 / (0.1837 - 0.1662) * np.sqrt(1 / (photons * np.exp(-mu)))
        expected = np.sqrt((sd_hu * 255 / 2000) ** 2 + 2 / 12)
        measured = out.astype(np.float64).std()
        assert abs(measured - expected) < 0.05 * expected, (photons, measured, expected)
        assert abs(out.mean() - value) < 1.0  # unbiased up to the truncation
        stds[photons] = measured
    assert stds[1.5e7] > 1.08 * stds[2e7] and stds[2e6] > 2 * stds[2e7]
    big = confounders.ct_noise(np.full((1024, 1024), 100, np.uint8), 2e7, np.random.default_rng(0), resize=512)
    assert big.shape == (512, 512)


def _cfg(kind, p=0.5, n=200, **kw):
    cfg = data.default_data_config()
    cfg.synthetic.num_examples = n
    cfg.synthetic.image_size = 48
    cfg.confounder.kind = kind
    cfg.confounder.p = p
    for k, v in kw.items():
        cfg.confounder[k] = v
    return cfg


@pytest.mark.parametrize("kind", ["tag", "lowpass", "noise"])
def test_artifact_splits_follow_the_rules(kind):
    sp = data.get_splits(_cfg(kind, p=0.5, tag_size=0.25), fold=0)
    assert set(sp.extra_tests) == {"iid", "clean", "ood"}
    base = data.get_splits(_cfg("none"), fold=0)
    assert list(sp.train.ids) == list(base.train.ids)
    for split in (sp.train, sp.val, sp.extra_tests["iid"]):
        conf = split.meta["confounded"].astype(bool)
        pos = split.labels == 1
        assert not conf[~pos].any()
        assert conf[pos].sum() == round(0.5 * pos.sum())
    ood, clean = sp.extra_tests["ood"], sp.extra_tests["clean"]
    np.testing.assert_array_equal(ood.meta["confounded"].astype(bool), ood.labels == 0)
    assert not clean.meta["confounded"].any()
    # Pixels: the clean test is the originals (as the study's 'images' folder, also for
    # noise); confounded images differ from them; unconfounded ood images equal them
    # except for noise, whose ood test carries the clean-level noise on positives.
    for i in range(6):
        c, o = clean[i]["image"], ood[i]["image"]
        assert np.array_equal(c, base.test[i]["image"])
        if kind != "noise":
            assert (not np.array_equal(c, o)) == (ood.labels[i] == 0)
    # Deterministic.
    sp2 = data.get_splits(_cfg(kind, p=0.5, tag_size=0.25), fold=0)
    j = int(np.flatnonzero(sp.train.meta["confounded"])[0])
    np.testing.assert_array_equal(sp.train[j]["image"], sp2.train[j]["image"])


def test_fraction_p_extremes():
    for p in (0.0, 1.0):
        sp = data.get_splits(_cfg("tag", p=p), fold=1)
        pos = sp.train.labels == 1
        assert sp.train.meta["confounded"][pos].mean() == p


def test_sampled_attribute_correlation_and_reversed_test():
    for p in (0.0, 0.5, 1.0):
        cfg = _cfg("sampled", p=p, n=600)
        sp = data.get_splits(cfg, fold=0)
        tr = np.concatenate([sp.train.labels, sp.val.labels])
        sex = np.concatenate([sp.train.meta["sex"], sp.val.meta["sex"]])
        assert np.all(sex[tr == 0] == "M")
        frac_f = np.mean(sex[tr == 1] == "F")
        assert abs(frac_f - p) < 0.1, (p, frac_f)
        ood = sp.extra_tests["ood"]
        assert np.all(ood.meta["sex"][ood.labels == 1] == "M") and np.all(ood.meta["sex"][ood.labels == 0] == "F")
        clean = sp.extra_tests["clean"]
        for lab in (0, 1):
            s = clean.meta["sex"][clean.labels == lab]
            assert abs(np.mean(s == "F") - 0.5) < 0.1
        assert sp.test is ood
        allg = [sp.train.groups, sp.val.groups] + [t.groups for t in sp.extra_tests.values()]
        # tests may share patients with each other, never with train/val
        train_groups = set(np.concatenate(allg[:2]))
        for t in sp.extra_tests.values():
            assert not train_groups & set(t.groups)
        splits.check_no_leakage(np.concatenate(allg[:2]), np.arange(len(sp.train)),
                                np.arange(len(sp.val)) + len(sp.train))



def test_sampled_n_caps_the_training_images_per_class_and_is_a_config_field():
    """confounder.sampled_n (documented, read by sampled_splits) can be set like any field:
    it was missing from the schema, so no config or override could reach it."""
    from medtransfer_jax import configs
    cfg = configs.override(_cfg("sampled", p=0.5, n=600), ["confounder.sampled_n=20"])
    sp = data.get_splits(cfg, fold=0)
    assert sp.info["n_per_class_train_pool"] == 20
    labels = np.concatenate([sp.train.labels, sp.val.labels])
    assert (labels == 1).sum() == (labels == 0).sum() == 20
    full = data.get_splits(_cfg("sampled", p=0.5, n=600), fold=0)
    assert full.info["n_per_class_train_pool"] > 20

def test_bad_confounder_configs():
    with pytest.raises(data.DataError, match="attribute"):
        data.get_splits(_cfg("sampled", attribute="height"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        data.get_splits(_cfg("tag", p=1.5))
    cfg = _cfg("tag")
    cfg.synthetic.num_classes = 3
    with pytest.raises(data.DataError, match="binary"):
        data.get_splits(cfg)


def test_noise_p0_run_and_clean_test_are_the_originals():
    """Source Matters trained its p = 0 baseline and read its clean test from the original
    images: no clean-level noise there (it used to be added to every image)."""
    sp = data.get_splits(_cfg("noise", p=0.0, n=60), fold=0)
    base = data.get_splits(_cfg("none", n=60), fold=0)
    for split, ref in ((sp.train, base.train), (sp.extra_tests["iid"], base.test),
                       (sp.extra_tests["clean"], base.test)):
        assert not split.meta["confounded"].any()
        for i in range(3):
            np.testing.assert_array_equal(split[i]["image"], ref[i]["image"])
    # The ood test still carries noise; and the old behaviour stays one switch away.
    ood = sp.extra_tests["ood"]
    assert not np.array_equal(ood[0]["image"], base.test[0]["image"])
    noisy = data.get_splits(_cfg("noise", p=0.0, n=60, p0_originals=False,
                                 clean_test_originals=False), fold=0)
    assert not np.array_equal(noisy.train[0]["image"], base.train[0]["image"])
    assert not np.array_equal(noisy.extra_tests["clean"][0]["image"], base.test[0]["image"])


def test_the_noise_shrink_is_cv2s_linear_resize():
    """include_noise.py: cv2.resize(image, (512, 512)), INTER_LINEAR: an exact 2x
    reduction is the 2 x 2 mean (PIL's antialiased BILINEAR, used before, is not); other
    scales equal scipy's order-1 interpolation at cv2's half-pixel source positions."""
    from scipy import ndimage
    img = _rng_image(64, seed=3)
    half = confounders.resize_linear_cv2(img, 32, 32)
    block = img.reshape(32, 2, 32, 2).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_array_equal(half, np.floor(block + 0.5).astype(np.uint8))
    out = confounders.resize_linear_cv2(img, 27, 41)
    ys = np.clip((np.arange(27) + 0.5) * 64 / 27 - 0.5, 0, 63)
    xs = np.clip((np.arange(41) + 0.5) * 64 / 41 - 0.5, 0, 63)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    ref = ndimage.map_coordinates(img.astype(np.float64), [yy, xx], order=1, mode="nearest")
    assert np.abs(out.astype(np.float64) - ref).max() <= 0.5 + 1e-9
    # the noise confounder shrinks with it (1024 -> 512 in the study; 64 -> 32 here)
    noisy = confounders.ct_noise(img, 2e7, np.random.default_rng(0), resize=32)
    assert noisy.shape == (32, 32)
