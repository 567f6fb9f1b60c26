"""Source Matters confounders: synthetic artefacts and sampled attribute-label correlations.

Artefacts (``confounder.kind`` in 'tag', 'lowpass', 'noise'), as in the study's scripts:

* ``tag``: a white letter (default 'R', DejaVu Sans, the matplotlib 'sans-serif' the study
  used) drawn at a fixed position and size, given as fractions of the image side (the
  study: size 64 at (200, 200) on 1024-px chest X-rays).
* ``lowpass``: FFT, ideal circular mask of the given diameter centred on the zero
  frequency, inverse FFT, clip to [0, 255] (the study: diameter 500 px on 1024 px).
* ``noise``: simulated CT/X-ray acquisition noise: uniform de-quantisation, 8-bit value ->
  HU in the window [-1200, 800] -> attenuation (mu_water 0.1837, mu_air 0.1662), Poisson
  counts at ``photons`` per pixel on exp(-mu), back to HU and 8 bit. The study added 2e7
  photons to every image and 1.5e7 (more noise) to the confounded ones, after resizing to
  512 px.

In training a fraction ``p`` of the positive images (exactly ``round(p * n_pos)``, chosen
by ``confounder.seed``) carries the artefact; validation follows the same rule. Tests
(``DatasetSplits.extra_tests``): ``iid`` (the training rule, also ``splits.test``),
``clean`` (no artefact) and ``ood`` (artefact on every negative, none on positives).
As in the study, the ``clean`` test is the original images (no clean-level noise either;
``confounder.clean_test_originals``), and the p = 0 run trains and tests on the
originals (``confounder.p0_originals``).

Sampled (``kind='sampled'``): a metadata attribute (e.g. ``sex``) is tied to the label:
training positives have value ``attribute_positive`` with probability ``p`` (else
``attribute_negative``), every training negative has ``attribute_negative``; the
reversed ``ood`` test has positives with ``attribute_negative`` and negatives with
``attribute_positive`` (the study's NIH 'Atelectasis vs No Finding' sex experiment).
Extra tests: ``ood``, ``iid`` (the training rule) and ``clean`` (attribute balanced in
both classes). No patient appears in two of train / val / tests.

Every artefact is a pure function of (image, example id, config), so the confounded
dataset is deterministic, needs no storage, and is the same ``DatasetSplits`` object the
trainer consumes.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medtransfer_jax.data import splits as splits_lib
from medtransfer_jax.data.base import DataError, DatasetSplits, Source, SubsetSource, TransformedSource
from medtransfer_jax.data.config import default_confounder_config

log = logging.getLogger(__name__)

MU_WATER = 0.1837
MU_AIR = 0.1662
HU_WINDOW = (-1200.0, 800.0)
ARTIFACTS = ("tag", "lowpass", "noise")


# ---------------------------------------------------------------------------------------
# The artefacts (uint8 (H, W) or (H, W, 3) in, same shape out)
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def tag_font_file(tag_font: str = "") -> str:
    """The font file of ``confounder.tag_font``: '' = matplotlib's DejaVu Sans; 'light' =
    what ``font_manager.findfont(FontProperties(family='sans-serif', weight='light'))``
    returns here (Source Matters' include_tag.py; the file depends on the installed
    fonts, and is logged); anything else is a path, which must exist."""
    import matplotlib
    from matplotlib import font_manager
    if not tag_font:
        return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    if tag_font == "light":
        path = font_manager.findfont(font_manager.FontProperties(family="sans-serif",
                                                                 weight="light"))
        log.info("tag font (sans-serif, light, as include_tag.py): %s", path)
        return path
    if not os.path.isfile(os.path.expanduser(tag_font)):
        raise DataError(f"data.confounder.tag_font={tag_font!r} is not a font file; give a "
                        ".ttf path, 'light' or '' (matplotlib's DejaVu Sans)")
    return os.path.expanduser(tag_font)


@functools.lru_cache(maxsize=32)
def _font(size: int, path: str = ""):
    try:
        return ImageFont.truetype(path or tag_font_file(""), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def tag_box(shape, text: str = "R", size: float = 0.0625, x: float = 0.1953, y: float = 0.1953,
            font: str = ""):
    """The pixel box (left, top, right, bottom) the tag's glyph covers in an image of
    ``shape`` (``font``: a font file, '' = matplotlib's DejaVu Sans)."""
    h, w = shape[:2]
    font = _font(max(1, int(round(size * min(h, w)))), font)
    draw = ImageDraw.Draw(Image.new("L", (w, h)))
    return draw.textbbox((int(round(x * w)), int(round(y * h))), text, font=font)


def add_tag(image: np.ndarray, text: str = "R", size: float = 0.0625, x: float = 0.1953,
            y: float = 0.1953, value: int = 255, font: str = "") -> np.ndarray:
    """Draws ``text`` with its top-left anchor at (x*W, y*H), font size size*min(H, W), grey
    ``value``, in the font file ``font`` ('' = matplotlib's DejaVu Sans)."""
    image = np.asarray(image)
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    font = _font(max(1, int(round(size * min(h, w)))), font)
    fill = value if image.ndim == 2 else (value,) * image.shape[-1]
    ImageDraw.Draw(pil).text((int(round(x * w)), int(round(y * h))), text, font=font, fill=fill)
    return np.asarray(pil)


def lowpass_mask(h: int, w: int, diameter: float) -> np.ndarray:
    """(h, w) bool ideal low-pass mask in fftshift-ed layout: |k - centre| <= diameter / 2 px."""
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - h // 2) ** 2 + (xx - w // 2) ** 2 <= (diameter / 2.0) ** 2


def lowpass_float(image: np.ndarray, diameter: float) -> np.ndarray:
    """The filtered image before clipping / rounding: float64, same shape."""
    img = np.asarray(image, np.float64)
    chans = img[..., None] if img.ndim == 2 else img
    mask = lowpass_mask(chans.shape[0], chans.shape[1], diameter)
    out = np.empty_like(chans)
    for c in range(chans.shape[-1]):
        spec = np.fft.fftshift(np.fft.fft2(chans[..., c]))
        out[..., c] = np.real(np.fft.ifft2(np.fft.ifftshift(spec * mask)))
    return out[..., 0] if img.ndim == 2 else out


def lowpass(image: np.ndarray, diameter_frac: float = 0.488) -> np.ndarray:
    """Ideal circular FFT low-pass with diameter ``diameter_frac * min(H, W)`` pixels."""
    image = np.asarray(image)
    d = diameter_frac * min(image.shape[:2])
    return np.clip(lowpass_float(image, d), 0, 255).astype(np.uint8)


def resize_linear_cv2(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``cv2.resize(image, (width, height))`` (INTER_LINEAR), as include_noise.py shrank
    the X-rays, without OpenCV: bilinear at half-pixel centres, edges replicated, no
    antialiasing (an exact 2x reduction is the 2 x 2 mean), rounded half up to uint8.
    (OpenCV's 11-bit fixed-point weights can differ by one grey level at other scales;
    PIL's BILINEAR, used before, antialiases over a wider window.) (H, W) uint8 in/out."""
    img = np.asarray(image, np.float64)
    h, w = img.shape[:2]

    def axis(n_out, n_in):
        src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(np.int64)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, wy = axis(height, h)
    x0, x1, wx = axis(width, w)
    rows = img[y0] * (1 - wy)[:, None] + img[y1] * wy[:, None]
    out = rows[:, x0] * (1 - wx) + rows[:, x1] * wx
    return np.floor(out + 0.5).clip(0, 255).astype(np.uint8)


def ct_noise(image: np.ndarray, photons: float, rng: np.random.Generator, resize: int = 0) -> np.ndarray:
    """Simulated low-dose acquisition noise on an 8-bit image (grey; colour is averaged first).

    Returns uint8 (H, W), or (resize, resize) when ``resize`` > 0 and the image is larger
    (the study's 512 px).
    """
    img = np.asarray(image)
    if img.ndim == 3:
        img = np.asarray(Image.fromarray(img).convert("L"))
    if resize and max(img.shape) > resize:  # the study shrank 1024-px images to 512 first
        img = resize_linear_cv2(img, resize, resize)
    lo, hi = HU_WINDOW
    x = img.astype(np.float64) + rng.uniform(0.0, 1.0, size=img.shape)      # de-quantise
    hu = x / 255.0 * (hi - lo) + lo
    mu = hu * (MU_WATER - MU_AIR) / 1000.0 + MU_WATER
    counts = rng.poisson(np.exp(-mu) * photons) / photons
    proj = -np.log(np.maximum(counts, 1e-8))
    recon = 1000.0 * (proj - MU_WATER) / (MU_WATER - MU_AIR)
    recon = np.clip(recon, lo, hi)
    return ((recon - lo) / (hi - lo) * 255.0).astype(np.uint8)


def _key_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(str(key).encode())])


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A picklable ``fn(image, id)`` for TransformedSource; ``confounded`` picks the level."""

    kind: str
    params: tuple
    confounded: bool = True

    def __call__(self, image: np.ndarray, key: str) -> np.ndarray:
        p = dict(self.params)
        if self.kind == "tag":
            return add_tag(image, p["tag_text"], p["tag_size"], p["tag_x"], p["tag_y"],
                           p["tag_value"], p.get("tag_font", ""))
        if self.kind == "lowpass":
            return lowpass(image, p["lowpass_diameter"])
        if self.kind == "noise":
            photons = p["noise_photons_confounded"] if self.confounded else p["noise_photons_clean"]
            return ct_noise(image, photons, _key_rng(p["seed"], key), int(p.get("noise_resize", 0) or 0))
        raise DataError(f"Unknown artefact kind {self.kind!r}; choose one of {ARTIFACTS}")


_PARAM_KEYS = ("tag_text", "tag_size", "tag_x", "tag_y", "tag_value", "lowpass_diameter",
               "noise_photons_clean", "noise_photons_confounded", "noise_resize", "seed")


def make_artifact(ccfg, confounded: bool = True) -> Artifact:
    defaults = default_confounder_config()
    params = tuple((k, ccfg.get(k, defaults[k]) if hasattr(ccfg, "get") else defaults[k]) for k in _PARAM_KEYS)
    if ccfg["kind"] == "tag":  # the resolved font file: part of the pixels' cache key
        font = ccfg.get("tag_font", "") if hasattr(ccfg, "get") else ""
        params += (("tag_font", tag_font_file(font or "")),)
    return Artifact(ccfg["kind"], params, confounded)


# ---------------------------------------------------------------------------------------
# Putting artefacts on splits
# ---------------------------------------------------------------------------------------

def select_positives(source: Source, p: float, positive_class: int, seed: int) -> np.ndarray:
    """(N,) bool: exactly round(p * n_pos) positives of ``source``, chosen by ``seed`` (and ids)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"confounder.p must be in [0, 1], got {p}")
    pos = np.flatnonzero(source.labels == positive_class)
    # Order positives by a seeded hash of their id, so the choice does not depend on
    # the order of the split (and the same image is picked in every fold that trains on it).
    keys = np.array([zlib.crc32(f"{seed}:{i}".encode()) for i in source.ids[pos]], np.int64)
    chosen = pos[np.argsort(keys, kind="stable")[: int(round(p * len(pos)))]]
    mask = np.zeros(len(source), bool)
    mask[chosen] = True
    return mask


def confound(source: Source, mask: np.ndarray, ccfg, background: bool = True) -> Source:
    """``source`` with the artefact on ``mask`` and, for noise with ``noise_all`` and
    ``background``, clean-level noise elsewhere (the study's noised copy of every image)."""
    other = None
    if background and ccfg["kind"] == "noise" and ccfg.get("noise_all", True):
        other = make_artifact(ccfg, confounded=False)
    return TransformedSource(source, make_artifact(ccfg, True), mask, fn_other=other)


def apply_artifact(splits: DatasetSplits, ccfg) -> DatasetSplits:
    """Returns new splits with the artefact on p of the positives (train/val/iid test) and
    the 'iid' / 'clean' / 'ood' tests in ``extra_tests``."""
    kind = ccfg.kind
    if kind not in ARTIFACTS:
        raise DataError(f"confounder.kind={kind!r} is not an artefact; choose one of {ARTIFACTS} "
                        "(or 'sampled' / 'none')")
    if splits.num_classes != 2:
        raise DataError(f"confounders need a binary task; {splits.name} has {splits.num_classes} classes")
    pc = int(ccfg.get("positive_class", 1))
    p, seed = float(ccfg.p), int(ccfg.get("seed", 0))
    # p = 0 is the shared unconfounded baseline: the study trained it on the original
    # images, so no clean-level noise either (confounder.p0_originals).
    originals = p == 0.0 and bool(ccfg.get("p0_originals", True))

    def untouched(src):  # the originals, with an all-False 'confounded' column
        return confound(src, np.zeros(len(src), bool), ccfg, background=False)

    def rule(src):
        return untouched(src) if originals else confound(src, select_positives(src, p, pc, seed), ccfg)

    test = splits.test
    iid = rule(test)
    clean = untouched(test) if ccfg.get("clean_test_originals", True) else \
        confound(test, np.zeros(len(test), bool), ccfg)
    tests = {"iid": iid, "clean": clean, "ood": confound(test, test.labels != pc, ccfg)}
    info = dict(splits.info, confounder=kind, p=p)
    return DatasetSplits(train=rule(splits.train), val=rule(splits.val), test=iid,
                         num_classes=splits.num_classes, class_names=splits.class_names,
                         name=f"{splits.name}+{kind}", extra_tests=tests, info=info)


# ---------------------------------------------------------------------------------------
# Sampled attribute-label correlation
# ---------------------------------------------------------------------------------------

def _take_groups(idx: np.ndarray, groups: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """About ``n`` indices from ``idx`` taking whole groups in a random order (never more than n
    unless a single group is bigger)."""
    if n <= 0 or len(idx) == 0:
        return idx[:0]
    uniq = np.unique(groups[idx].astype(str))
    rng.shuffle(uniq)
    chosen, total = [], 0
    by_group = {}
    for i in idx:
        by_group.setdefault(str(groups[i]), []).append(i)
    for g in uniq:
        members = by_group[g]
        if total + len(members) > n and total > 0:
            continue
        chosen += members
        total += len(members)
        if total >= n:
            break
    return np.sort(np.asarray(chosen, np.int64))


def sampled_splits(source: Source, cfg, fold: int = 0) -> DatasetSplits:
    """Train/val/test where ``cfg.confounder.attribute`` correlates with the label at strength p.

    The patients are first split into a training pool and a test pool (fold ``fold`` of a
    stratified grouped k-fold over label x attribute). From the training pool: n positives
    (round(p*n) with the positive attribute value, the rest with the negative value) and n
    negatives (all with the negative value), n as large as the pool allows (or
    ``confounder.sampled_n``); then a grouped 15 % of it is val. From the test pool: 'ood'
    (reversed), 'iid' (the training rule) and 'clean' (balanced) tests.

    This is a k-fold design of its own, not a re-run of Source Matters' ``gender.py``:
    that script drew 400/200/200/200 images (positive M/F, negative M/F, unseeded), kept
    one test set (half the positive men's patients + every negative woman) for all p and
    folds, and made its 5 "folds" as GroupShuffleSplit(5, test_size=0.15, random_state=42)
    val draws from one training set. Its CSVs (``data.folds='paper'``, the default of
    ``configs/source_matters/sampled.py``) are the way to its exact images.
    """
    c = cfg.confounder
    if source.num_classes != 2:
        raise DataError(f"the sampled confounder needs a binary task; got {source.num_classes} classes")
    attr = c.get("attribute", "sex")
    if attr not in source.meta:
        raise DataError(f"confounder.attribute={attr!r} is not a metadata column of {cfg.name!r}; "
                        f"available: {sorted(source.meta)}")
    a_pos, a_neg = str(c.attribute_positive), str(c.attribute_negative)
    pc = int(c.get("positive_class", 1))
    p = float(c.p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"confounder.p must be in [0, 1], got {p}")
    values = source.meta[attr].astype(str)
    keep = np.flatnonzero(np.isin(values, [a_pos, a_neg]))
    if len(keep) == 0:
        raise DataError(f"no examples with {attr} in {{{a_pos!r}, {a_neg!r}}}")
    labels = (source.labels == pc).astype(np.int64)
    strata = labels * 2 + (values == a_pos)
    folds = splits_lib.stratified_group_kfold(strata[keep], source.groups[keep], cfg.num_folds,
                                              cfg.split_seed)
    pool_train, pool_test = keep[folds != fold], keep[folds == fold]
    rng = np.random.default_rng([int(c.get("seed", 0)), int(fold)])
    groups = source.groups

    def cell(pool, lab, val):
        return pool[(labels[pool] == lab) & (values[pool] == val)]

    # Training set.
    pa, pb, nb = cell(pool_train, 1, a_pos), cell(pool_train, 1, a_neg), cell(pool_train, 0, a_neg)
    n = min(len(pa), len(pb), len(nb))
    if c.get("sampled_n"):
        n = min(n, int(c.sampled_n))
    if n == 0:
        raise DataError(f"sampled confounder: the training pool lacks one of the cells "
                        f"(pos {attr}={a_pos}: {len(pa)}, pos {attr}={a_neg}: {len(pb)}, "
                        f"neg {attr}={a_neg}: {len(nb)})")
    n_a = int(round(p * n))
    train_all = np.concatenate([_take_groups(pa, groups, n_a, rng), _take_groups(pb, groups, n - n_a, rng),
                                _take_groups(nb, groups, n, rng)])
    # Grouped validation split (~15 %, like the study's GroupShuffleSplit(test_size=0.15)).
    vfold = splits_lib.stratified_group_kfold(strata[train_all], groups[train_all],
                                              max(2, min(7, len(set(groups[train_all].astype(str))))),
                                              cfg.split_seed + 1)
    train, val = np.sort(train_all[vfold != 0]), np.sort(train_all[vfold == 0])

    # Tests from the held-out patients.
    tpa, tpb = cell(pool_test, 1, a_pos), cell(pool_test, 1, a_neg)
    tna, tnb = cell(pool_test, 0, a_pos), cell(pool_test, 0, a_neg)
    m = min(len(tpb), len(tna))
    ood = np.concatenate([_take_groups(tpb, groups, m, rng), _take_groups(tna, groups, m, rng)])
    k = min(len(tpa), len(tpb), len(tnb))
    k_a = int(round(p * k))
    iid = np.concatenate([_take_groups(tpa, groups, k_a, rng), _take_groups(tpb, groups, k - k_a, rng),
                          _take_groups(tnb, groups, k, rng)])
    h = min(len(tpa), len(tpb), len(tna), len(tnb)) // 2 * 2
    clean = np.concatenate([_take_groups(x, groups, h // 2, rng) for x in (tpa, tpb, tna, tnb)])
    for name, idx in (("ood", ood), ("iid", iid), ("clean", clean)):
        if len(idx) == 0:
            log.warning("sampled confounder: the %s test of fold %d is empty (too few held-out "
                        "patients in some label x %s cell)", name, fold, attr)
    tests = {k_: SubsetSource(source, np.sort(v)) for k_, v in (("iid", iid), ("clean", clean), ("ood", ood))}
    info = {"fold": int(fold), "confounder": "sampled", "p": p, "attribute": attr,
            "n_per_class_train_pool": int(n)}
    return DatasetSplits(train=SubsetSource(source, train), val=SubsetSource(source, val),
                         test=tests["ood"], num_classes=2, class_names=tuple(source.class_names),
                         name=f"{cfg.name}+sampled_{attr}", extra_tests=tests, info=info)
