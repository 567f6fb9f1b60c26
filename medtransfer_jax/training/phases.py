"""Training phases: the studies' schedule as data (what to freeze, lr, steps, when to stop).

``train.freeze='two_phase'`` is the Revisiting study's "freeze" variant: the head is
trained first with a frozen, inference-mode base (its own lr, budget and early-stopping
rule, ``train.head_phase``), then everything at the fine-tuning lr. Every other policy
is a single phase. Only the final phase chooses the best (exported) model.
"""
from __future__ import annotations

import dataclasses
from typing import List

from medtransfer_jax.training import optim


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training phase: its freeze policy, lr, step budget and early-stopping rule."""

    index: int
    policy: str
    lr: float
    num_steps: int
    monitor: str
    mode: str            # 'min' | 'max'
    patience: int        # evaluations without improvement before stopping (0 = never)
    min_delta: float
    batch_norm_train: bool
    is_final: bool


def monitor_mode(metric: str) -> str:
    """'min' for the loss, 'max' for accuracy / AUC variants."""
    return "min" if metric == "loss" else "max"


def steps_per_epoch(num_train: int, global_batch: int, rule: str = "floor") -> int:
    """Steps in an epoch (``train.epoch_steps``): ``floor`` = full batches of the data;
    ``ceil`` = Keras' ``steps_per_epoch=N/B``, whose pass ends in a partial batch (the
    Revisiting and Source Matters scripts): as many updates, each a full batch of the
    reshuffled stream. At least 1."""
    whole, rest = divmod(int(num_train), int(global_batch))
    return max(1, whole + (1 if rule == "ceil" and rest else 0))


def make_phases(config, steps_per_epoch: int) -> List[Phase]:
    """The phases of ``config.train.freeze`` ('two_phase' -> head phase + full phase)."""
    t, e = config.train, config.eval
    policies = optim.phase_policies(t.freeze)
    phases = []
    for i, policy in enumerate(policies):
        final = i == len(policies) - 1
        # The final phase reads train.* / eval.*; the head phase train.head_phase.*.
        src, stop = (t, e) if final else (t.head_phase, t.head_phase)
        steps = src.num_steps or int(src.num_epochs * steps_per_epoch)
        if final:
            bn = (optim.default_batch_norm_train(policy) if t.batch_norm_train is None
                  else bool(t.batch_norm_train))
        else:
            bn = False  # the studies' frozen base: BatchNorm in inference mode
        if steps <= 0:
            raise ValueError(f"phase {i} ({policy}) has {steps} steps; set train.num_epochs / "
                             "train.num_steps (or train.head_phase.*) to a positive value.")
        phases.append(Phase(i, policy, float(src.lr), int(steps), stop.monitor,
                            monitor_mode(stop.monitor), int(stop.patience),
                            float(stop.min_delta), bn, final))
    return phases
