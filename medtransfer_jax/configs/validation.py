"""``validate(config)``: every rule a run config must meet, checked before a run starts.

Why up front: a bad enumerated value or range (``--config.train.optimizer=foo``,
``--config.data.fold=7``) used to surface deep inside setup or after the first epoch,
as a traceback, after the workdir lock and ``checkpoints/`` were created. ``train``
calls :func:`validate` before it touches the workdir and ``train_and_evaluate`` calls it
first (sweeps and studies run in-process), so each mistake is one line naming
``--config.<field>=<value>``, the valid choices or range, and the fix.

The tables come from their owners below this layer (models.resnet, preprocessing,
data) and from configs.base (the optimizer / schedule / freeze / metric names, which
training.optim and inference.metrics import from there). Imports only lower layers.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Tuple

from medtransfer_jax import preprocessing
from medtransfer_jax.configs import base, check_batch_sizes
from medtransfer_jax.data import DataError
from medtransfer_jax.data import config as data_config
from medtransfer_jax.data import decode_memo, device_cache, splits
from medtransfer_jax.errors import ConfigError
from medtransfer_jax.models import resnet

#: eval.monitor choices: the metrics every evaluation returns, plus ``reported_auc``
#: (the eval.reported_auc metric under its own name).
MONITORS = base.METRICS + ("reported_auc",)


def _field(name: str, value: Any) -> str:
    return f"--config.{name}={value}"


def _choice(name: str, value: Any, choices: Iterable, error=ConfigError) -> None:
    """Raises ``error`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise error(f"{_field(name, value)} is not one of {', '.join(map(str, choices))}; "
                    f"pass one of them (e.g. --config.{name}={choices[0]})")


def _range(name: str, value: Any, ok: bool, expect: str, error=ConfigError) -> None:
    """Raises ``error`` unless ``ok``; ``expect`` says the valid range and an example."""
    if not ok:
        raise error(f"{_field(name, value)}: must be {expect}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_freeze(policy: str) -> Tuple[str, int]:
    """``'none'|'linear_probe'|'two_phase'|'stage:k'`` -> (kind, k) (k 0 unless a stage).

    Raises:
      ConfigError: naming ``--config.train.freeze`` and the choices.
    """
    low = str(policy).strip().lower()
    if low in base.FREEZE_POLICIES:
        return low, 0
    m = re.fullmatch(r"stage:(\d+)", low)
    if m and int(m.group(1)) in base.FREEZE_STAGES:
        return "stage", int(m.group(1))
    stages = base.FREEZE_STAGES
    raise ConfigError(f"{_field('train.freeze', policy)} is not one of "
                      f"{', '.join(base.FREEZE_POLICIES)} or stage:k with k in "
                      f"{stages[0]}..{stages[-1]} (freeze conv1_* .. convK_*)")


def _check_model(m) -> None:
    random_init = (m.get("init") or "random") == "random"
    for name, table in (("depth", resnet.DEPTHS), ("layout", resnet.LAYOUTS)):
        if m.get(name) is not None or random_init:  # a weights dir's metadata decides
            _choice(f"model.{name}", m.get(name), sorted(table) if name == "depth" else table)
    if m.get("preprocessing") is not None:
        _choice("model.preprocessing", m.preprocessing, preprocessing.MODES)
    _choice("model.head", m.get("head", "softmax"), base.HEAD_CHOICES)
    rate = m.get("dropout_rate")
    _range("model.dropout_rate", rate, _number(rate) and 0 <= rate < 1,
           "in [0, 1) (the studies used 0.5)")
    width = m.get("width")
    if width is not None or random_init:   # a weights dir's metadata decides
        _range("model.width", width, isinstance(width, int) and not isinstance(width, bool)
               and width >= 1, "an integer >= 1 (ResNet50's is 64; the demo's 16)")


def _check_steps(name: str, section) -> None:
    """num_steps / num_epochs >= 0, and one of them > 0 (the phase has steps)."""
    steps, epochs = section.get("num_steps"), section.get("num_epochs")
    _range(f"{name}.num_steps", steps, _number(steps) and steps >= 0,
           ">= 0 (0: train for num_epochs)")
    _range(f"{name}.num_epochs", epochs, _number(epochs) and epochs >= 0,
           ">= 0 (e.g. 30)")
    if not steps and not epochs:
        raise ConfigError(f"--config.{name}.num_steps=0 and --config.{name}.num_epochs=0: "
                          "the phase has no steps; set one of them to a positive value")


def _check_train(t) -> str:
    """Checks config.train; returns the freeze kind."""
    _choice("train.optimizer", str(t.optimizer).lower(), base.OPTIMIZERS)
    _choice("train.schedule", t.schedule, base.SCHEDULES)
    _choice("train.epoch_steps", t.get("epoch_steps", "floor"), base.EPOCH_STEPS)
    kind, _ = parse_freeze(t.freeze)
    _check_steps("train", t)
    if kind == "two_phase":
        _check_steps("train.head_phase", t.head_phase)
    return kind


def _check_data(d, check_fold: bool = True) -> None:
    """Data fields, raised as DataError (what the data layer raises for them later)."""
    _choice("data.name", d.name, data_config.DATASET_NAMES, DataError)
    size = d.get("image_size")
    low = data_config.MIN_IMAGE_SIZE
    _range("data.image_size", size, isinstance(size, int) and size >= low,
           f"an integer >= {low} (the input side in pixels, e.g. 224)", DataError)
    _choice("data.cache", d.get("cache", "none"), device_cache.CACHE_MODES, DataError)
    _choice("data.folds", d.get("folds", "kfold"), data_config.FOLD_MODES, DataError)
    if check_fold:
        splits.check_fold(d.get("fold", 0), int(d.num_folds), "--config.data.fold")
    conf = d.get("confounder")
    if conf is not None:
        _choice("data.confounder.kind", conf.kind, data_config.CONFOUNDER_KINDS, DataError)
        p = conf.get("p")
        _range("data.confounder.p", p, _number(p) and 0 <= p <= 1,
               "in [0, 1] (the fraction of positive training images with the artefact, "
               "e.g. 0.5)", DataError)


def validate(config, check_fold: bool = True) -> None:
    """Checks a run config (the base.base_config schema) without touching disk or devices.
    ``check_fold=False`` leaves data.fold to the caller (the study's pre-flight lists
    folds outside the protocol with everything else that is missing).

    Raises:
      ConfigError / DataError (UserErrors): one line naming ``--config.<field>=<value>``,
      the valid choices or range, and how to fix it.
    """
    _check_model(config.model)
    kind = _check_train(config.train)
    check_batch_sizes(config)
    _check_data(config.data, check_fold)
    if config.data.cache in ("host", "device"):
        decode_memo.default_limit_bytes()  # $MEDTRANSFER_DECODE_MEMO_GB, if set, is a number
    e = config.eval
    every = config.checkpoint.get("every_secs", 0.0)
    _range("checkpoint.every_secs", every, _number(every) and every >= 0,
           ">= 0 seconds (0: save at every evaluation; e.g. 120)")
    log = config.get("log") or {}
    secs = log.get("every_secs", 0.0)
    _range("log.every_secs", secs, _number(secs) and secs >= 0,
           ">= 0 seconds (0: lines at log.every_steps only; e.g. 30)")
    if log.get("profile_steps", 0):
        start = log.get("profile_start", 0)
        _range("log.profile_start", start, isinstance(start, int) and start >= 1,
               "an integer >= 1 (the trace starts after that step; step 1 also compiles, "
               "e.g. 5)")
    _choice("eval.reported_auc", e.reported_auc, base.REPORTED_AUCS)
    _choice("eval.monitor", e.monitor, MONITORS)
    if kind == "two_phase":
        _choice("train.head_phase.monitor", config.train.head_phase.monitor, MONITORS)
