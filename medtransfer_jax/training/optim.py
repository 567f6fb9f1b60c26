"""Optimisers, learning-rate schedules and freezing policies (optax).

Freezing is expressed on the Keras layer names the model uses (``conv1_conv``,
``conv3_block2_1_bn``, ``predictions``): a frozen layer's updates are set to zero with
``optax.multi_transform`` (so frozen parameters stay bit-identical and carry no
optimizer state), and its BatchNorm statistics are kept by the train step.

Policies (``config.train.freeze``):

* ``none`` -- full fine-tuning.
* ``linear_probe`` -- only ``predictions`` trains; BatchNorm in inference mode.
* ``stage:k`` -- freeze the stem (stage 1, ``conv1_*``) through stage k (``convK_*``),
  k in 1..5. BatchNorm of the trainable stages uses batch statistics; frozen layers
  keep their running statistics (but, because the model has one BatchNorm switch, they
  normalise with batch statistics in the forward pass; set
  ``train.batch_norm_train=False`` to run every BatchNorm in inference mode instead).
* ``two_phase`` -- the studies' schedule: phase 0 = linear probe (base frozen, BatchNorm
  inference, ``train.head_phase`` lr/patience, early stop on its own metric), then
  phase 1 = everything unfrozen at the fine-tuning lr.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import optax

from medtransfer_jax.configs import base as schema
from medtransfer_jax.configs.validation import parse_freeze  # noqa: F401 (public here too)

HEAD = "predictions"
POLICIES = schema.FREEZE_POLICIES  # plus "stage:k"
_STAGE_RE = re.compile(r"^conv(\d+)_")


def layer_stage(layer: str) -> int:
    """Stage of a Keras layer name: conv1_* -> 1, convK_* -> K, the head -> 6."""
    if layer == HEAD:
        return 6
    m = _STAGE_RE.match(layer)
    if not m:
        raise ValueError(f"Layer name {layer!r} is not a Keras ResNet layer name "
                         "(conv1_*, convK_block*_*, predictions).")
    return int(m.group(1))


def phase_policies(policy: str) -> Tuple[str, ...]:
    """The freeze policy of each training phase (two_phase -> linear probe, then none)."""
    kind, _ = parse_freeze(policy)
    return ("linear_probe", "none") if kind == "two_phase" else (str(policy).lower(),)


def frozen_layer_fn(policy: str) -> Callable[[str], bool]:
    """Predicate on a layer name: True if the (single-phase) policy freezes it."""
    kind, k = parse_freeze(policy)
    if kind == "two_phase":
        raise ValueError("two_phase has two policies; use phase_policies() first")
    if kind == "none":
        return lambda layer: False
    if kind == "linear_probe":
        return lambda layer: layer != HEAD
    return lambda layer: layer_stage(layer) <= k


def layer_labels(tree: Any, policy: str) -> Any:
    """Same structure as ``tree`` ({layer: {leaf: array}}): 'frozen' or 'trainable'."""
    frozen = frozen_layer_fn(policy)
    return {layer: jax.tree.map(lambda _: "frozen" if frozen(layer) else "trainable", sub)
            for layer, sub in tree.items()}


def default_batch_norm_train(policy: str) -> bool:
    """Linear probe runs BatchNorm in inference mode (Keras ``trainable=False`` base)."""
    return parse_freeze(policy)[0] != "linear_probe"


def make_schedule(lr: float, total_steps: int, schedule: str = "constant",
                  warmup_steps: int = 0, end_lr_factor: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then constant or cosine to
    ``end_lr_factor * lr`` at ``total_steps``."""
    warmup_steps = int(max(0, warmup_steps))
    if schedule == "constant":
        main = optax.constant_schedule(lr)
    elif schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup_steps),
                                           alpha=end_lr_factor)
    elif schedule == "linear":
        main = optax.linear_schedule(lr, lr * end_lr_factor,
                                     max(1, total_steps - warmup_steps))
    else:
        raise ValueError(f"train.schedule={schedule!r}; choose {', '.join(schema.SCHEDULES)}")
    if not warmup_steps:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


@functools.lru_cache(maxsize=32)
def _jitted_schedule(lr: float, total_steps: int, schedule: str, warmup_steps: int,
                     end_lr_factor: float):
    return jax.jit(make_schedule(lr, total_steps, schedule, warmup_steps, end_lr_factor))


def lr_at(train_cfg, lr: float, total_steps: int, step: int) -> float:
    """The phase's learning rate at ``step`` (of the phase), for the log line: one jitted
    program per schedule, since evaluated eagerly its ~12 ops compile one by one (~0.25 s
    of a run's start on 2 CPU cores)."""
    fn = _jitted_schedule(float(lr), int(total_steps), train_cfg.schedule,
                          int(train_cfg.warmup_steps), float(train_cfg.end_lr_factor))
    return float(fn(step))


def _decay_mask(params):
    """Weight decay on conv/dense kernels only (not biases or BatchNorm scale/shift)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_base_optimizer(name: str, schedule: optax.Schedule, *, momentum: float = 0.9,
                        nesterov: bool = False, b1: float = 0.9, b2: float = 0.999,
                        eps: float = 1e-7, weight_decay: float = 0.0,
                        grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
    """adam / adamw / sgd, optional global-norm clipping and decoupled weight decay.

    ``eps`` defaults to Keras' Adam epsilon (1e-7) since the studies used Keras.
    """
    name = name.lower()
    parts = []
    if grad_clip_norm:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    if name in ("adam", "adamw"):
        if weight_decay:  # decoupled (AdamW) decay for both names
            parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps,
                                     weight_decay=weight_decay, mask=_decay_mask))
        else:
            parts.append(optax.adam(schedule, b1=b1, b2=b2, eps=eps))
    elif name == "sgd":
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
        parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
    else:
        raise ValueError(f"train.optimizer={name!r}; choose {', '.join(schema.OPTIMIZERS)}")
    return optax.chain(*parts) if len(parts) > 1 else parts[0]


def make_optimizer(train_cfg, params: Any, policy: str, total_steps: int,
                   lr: Optional[float] = None) -> optax.GradientTransformation:
    """Optimizer for one phase: base optimizer on trainable layers, zero on frozen ones.

    Args:
      train_cfg: ``config.train`` (optimizer, lr, schedule, warmup_steps, momentum,
        nesterov, weight_decay, adam_eps, grad_clip_norm, end_lr_factor).
      params: the parameter tree (only its structure/names are used).
      policy: a single-phase freeze policy (see module docstring).
      total_steps: steps of this phase (for the schedule).
      lr: overrides ``train_cfg.lr`` (the head phase has its own).
    """
    lr = train_cfg.lr if lr is None else lr
    sched = make_schedule(lr, total_steps, train_cfg.get("schedule", "constant"),
                          train_cfg.get("warmup_steps", 0), train_cfg.get("end_lr_factor", 0.0))
    base = make_base_optimizer(
        train_cfg.get("optimizer", "adam"), sched,
        momentum=train_cfg.get("momentum", 0.9), nesterov=train_cfg.get("nesterov", False),
        eps=train_cfg.get("adam_eps", 1e-7), weight_decay=train_cfg.get("weight_decay", 0.0),
        grad_clip_norm=train_cfg.get("grad_clip_norm", 0.0))
    if parse_freeze(policy)[0] == "none":
        return base
    labels = layer_labels(params, policy)
    return optax.multi_transform({"trainable": base, "frozen": optax.set_to_zero()}, labels)


def frozen_mask(tree: Any, policy: str) -> Dict[str, bool]:
    """{layer: True if frozen} for the layers of ``tree`` (e.g. batch_stats)."""
    frozen = frozen_layer_fn(policy)
    return {layer: bool(frozen(layer)) for layer in tree}
