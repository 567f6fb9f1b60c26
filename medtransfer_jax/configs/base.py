"""The run config schema: every field a training run reads, with its default.

Lives with the config toolbox (not in training/) so the embedded configs and the
user-facing ``configs/`` files build runs without importing the training stack;
training.presets re-exports :func:`base_config` and :func:`demo_config`. Imports only
data's defaults (``data.default_data_config``).

The name tables of the enumerated fields live here too, below the layers that use them
(training.optim, inference.metrics), so configs.validation can check a run config up
front without importing the training stack.
"""
from __future__ import annotations

import ml_collections

from medtransfer_jax.data import config as data_config

OPTIMIZERS = ("adam", "adamw", "sgd")                 # train.optimizer
SCHEDULES = ("constant", "cosine", "linear")          # train.schedule (after warmup)
EPOCH_STEPS = ("floor", "ceil")                        # train.epoch_steps
HEAD_CHOICES = ("softmax", "sigmoid_binary")           # model.head
FREEZE_POLICIES = ("none", "linear_probe", "two_phase")  # train.freeze, plus "stage:k"
FREEZE_STAGES = range(1, 6)                           # k of "stage:k": conv1_* .. convK_*
#: What inference.metrics.classification_metrics returns per split (besides
#: 'num_examples' and 'reported_auc'): the names eval.monitor may choose.
METRICS = ("loss", "accuracy", "auc", "auc_ovr_macro", "auc_ovr_weighted", "auc_micro",
           "auc_keras")
#: Metric names a protocol may report (``eval.reported_auc``) -> what the paper computed.
REPORTED_AUCS = {
    "auc": "binary AUC (K == 2) / one-vs-rest macro AUC (the project's default)",
    "auc_keras": "keras.metrics.AUC() on one-hot labels x softmax: micro, 200 thresholds "
                 "(Revisiting Sep-2023 AUC.py, Source Matters fine-tuning.py)",
    "auc_ovr_weighted": "sklearn roc_auc_score: binary, or one-vs-rest prevalence-weighted "
                        "for K > 2 (Revisiting Feb-2023 base_AUC.py / prediction_similarity.py)",
    "auc_micro": "exact ROC-AUC over the flattened one-hot matrix (auc_keras without binning)",
}


def base_config() -> ml_collections.ConfigDict:
    """Shared defaults of every training run (see loop.py for how each field is used)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = data_config.default_data_config()   # data.fold: the 0-based fold of the run

    c.model = ml_collections.ConfigDict()
    c.model.init = "random"           # 'random' or a weights directory (medtransfer_jax.convert)
    c.model.depth = 50
    c.model.layout = "keras_v1"
    c.model.width = 64
    c.model.dropout_rate = 0.5        # Dropout before the head, as in both studies
    # softmax: num_classes logits; sigmoid_binary: a 1-unit sigmoid head when the task has
    # 2 classes (Keras class_mode='binary', Revisiting Feb-2023), softmax otherwise
    c.model.head = "softmax"
    c.model.dtype = "float32"         # 'bfloat16' = mixed precision (params stay float32)
    # BatchNorm momentum (flax convention); None = the layout's (Keras 0.99). Short runs
    # need a faster average (0.9) or the running statistics lag the weights.
    c.model.bn_momentum = ml_collections.FieldReference(None, field_type=float)
    c.model.preprocessing = ml_collections.FieldReference(None, field_type=str)
    # None: from the weights' metadata ('unit' for random init)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256          # global batch (all devices/hosts)
    c.train.num_epochs = 30
    c.train.num_steps = 0             # > 0 overrides num_epochs
    # Steps in an epoch of N training images at batch B: floor(N/B) full batches, or ceil
    # (Keras' steps_per_epoch=N/B, a pass ending in a partial batch: the same number of
    # updates, here as full batches of the reshuffled stream). EPOCH_STEPS.
    c.train.epoch_steps = "floor"
    c.train.optimizer = "adam"        # adam | adamw | sgd
    c.train.lr = 1e-3
    c.train.schedule = "constant"     # constant | cosine | linear (after warmup)
    c.train.warmup_steps = 0
    c.train.end_lr_factor = 0.0
    c.train.momentum = 0.9
    c.train.nesterov = False
    c.train.adam_eps = 1e-7           # Keras' default
    c.train.weight_decay = 0.0
    c.train.grad_clip_norm = 0.0
    c.train.label_smoothing = 0.0
    # Divergence: stop when the mean train loss of a log interval is non-finite or above
    # this factor x ln(num_classes) (the loss of a uniform guess); 0 = only non-finite.
    c.train.max_loss_factor = 100.0
    c.train.freeze = "none"           # none | linear_probe | stage:k | two_phase
    c.train.batch_norm_train = ml_collections.FieldReference(None, field_type=bool)
    c.train.head_phase = ml_collections.ConfigDict()   # two_phase: the frozen-base phase
    c.train.head_phase.lr = 1e-3
    c.train.head_phase.num_epochs = 30
    c.train.head_phase.num_steps = 0
    c.train.head_phase.monitor = "accuracy"
    c.train.head_phase.patience = 10
    c.train.head_phase.min_delta = 0.0

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0            # 0 = once per epoch
    c.eval.batch_size = 256
    c.eval.monitor = "loss"           # loss | auc | accuracy | auc_micro | auc_ovr_weighted ...
    c.eval.patience = 0               # evaluations without improvement; 0 = no early stopping
    c.eval.min_delta = 0.0
    # The AUC the protocol's paper reported, repeated as 'reported_auc' in the results
    # (REPORTED_AUCS): auc | auc_keras | auc_ovr_weighted | auc_micro.
    c.eval.reported_auc = "auc"

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 0      # also save every N steps (0 = off)
    # At an evaluation, save when this long has passed since the last save (0 = at every
    # evaluation). A new best is copied on the device and written with the next save;
    # phase ends, SIGTERM and preemption notices always save.
    c.checkpoint.every_secs = 120.0
    c.checkpoint.max_to_keep = 2      # latest N kept, plus the best
    c.checkpoint.async_save = True
    # Once results.json says done, the training checkpoints (only needed to resume; ~0.9
    # GB for a ResNet50) are deleted: results, predictions and export/{best,last} stay.
    c.checkpoint.keep_when_done = False

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10
    # ... and a console line (nowhere else) when this long passed without one: slow steps
    # (a CPU, a large batch) would leave minutes of silence; 0: off
    c.log.every_secs = 30.0
    c.log.profile_steps = 0           # > 0: jax.profiler trace of that many steps -> profile/
    c.log.profile_start = 5           # ... starting after this step (past compilation)

    c.sharding = ml_collections.ConfigDict()
    c.sharding.num_devices = 0        # 0 = all devices
    c.sharding.fsdp = False           # shard params/optimizer state over the data axis too
    c.sharding.min_fsdp_size = 2 ** 14
    return c


def demo_config() -> ml_collections.ConfigDict:
    """Synthetic lesion task, ResNet18 width 16 at 64 px: a few minutes on 2 CPU cores."""
    c = base_config()
    c.data.name = "synthetic"
    c.data.image_size = 64            # also data.synthetic.image_size (one FieldReference)
    c.data.synthetic.num_examples = 640
    c.data.heldout_val_fraction = 0.5   # 64 val / 64 test images: a less noisy AUC
    # Generate each synthetic image once, not once per epoch and evaluation (the same
    # pixels as 'none', bit for bit): 6,144 + 896 renders -> 640, ~1.4 s of CPU.
    c.data.cache = "host"
    c.model.depth = 18
    c.model.width = 16
    c.model.bn_momentum = 0.9
    c.model.preprocessing = "unit"
    c.train.batch_size = 32
    c.train.num_epochs = 12
    c.train.lr = 2e-3
    c.train.schedule = "cosine"
    c.train.warmup_steps = 20
    c.eval.batch_size = 64
    c.eval.monitor = "auc"
    c.eval.patience = 0
    c.log.every_steps = 16
    return c
