"""The data config: one ConfigDict that says which dataset, which fold, and how to feed it.

Overridable from the command line like every other config
(``--config.data.name=breast --config.data.root=/data/busi``).
"""
from __future__ import annotations

import ml_collections

#: Dataset keys understood by :func:`medtransfer_jax.data.get_splits`.
DATASET_NAMES = (
    "synthetic", "image_folder", "csv",
    # Revisiting study targets.
    "chest", "breast", "thyroid", "mammograms", "knee", "isic", "pcam",
    # Source Matters datasets.
    "nih_cxr14", "lidc",
)

CONFOUNDER_KINDS = ("none", "tag", "lowpass", "noise", "sampled")
FOLD_MODES = ("kfold", "paper")   # data.folds
#: Smallest data.image_size a run accepts (and the synthetic generator draws).
MIN_IMAGE_SIZE = 8


def default_augment_config() -> ml_collections.ConfigDict:
    """The studies' Keras ``ImageDataGenerator`` settings (rotation 10 deg, shift/zoom/shear 0.1,
    fill 'nearest', horizontal flip) expressed for the numpy augmentation in pipeline.py."""
    a = ml_collections.ConfigDict()
    a.enabled = True
    a.flip = True             # horizontal flip with probability 0.5 (the chest target turns it off)
    a.vflip = False           # vertical flip with probability 0.5
    a.rotation_deg = 10.0     # uniform in [-r, r] degrees
    a.shift = 0.1             # uniform in [-s, s] * size, independently for x and y
    a.zoom = 0.1              # Keras semantics: scale factor uniform in [1 - z, 1 + z] per axis
    a.shear = 0.1             # shear angle uniform in [-s, s] degrees (Keras ImageDataGenerator units)
    a.crop = 0.0              # random-resized-crop: keep a square of side uniform in [1 - crop, 1] * size
    a.fill = "nearest"        # 'nearest' (edge replication, the studies) or 'constant' (zeros)
    return a


def default_confounder_config() -> ml_collections.ConfigDict:
    """Source Matters confounders. ``kind='none'`` leaves the dataset as it is."""
    c = ml_collections.ConfigDict()
    c.kind = "none"           # 'none' | 'tag' | 'lowpass' | 'noise' | 'sampled'
    c.p = 0.5                 # fraction of positive train images carrying the artefact / attribute strength
    c.seed = 0                # which positives get the artefact (a pure function of seed and index)
    c.positive_class = 1      # the class that carries the artefact in training
    # tag: a letter drawn in white; position/size are fractions of the image side so they scale
    # with resolution (the study drew size 64 at (200, 200) on 1024-px chest X-rays).
    c.tag_text = "R"
    c.tag_size = 0.0625       # font size / image side  (64 / 1024)
    c.tag_x = 0.1953          # left of the text box / image width  (200 / 1024)
    c.tag_y = 0.1953          # top of the text box / image height
    c.tag_value = 255         # grey value of the letter
    # The letter's font: '' = matplotlib's DejaVu Sans (the same file everywhere); 'light' =
    # the light sans-serif matplotlib finds on this machine, as include_tag.py looked it up
    # (font_manager.findfont(family='sans-serif', weight='light')); or a .ttf path.
    c.tag_font = ""
    # lowpass: an ideal circular FFT mask with this diameter, as a fraction of the image side
    # (the study: 500 px on 1024-px images).
    c.lowpass_diameter = 0.488
    # noise: CT-like Poisson noise (window [-1200, 800] HU, mu_water 0.1837, mu_air 0.1662).
    c.noise_photons_clean = 2e7       # photon count applied to every image
    c.noise_photons_confounded = 1.5e7  # lower photon count (more noise) for the confounded images
    c.noise_all = True        # apply the clean-level noise to every image too (as the study did)
    c.noise_resize = 512      # the study resized to 512 px before adding noise (0 = keep the size)
    # What stays original. The study's clean test read the untouched 'images' folder, and
    # its p = 0 run is the shared unconfounded baseline on the originals, so neither
    # carries the clean-level noise of noise_all (False: noise them like the rest).
    c.clean_test_originals = True
    c.p0_originals = True
    # sampled: correlate a metadata attribute with the label.
    c.attribute = "sex"       # metadata key of the source ('sex' or 'age_bucket')
    c.attribute_positive = "F"  # the attribute value sampled for positives with probability p
    c.attribute_negative = "M"  # the value of every negative in training
    c.sampled_n = 0           # training images per class (0: as many as the pool allows)
    # (The reversed 'ood' test, positives with the negative value and vice versa, is always
    # balanced; 'iid' follows the training rule and 'clean' is balanced over all four cells.)
    return c


def default_synthetic_config() -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict()
    s.num_examples = 512
    s.image_size = 64
    s.seed = 0
    s.task = "lesion"         # 'lesion' (grey texture, blob in positives) or 'natural' (coloured textures)
    s.num_classes = 2
    s.images_per_patient = 1  # >1 groups consecutive images into one synthetic patient
    s.contrast = 0.35         # lesion contrast relative to the background range (lower = harder)
    return s


def _optional(field_type):
    """A None default that stays overridable from the command line (``--config.data.root=/x``):
    config_flags refuses to override a plain None field, since it has no type."""
    return ml_collections.FieldReference(None, field_type=field_type)


def default_data_config() -> ml_collections.ConfigDict:
    """Returns the data ConfigDict (fields: see the module and contracts)."""
    c = ml_collections.ConfigDict()
    c.name = "synthetic"
    c.root = _optional(str)             # manual-download directory of the dataset (or of an image folder)
    c.csv_path = _optional(str)         # for name='csv': path,label[,group] file (relative paths are under root)
    c.class_names = _optional(tuple)      # optional tuple fixing the class order for 'image_folder' / 'csv'
    # One field for both: the synthetic generator draws at the size the model is fed
    # (default_data_config ties data.synthetic.image_size to this by a FieldReference).
    c.image_size = 64
    # PIL filter for resizing to image_size: nearest | bilinear | bicubic | lanczos | area.
    # The papers' Keras load_img resizes with 'nearest' (their configs set it); bilinear
    # smooths away fine artefacts such as the low-pass confounder.
    c.resize_method = "bilinear"
    c.num_folds = 5
    c.split_seed = 2
    c.fold = 0                # the run's 0-based fold (the only fold field; get_splits default)
    c.heldout_val_fraction = 0.25  # held-out fifth -> val (this share) + test; 1 = val is the test (Feb-2023)
    c.group_split = True      # keep a patient's images on one side of every split
    # Splits: 'kfold' = the project's stratified grouped k-fold (seed split_seed);
    # 'paper' = the paper repo's CSVs in fold_csv_dir (an error names the folder and how to
    # get it when it is missing). The paper protocols default to 'paper'.
    c.folds = "kfold"
    c.fold_csv_dir = _optional(str)     # the paper repo's data/<task>/ folder of {train,val,test}_fold{k}.csv
    c.fold_csv_origin = ""              # where the CSVs come from (named in the missing-folder error)
    c.fold_csv_test = _optional(str)    # one fixed test CSV for every fold (Source Matters' test.csv)
    # 'check': each CSV row's class must equal the dataset's label rule; 'csv': the CSV's
    # class column is the label (Source Matters' chest-14 YES/NO subset, whose rule lived
    # in an io_functions module that was never published).
    c.fold_csv_labels = "check"
    c.skip_corrupt = False    # validate images up front and skip unreadable ones (counted in the log)
    c.max_examples = _optional(int)     # keep a stratified subset of at most this many (debugging)
    c.worker_count = 0
    # Where decoded images live: 'none' (the grain pipeline decodes + augments on the host
    # every epoch; data of any size), 'host' (decode + resize once into host memory, grain
    # augments), 'device' (decode + resize once, uint8 on the accelerator, batch gather +
    # augmentation + normalisation inside jit: data/device_cache.py; the studies' sizes).
    c.cache = "none"
    c.cache_placement = "replicated"   # 'device' cache: replicated | sharded over 'data'
    c.synthetic = default_synthetic_config()
    c.synthetic.image_size = c.get_ref("image_size")
    c.confounder = default_confounder_config()
    c.augment = default_augment_config()
    # Dataset-specific options.
    c.pcam_num_examples = 10000   # the Revisiting 'pcam-small' subset
    c.pcam_sample_seed = 22
    c.knee_num_slices = 3         # MRNet .npy volumes: central sagittal slices per case (0 = all)
    c.knee_label_rule = "paper"   # 'paper' (ACL view + meniscus view per case) or 'exclusive'
    # 'any': RadImageNet's PNG slices (images/acl, images/meniscus) if present, else the
    # MRNet .npy volumes; 'png': require the PNG layout (the Revisiting protocol: its 5,222
    # hand-picked slices of 580 cases are not derivable from the volumes).
    c.knee_layout = "any"
    # LIDC label: 'label' = the extraction CSV's label column; 'median_malignancy' = from its
    # malignancy column (median reader rating <= 2 benign, >= 4 malignant, 3 dropped).
    c.lidc_label_rule = "label"
    c.nih_labels = ("No Finding", "Atelectasis")  # NIH CXR14: negative / positive finding
    c.nih_views = ("PA",)
    c.tfds_data_dir = _optional(str)        # read a dataset prepared with builders.tfds_builder.prepare (ArrayRecord)
    return c
