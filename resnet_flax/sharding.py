"""Devices, the data-parallel mesh, and putting host batches on it.

One mesh spans every device of every process, with a single `data` axis. Batches are sharded
over it; parameters and optimizer state are replicated. With the batch sharded, `jax.jit`
turns the model's batch statistics into global (synced) ones; see `model.bn_group_size`.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'

# Environment variables that say a job has several processes, by launcher.
_MULTI_PROCESS_ENV = {
    'SLURM_NTASKS': 'SLURM',
    'OMPI_COMM_WORLD_SIZE': 'Open MPI',
    'JAX_NUM_PROCESSES': 'explicit environment',
}


def _is_multihost_tpu() -> bool:
    return ',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts `jax.distributed` when the job has several processes; a no-op otherwise.

    Explicit arguments win (localhost tests, hand-launched jobs). Otherwise JAX's own cluster
    detection handles TPU pods, SLURM and Open MPI from their environment variables.
    """
    if coordinator_address or (num_processes or 1) > 1:
        if not (coordinator_address and num_processes and process_id is not None):
            raise ValueError(
                'Multi-process runs need all of --coordinator_address, --num_processes and '
                f'--process_id (got {coordinator_address!r}, {num_processes!r}, {process_id!r}).'
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return
    launcher = next(
        (name for var, name in _MULTI_PROCESS_ENV.items() if int(os.environ.get(var, '1')) > 1),
        'TPU pod' if _is_multihost_tpu() else None,
    )
    if launcher is not None:
        logging.info('Starting jax.distributed (detected %s).', launcher)
        if launcher == 'explicit environment':
            jax.distributed.initialize(
                os.environ['JAX_COORDINATOR_ADDRESS'],
                int(os.environ['JAX_NUM_PROCESSES']),
                int(os.environ['JAX_PROCESS_ID']),
            )
        else:
            jax.distributed.initialize()


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over all devices of all processes (or over `devices`, e.g. the devices of a
    topology that preflight compiles for).

    The axis is `Auto` (compiler-propagated sharding): only the batch is annotated, and XLA
    inserts the gradient all-reduce and the cross-device BN reductions itself.
    """
    every = list(devices) if devices is not None else jax.devices()
    slices = len({getattr(d, 'slice_index', 0) for d in every})
    if slices > 1:  # multi-slice TPU: jax.make_mesh refuses; the data axis spans the slices
        grid = mesh_utils.create_hybrid_device_mesh((len(every) // slices,), (slices,), every)
        return Mesh(grid, (DATA_AXIS,), axis_types=(AxisType.Auto,))
    count = len(devices) if devices is not None else jax.device_count()
    return jax.make_mesh((count,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, name: str = 'batch_size',
                     devices: int | None = None) -> None:
    """The global batch must split evenly over processes and devices (`devices`: a count other
    than this job's, e.g. a preflight target's)."""
    devices = devices or jax.device_count()
    if global_batch_size <= 0 or global_batch_size % devices:
        raise ValueError(
            f'config.{name}={global_batch_size} does not divide over {devices} devices; '
            f'use a multiple of {devices} (e.g. --config.{name}={max(devices, 1) * 32}).'
        )


def local_batch_size(global_batch_size: int) -> int:
    """This process's share of a global batch."""
    return global_batch_size // jax.process_count()


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles global arrays from each process's slice of the batch."""
    sharding = batch_sharding(mesh)

    def to_global(local: np.ndarray) -> jax.Array:
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree.map(to_global, batch)


def prefetch_to_mesh(
    batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, size: int = 2
) -> Iterator[dict[str, Any]]:
    """Keeps `size` batches in flight on the devices ahead of the step (double buffering).

    The host-to-device copies are asynchronous, so the next batch is already on its way while
    the current step runs.
    """
    queue: collections.deque = collections.deque()
    iterator = iter(batches)
    for batch in iterator:
        queue.append(put_batch(batch, mesh))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
