"""Source Matters (Juodelyte et al.), confounder 'noise':
CT-like Poisson noise, stronger on a fraction p of the positives.

    python -m medtransfer_jax.train --workdir=runs/noise \\
      --config=configs/source_matters/noise.py:SOURCE,p=0.5[,fold=K,seed=S]

SOURCE: imagenet | radimagenet | random. Options:
``p`` (fraction of positive training images with
the stronger noise),
``fold`` (0-based), ``seed``, ``dataset`` (``nih_cxr14``, default, or ``lidc``: no paper code or
CSVs exist for LIDC), ``folds`` (``paper``, default for nih_cxr14: the paper's CSVs;
``kfold``: the project's own split).

Values read from DovileDo/source-matters: ``fine-tuning.py``, ``include_noise.py``,
``data/chest14/{train,val}_fold*.csv, test.csv``.
"""
from medtransfer_jax.training import presets

OPTIONS = ("p", "fold", "seed", "dataset", "folds")


def get_config(arg=None):
    source, opts = presets.parse_arg(arg, OPTIONS, where=__file__)
    c = presets.base_config()
    c.study, c.target = "source_matters", "noise"
    p = float(opts.get("p", 0.5))

    # ---- data: NIH ChestX-ray14 PA (or LIDC-IDRI slices, a choice: no paper code).
    dataset = opts.get("dataset", "nih_cxr14")
    c.data.name = dataset
    c.data.root = presets.data_root(dataset)
    # fine-tuning.py takes the size as a flag the repo does not record: 224 (ResNet50's
    # native size) is this project's choice.
    c.data.image_size = 224
    c.data.resize_method = "nearest"          # Keras flow_from_dataframe / load_img default
    presets.keras_augment(c, hflip=False)     # same generator as Revisiting, no flips
    c.data.cache = "device"   # decoded once; augmented in the jitted step
    c.data.fold = int(opts.get("fold", 0))
    c.data.folds = opts.get("folds", "paper" if dataset == "nih_cxr14" else "kfold")
    # Label rule without CSVs: 'No Finding' vs 'Atelectasis' PA images (the classes of the
    # sex experiment; the artefact CSVs' YES/NO rule lived in an unpublished io_functions).
    c.data.nih_labels = ("No Finding", "Atelectasis")
    c.data.nih_views = ("PA",)
    c.data.lidc_label_rule = "median_malignancy"
    # The artefact CSVs: 331 images, train/val per fold and one fixed 83-image test.csv;
    # their class column (YES/NO) is the label.
    c.data.fold_csv_dir, c.data.fold_csv_origin = presets.paper_csvs("source_matters", "chest14")
    c.data.fold_csv_labels = "csv"

    # ---- confounder
    c.data.confounder.kind = "noise"
    c.data.confounder.p = p
    c.data.confounder.positive_class = 1
    # Every image resized to 512 px and noised at 2e7 photons, the confounded ones at
    # 1.5e7; the clean test and the p = 0 baseline are the original images.
    c.data.confounder.noise_photons_clean = 2e7
    c.data.confounder.noise_photons_confounded = 1.5e7
    c.data.confounder.noise_all = True
    c.data.confounder.noise_resize = 512
    c.data.confounder.clean_test_originals = True
    c.data.confounder.p0_originals = True

    # ---- model: ResNet50 -> Dropout 0.5 -> softmax for all three sources (random too);
    # caffe preprocess_input, plus rescale 1/255 for RadImageNet.
    presets.apply_source(c, source, "radimagenet" if source == "radimagenet" else "caffe",
                         random_dropout=0.5)

    # ---- training: Adam 1e-3, batch 256, 30 epochs, early stop on val loss (patience
    # 30), best checkpoint by val loss.
    c.train.lr, c.train.batch_size, c.train.num_epochs = 1e-3, 256, 30
    c.eval.batch_size = 256
    c.eval.monitor = "loss"
    c.eval.patience = 30
    # ---- reported metric: keras.metrics.AUC() on one-hot x softmax (micro, 200 thresholds).
    c.eval.reported_auc = "auc_keras"
    return c
