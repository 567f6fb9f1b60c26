"""The jitted train step over a device mesh (the eval step is inference.predict's).

It takes *global* arrays (see sharding.make_global_batch); the state is donated
to the train step so params/optimizer moments are updated in place. BatchNorm sees the
whole global batch (one logical array), so its statistics are global, not per device.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from medtransfer_jax import sharding as shard_lib
from medtransfer_jax.inference.predict import cross_entropy
from medtransfer_jax.training.state import TrainState


def _weighted_loss(logits, labels, weights, num_classes, label_smoothing):
    """Weighted mean of the per-example cross-entropy (weight-0 rows are padding)."""
    per_example = cross_entropy(logits, labels, num_classes, label_smoothing)
    wsum = jnp.maximum(jnp.sum(weights), 1e-12)
    return jnp.sum(per_example * weights) / wsum


def make_train_step(model, tx: optax.GradientTransformation, mesh: Mesh, state_sharding: Any,
                    *, num_classes: int, batch_norm_train: bool = True,
                    frozen_layers: Optional[Mapping[str, bool]] = None,
                    label_smoothing: float = 0.0, donate: bool = True) -> Callable:
    """Returns ``train_step(state, batch) -> (state, metrics)``.

    Args:
      model: the Flax ResNet (its ``dtype`` sets compute precision; params stay fp32).
      tx: the phase's optimizer (frozen layers already masked to zero updates).
      state_sharding: NamedShardings matching the TrainState (sharding.state_shardings).
      batch_norm_train: False runs every BatchNorm in inference mode (linear probe).
      frozen_layers: {layer: frozen} (optim.frozen_mask); frozen layers keep their BatchNorm
        running statistics and are left out of ``grad_norm``, so XLA drops their unused
        gradients (a linear probe does not pay for a backward pass through the base).
      batch: {'image': (B, H, W, 3) float, 'label': (B,) int, 'weight': (B,) float}.

    metrics: {'loss', 'accuracy', 'grad_norm'} as replicated scalars (weighted means).
    """
    frozen = {k for k, v in (frozen_layers or {}).items() if v}

    def train_step(state: TrainState, batch: Dict[str, jax.Array]):
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            logits, new_vars = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, batch["image"],
                train=True, batch_norm_train=batch_norm_train, mutable=["batch_stats"],
                rngs={"dropout": dropout_rng})
            loss = _weighted_loss(logits, batch["label"], batch["weight"], num_classes,
                                     label_smoothing)
            return loss, (logits, new_vars["batch_stats"])

        (loss, (logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if frozen:
            new_bs = {k: (state.batch_stats[k] if k in frozen else v) for k, v in new_bs.items()}
        w = batch["weight"]
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        metrics = {"loss": loss,
                   "accuracy": jnp.sum(correct * w) / jnp.maximum(jnp.sum(w), 1e-12),
                   "grad_norm": optax.tree.norm(
                       {k: g for k, g in grads.items() if k not in frozen})}
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_bs,
                                  opt_state=opt_state)
        return new_state, metrics

    return jax.jit(train_step,
                   in_shardings=(state_sharding, shard_lib.batch_sharding(mesh)),
                   out_shardings=(state_sharding, shard_lib.replicated(mesh)),
                   donate_argnums=(0,) if donate else ())
