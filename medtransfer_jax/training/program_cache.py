"""Jitted train/eval steps kept across the runs of one process.

A sweep or study runs many fine-tunes of the same shapes in one process (a Revisiting
target's 25 runs share one ResNet50 graph). A fresh ``jax.jit`` per run re-traces,
re-lowers and reloads the executable from the persistent cache: 7.5 s of a run's ~18 s
fixed cost on an H200 (BENCHMARKS.md §10), ~4 s on the 2-core CPU. Reusing the jitted
function of an earlier run with the same graph skips all three.

Reuse is only correct when the earlier function computes the same thing, so the key is
everything the step closes over: the model's repr (every module field: depth, width,
dropout, dtype, layout ...), the optimizer's whole config with the phase's lr, steps and
freeze policy, the mesh and the state's sharding tree (which fixes the parameter tree),
the head size, label smoothing, BatchNorm mode and the frozen layers. Whatever is not in
the key must be a traced argument (weights, batches, the RNG in the state), never a
closed-over constant.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Hashable, Tuple

import jax

from medtransfer_jax import lru

#: Distinct programs kept (a study has a few shapes per target; each entry holds one
#: compiled ResNet50 step, tens of MB of host memory).
MAX_PROGRAMS = 16

_programs = lru.LRU(MAX_PROGRAMS)


def tree_key(tree: Any) -> Hashable:
    """A hashable stand-in for a pytree of hashable leaves (shardings, masks)."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


def config_key(cfg: Any, drop: Tuple[str, ...] = ()) -> str:
    """A ConfigDict (or dict) as canonical JSON, without the fields named in ``drop`` at
    any depth: equal configs give equal keys."""
    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items()
                if k not in drop}
    as_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return json.dumps(strip(as_dict), sort_keys=True, default=repr)


def get(key: Hashable, build: Callable[[], Callable]) -> Callable:
    """The program stored under ``key``, built by ``build()`` the first time."""
    return _programs.get(key, build)


def stats() -> dict:
    """{'hits', 'misses', 'programs'} since the process started (or :func:`clear`)."""
    return {"hits": _programs.hits, "misses": _programs.misses, "programs": len(_programs)}


def clear() -> None:
    _programs.clear()
