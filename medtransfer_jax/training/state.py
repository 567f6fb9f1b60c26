"""The training state: a plain pytree of arrays, so orbax can save and restore it as is.

The optimizer (``tx``) and the model are not part of the state; they are rebuilt from
the config, which keeps checkpoints free of Python objects and lets a restored state be
checked leaf by leaf against what the config expects.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar (global step, counts across phases); params / batch_stats: the
    model's collections; opt_state: optax state of the current phase; rng: uint32[2]
    key from which every step's dropout key is folded (``fold_in(rng, step)``)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array

    @property
    def variables(self):
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_state(variables, tx: optax.GradientTransformation, rng: jax.Array,
                 step: int = 0) -> TrainState:
    """A fresh state from ``{'params', 'batch_stats'}``; optimizer state from ``tx.init``."""
    params = variables["params"]
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=jnp.asarray(rng, jnp.uint32))


def create_sharded_state(variables, tx: optax.GradientTransformation, rng: jax.Array,
                         make_shardings, step: int = 0):
    """Builds the state directly with its shardings (fresh buffers, safe to donate).

    Args:
      make_shardings: ``abstract_state -> shardings`` (e.g. a partial of
        sharding.state_shardings).

    Returns:
      (state, shardings).
    """
    abstract = jax.eval_shape(lambda v, r: create_state(v, tx, r, step), variables, rng)
    shardings = make_shardings(abstract)
    state = jax.jit(lambda v, r: create_state(v, tx, r, step), out_shardings=shardings)(
        variables, rng)
    return state, shardings
