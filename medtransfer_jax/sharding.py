"""Device mesh, shardings and global batches for data-parallel (optionally FSDP) training.

Why ``jit`` + ``NamedSharding`` instead of ``pmap``: one program runs unchanged on 1 CPU,
8 fake CPU devices, a GPU, a TPU slice and several hosts. The batch is split along a
1-D ``data`` mesh axis; parameters are replicated (pure data parallelism) or, with
``fsdp=True``, sharded along their largest divisible axis over the same devices (ZeRO-3
style; XLA inserts the all-gathers). BatchNorm means/variances are computed over the
*global* batch because the model sees one logical (global) array.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(force: bool = False, **kwargs) -> bool:
    """Calls ``jax.distributed.initialize`` for multi-host runs.

    Done when ``force`` (the ``--multihost`` flag), when explicit ``kwargs``
    (coordinator_address, num_processes, process_id) are given, or when the environment
    says so: a Cloud TPU VM with several workers (``TPU_WORKER_HOSTNAMES`` with a comma),
    SLURM with several tasks, or ``JAX_COORDINATOR_ADDRESS`` set. Must run before any
    other JAX call. Returns True if it initialised.
    """
    env_multi = (
        "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
        or int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
        or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    )
    if not (force or kwargs or env_multi):
        return False
    if kwargs.get("coordinator_address") is None and os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
        if "JAX_NUM_PROCESSES" in os.environ:
            kwargs.setdefault("num_processes", int(os.environ["JAX_NUM_PROCESSES"]))
        if "JAX_PROCESS_ID" in os.environ:
            kwargs.setdefault("process_id", int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True


def make_mesh(num_devices: Optional[int] = None, devices=None) -> Mesh:
    """A 1-D mesh with axis ``data`` over all (or the first ``num_devices``) devices."""
    if devices is None:
        devices = jax.devices()
        if num_devices:
            if num_devices > len(devices):
                raise ValueError(f"num_devices={num_devices} but only {len(devices)} "
                                 "devices are visible")
            devices = devices[:num_devices]
    return Mesh(np.asarray(devices).reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` (model variables) replicated on every device of ``mesh`` (a no-op for
    arrays already laid out so)."""
    return jax.device_put(tree, replicated(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape, num_shards: int, min_size: int = 2 ** 14) -> P:
    """PartitionSpec sharding the largest axis divisible by ``num_shards``.

    Small arrays (< ``min_size`` elements: biases, BatchNorm) stay replicated; the
    rule depends only on the shape, so optimizer moments get the same sharding as their
    parameters.
    """
    if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % num_shards == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA_AXIS
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, abstract_tree: Any, fsdp: bool = False,
                    min_fsdp_size: int = 2 ** 14) -> Any:
    """NamedShardings for a pytree of (abstract) arrays: replicated, or FSDP by shape."""
    n = mesh.shape[DATA_AXIS]

    def one(x):
        shape = getattr(x, "shape", ())
        if not fsdp or not shape:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, fsdp_spec(shape, n, min_fsdp_size))

    return jax.tree.map(one, abstract_tree)


def local_batch_size(global_batch_size: int, mesh: Optional[Mesh] = None) -> int:
    """The per-process batch for ``global_batch_size``; checks it splits evenly."""
    n_dev = mesh.size if mesh is not None else jax.device_count()
    if global_batch_size % n_dev:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{n_dev} devices of the mesh; set --config.train.batch_size "
                         f"(or eval batch size) to a multiple of {n_dev}.")
    return global_batch_size // jax.process_count()


def make_global_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict:
    """Per-process NumPy batch -> global jax.Arrays sharded over ``data``.

    Each process passes its own shard (B_global / process_count examples); the result
    has leading dimension B_global on every process.
    """
    sharding = batch_sharding(mesh)
    return {k: v if _is_global(v, sharding) else shard_rows(v, mesh)
            for k, v in local_batch.items()}


def shard_rows(x, mesh: Mesh, global_rows: Optional[int] = None) -> jax.Array:
    """A host array whose leading axis is this process's share of a global batch -> one
    global jax.Array split over ``data`` (multi-host safe); ``global_rows`` is the
    global leading size when it cannot be inferred."""
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh), x, None if global_rows is None else (global_rows,) + x.shape[1:])


def _is_global(value, sharding: NamedSharding) -> bool:
    """True for a jax.Array already laid out as a global batch (the device-resident data
    path builds its batches on the mesh; they must not round-trip through the host)."""
    return isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim)


def gather_to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host, sharded) global array as a full NumPy array on every host."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def settled(tree: Any) -> Any:
    """``tree`` once computed, if any of its arrays spans several CPU devices; else as is.

    Call it on the inputs of a program with collectives that follows other device work.
    XLA:CPU admits a bounded number of computations in flight per device and launches a
    collective program on every device at once; when one device still has an earlier
    computation queued, the devices already in the collective can hold the threads that
    computation needs, and the process aborts after a 40 s rendezvous timeout ("Expected
    8 threads to join the rendezvous"). Forward passes then an accumulating all-reduce
    (the layer map) aborted 3 of 4 loaded processes of 15 maps each on 8 CPU devices;
    with the inputs waited for, 0 of 16 processes (120 maps). GPUs and TPUs order
    collectives on streams and keep their asynchronous dispatch.
    """
    for leaf in jax.tree_util.tree_leaves(tree):
        if (isinstance(leaf, jax.Array) and len(leaf.sharding.device_set) > 1
                and next(iter(leaf.sharding.device_set)).platform == "cpu"):
            return jax.block_until_ready(tree)
    return tree
