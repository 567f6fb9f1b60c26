"""Source Matters (Juodelyte et al.), confounder 'sampled':
patient sex tied to the label (Atelectasis vs No Finding).

    python -m medtransfer_jax.train --workdir=runs/sampled \\
      --config=configs/source_matters/sampled.py:SOURCE,p=0.5[,fold=K,seed=S]

SOURCE: imagenet | radimagenet | random. Options:
``p`` (share of female Atelectasis images in training;
the paper's CSVs exist for p in 0, 0.1, 0.2, 0.5, 0.8, 1),
``fold`` (0-based), ``seed``, ``dataset`` (``nih_cxr14``, default, or ``lidc``: no paper code or
CSVs exist for LIDC), ``folds`` (``paper``, default for nih_cxr14: the paper's CSVs;
``kfold``: the project's own split).

Values read from DovileDo/source-matters: ``fine-tuning.py``, ``gender.py``,
``data/chest14/gender/F_<100p>/{train,val}_fold*.csv, gender/test.csv``.
"""
from medtransfer_jax.training import presets

OPTIONS = ("p", "fold", "seed", "dataset", "folds")


def get_config(arg=None):
    source, opts = presets.parse_arg(arg, OPTIONS, where=__file__)
    c = presets.base_config()
    c.study, c.target = "source_matters", "sampled"
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
    # The sex experiment's CSVs: 400 training images per p (200 Atelectasis, 200 No
    # Finding; train/val per fold in gender/F_<100p>/) and one fixed 400-image test
    # (male Atelectasis + female No Finding: the reversed, o.o.d. test).
    gender_dir, c.data.fold_csv_origin = presets.paper_csvs("source_matters", "chest14/gender")
    c.data.fold_csv_dir = f"{gender_dir}/F_{round(p * 100)}"
    c.data.fold_csv_test = f"{gender_dir}/test.csv"
    c.data.fold_csv_labels = "csv"

    # ---- confounder
    c.data.confounder.kind = "sampled"
    c.data.confounder.p = p
    c.data.confounder.positive_class = 1
    # Without CSVs (folds=kfold): positives female with probability p, male otherwise;
    # negatives male; the reversed test from held-out patients.
    c.data.confounder.attribute = "sex"
    c.data.confounder.attribute_positive = "F"
    c.data.confounder.attribute_negative = "M"

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
