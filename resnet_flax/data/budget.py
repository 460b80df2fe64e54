"""Per-process shares of the host's input-pipeline resources: threads, workers, buffers.

With one process per accelerator (SLURM `srun --ntasks-per-node=8`, torchrun-style
launchers), every process on a host would otherwise size its thread pool to all the host's
cores and keep its own full shuffle buffer: 8x oversubscribed CPUs and 8x the RAM. Here the
host's cores and the configured buffer are divided by the number of processes on the host.

Processes on the host, first that applies:
1. `data.processes_per_host` > 0 (the config says so);
2. the launcher's local world size: LOCAL_WORLD_SIZE (torchrun), SLURM_NTASKS_PER_NODE
   ('8' or '8(x2)'), OMPI_COMM_WORLD_LOCAL_SIZE (Open MPI), MPI_LOCALNRANKS (MPICH);
3. 1.
Cores: the CPUs this process may run on (its affinity mask). When a launcher already pinned
the process to a subset of the host (SLURM `--cpus-per-task` with binding), that subset is
this process's share and is not divided again.

No JAX, no TensorFlow here: every source may use it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import ml_collections

LOCAL_SIZE_VARIABLES = ('LOCAL_WORLD_SIZE', 'SLURM_NTASKS_PER_NODE',
                        'OMPI_COMM_WORLD_LOCAL_SIZE', 'MPI_LOCALNRANKS')


@dataclasses.dataclass(frozen=True)
class Budget:
    """What one process may use."""

    processes_per_host: int
    cores: int  # CPU cores of this process's share
    threads: int  # tf.data private thread pool / grain reader threads
    workers: int  # grain worker processes (0 = decode on threads in this process)
    shuffle_buffer: int  # tf.data shuffle buffer, in examples


def _launcher_local_size(environ: Mapping[str, str]) -> tuple[int, str] | None:
    """(processes on this host, the variable that said so), or None."""
    for name in LOCAL_SIZE_VARIABLES:
        value = environ.get(name, '').strip()
        # SLURM writes '8' or, for heterogeneous allocations, '8(x2),4': this node's is first.
        found = re.match(r'\d+', value)
        if found and int(found.group()) > 0:
            return int(found.group()), name
    return None


def processes_per_host(data_cfg: ml_collections.ConfigDict,
                       environ: Mapping[str, str] | None = None) -> int:
    configured = int(data_cfg.get('processes_per_host', 0))
    if configured > 0:
        return configured
    found = _launcher_local_size(os.environ if environ is None else environ)
    return found[0] if found else 1


def _available_cores() -> tuple[int, int]:
    """(cores this process may run on, cores of the host)."""
    host = os.cpu_count() or 1
    try:
        return len(os.sched_getaffinity(0)), host
    except AttributeError:  # macOS has no affinity masks
        return host, host


def compute(data_cfg: ml_collections.ConfigDict, *, environ: Mapping[str, str] | None = None,
            cores: tuple[int, int] | None = None) -> Budget:
    """This process's budget from the config; `environ` and `cores` (mine, host's) are for
    tests and default to the real ones."""
    if int(data_cfg.get('processes_per_host', 0)) < 0 or int(data_cfg.get('num_workers', -1)) < -1:
        raise ValueError(
            f'data.processes_per_host={data_cfg.processes_per_host} must be >= 0 (0 = from the '
            f'launcher) and data.num_workers={data_cfg.num_workers} >= -1 (-1 = from the cores).')
    processes = processes_per_host(data_cfg, environ)
    mine, host = cores or _available_cores()
    # A mask narrower than the host means the launcher already gave this process its share.
    share = mine if mine < host else max(host // processes, 1)
    threads = int(data_cfg.threadpool_size) or share
    workers = int(data_cfg.get('num_workers', -1))
    if workers < 0:
        # One decoding process per core, less one core for the trainer itself; below 3
        # cores, worker processes cost more than they give and threads decode instead.
        workers = share - 1 if share >= 3 else 0
    buffer = max(int(data_cfg.shuffle_buffer_size) // processes, 1)
    return Budget(processes_per_host=processes, cores=share, threads=threads, workers=workers,
                  shuffle_buffer=buffer)
