"""Revisiting Transfer (Juodelyte et al.), target 'knee':
MRNet sagittal slices, normal / ACL / meniscus.

    python -m medtransfer_jax.train --workdir=runs/knee \\
      --config=configs/revisiting/knee.py:SOURCE[,fold=K,freeze=true,protocol=feb2023]

SOURCE: imagenet | radimagenet | random. Options: ``fold`` (0-based; the paper's
``*_fold{K+1}.csv``), ``seed``, ``freeze`` (train the head on a frozen base first),
``freeze_parse=argparse`` (parse ``freeze`` as the paper's ``argparse type=bool`` did: any
value, 'False' included, freezes), ``protocol`` (``sep2023``, the repo's head, default;
``feb2023``, the scripts that wrote the repo's results/ files), ``folds`` (``paper``,
default: the paper's fold CSVs; ``kfold``: the project's own split).

Every value below was read from DovileDo/revisiting-transfer: ``src/fine-tuning.py``
(both protocols), ``src/AUC.py`` (Sep), ``src/base_AUC.py`` and
``src/prediction_similarity.py`` (Feb), ``src/CCA.py``.
"""
from medtransfer_jax.training import presets

OPTIONS = ("fold", "seed", "freeze", "freeze_parse", "protocol", "folds")


def get_config(arg=None):
    source, opts = presets.parse_arg(arg, OPTIONS, where=__file__)
    protocol = opts.get("protocol", "sep2023")
    if protocol not in ("sep2023", "feb2023"):
        raise ValueError(f"protocol={protocol!r}; choose sep2023 or feb2023")
    sep = protocol == "sep2023"
    c = presets.base_config()
    c.study, c.target, c.protocol = "revisiting", "knee", protocol

    # ---- data: RadImageNet's MRNet slices (580 cases, 5,222 PNGs); split unit = patient
    c.data.name = "knee"
    c.data.root = presets.data_root("knee")
    c.data.image_size = 112                  # both protocols (AUC.py, base_AUC.py)
    c.data.resize_method = "nearest"          # Keras flow_from_dataframe / load_img default
    presets.keras_augment(c, hflip=True)           # horizontal flip
    c.data.cache = "device"   # decoded once; augmented in the jitted step
    c.data.fold = int(opts.get("fold", 0))
    c.data.folds = opts.get("folds", "paper")
    c.data.fold_csv_dir, c.data.fold_csv_origin = presets.paper_csvs(protocol, "knee")
    # Feb-2023: 5 folds of train/val only; the 20 % val fold both picks the checkpoint
    # and gives the reported AUC (no separate test). Sep-2023: val ~4 % / test ~16 %.
    c.data.heldout_val_fraction = 0.25 if sep else 1.0
    # The paper's slices are RadImageNet's hand-picked PNGs (images/acl, images/meniscus);
    # the .npy volumes give other slices of other cases, so they are refused.
    c.data.knee_layout = "png"
    c.data.knee_label_rule = "paper"    # each case once per view (ACL view, meniscus view)

    # ---- model: Keras ResNet50 (include_top=False, avg pool) -> Dropout 0.5 -> softmax;
    # caffe preprocess_input for every source (no 1/255 in this study); the random
    # baseline is a plain Keras ResNet50 with its own head (no dropout).
    presets.apply_source(c, source, preprocessing="caffe", random_dropout=0.0)

    # ---- training: Adam; best checkpoint by val loss; early stopping on val loss.
    if sep:
        c.train.lr, c.train.batch_size, c.train.num_epochs = 1e-3, 256, 30
        c.eval.patience = 30
    else:
        c.train.lr, c.train.batch_size, c.train.num_epochs = 1e-5, 128, 200
        c.eval.patience = 3
    c.eval.monitor = "loss"
    c.eval.batch_size = c.train.batch_size
    freeze_parse = opts.get("freeze_parse", "strict")
    if freeze_parse not in ("strict", "argparse"):
        raise ValueError(f"freeze_parse={freeze_parse!r}; choose strict or argparse")
    c.train.freeze_parse = freeze_parse
    if "freeze" in opts and presets.parse_bool(opts["freeze"], freeze_parse == "argparse"):
        if c.model.init == "random":
            raise ValueError("freeze=true needs a pre-trained source (imagenet/radimagenet)")
        # Head phase: base frozen, Adam() default lr 1e-3, early stop on val accuracy
        # (patience 10 in Sep-2023, 2 in Feb-2023), then unfreeze at the fine-tune lr.
        c.train.freeze = "two_phase"
        c.train.head_phase.lr = 1e-3
        c.train.head_phase.num_epochs = c.train.num_epochs
        c.train.head_phase.monitor = "accuracy"
        c.train.head_phase.patience = 10 if sep else 2

    # ---- reported metric: Sep AUC.py = keras.metrics.AUC() on one-hot x softmax (micro,
    # 200 thresholds); Feb base_AUC.py = sklearn roc_auc_score (binary; OVR weighted).
    c.eval.reported_auc = "auc_keras" if sep else "auc_ovr_weighted"

    # ---- analyses (read by the CCA / prediction-similarity stages): CCA.py fed caffe
    # inputs to every model at the size below, on a validation-fold CSV (which fold the
    # published run read is not recorded: the run's own val fold is used).
    c.analysis = presets.analysis_defaults(cca_image_size=112,
                                           similarity_mode="corrected" if sep else "paper")
    return c
