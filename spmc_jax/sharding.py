"""Many devices and many hosts: a 1-D `Mesh` over the client axis.

The engine's round is one jitted function over arrays with a leading client axis (the m
participants' tasks, their trained rows W (m, d)). With a mesh of D devices, local
training runs under `shard_map`, each device on m/D participants. With `client_data`
'blocks' (the default under full participation), registered clients form D blocks
(contiguous ids, or balanced by local steps: `engine.balanced_order`) and the training data
is stored per block (each device holds only the images its clients use); with 'replicated'
(the default under partial participation) every device holds every image and participants
are sampled as on one device. The trained rows come out sharded over the client axis
(`NamedSharding(mesh, P('clients'))`); everything after (the aggregators, the new global
model) is left to XLA's sharding propagation, so the aggregators are unchanged: a column
mean over a sharded client axis becomes a local sum plus an all-reduce. Only the client axis
is split, so (with the default `client_data`) the result equals the single-device run up to
float32 summation order of cross-client reductions.

Many hosts: `initialize_distributed` calls `jax.distributed.initialize` from flags or the
environment (`SPMC_COORDINATOR`, `SPMC_NUM_PROCESSES`, `SPMC_PROCESS_ID`); with no values it
lets JAX auto-detect the cluster (TPU pod slices, Slurm, Open MPI). After it, `jax.devices()`
lists every host's devices and the same mesh spans all of them.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

CLIENT_AXIS = "clients"


def resolve_device_count(devices: str | int, n_clients: int) -> int:
    """Devices to shard `n_clients` over: the largest count ≤ the request that divides n.

    Args:
      devices: 'auto' (all of `jax.devices()`) or a positive count.
      n_clients: participants per round (the sharded axis length).

    Returns:
      D ≥ 1 with n_clients % D == 0 (a static, even split keeps the round one program).
    """
    avail = len(jax.devices())
    if devices == "auto":
        want = avail
    else:
        try:
            want = int(devices)
        except (TypeError, ValueError):
            raise ValueError(
                f"devices={devices!r}; accepted: 'auto' or a positive integer"
            ) from None
        if want < 1:
            raise ValueError(f"devices={devices!r}; accepted: 'auto' or a positive integer")
        if want > avail:
            raise ValueError(
                f"devices={want} but only {avail} device(s) are visible: {jax.devices()}"
            )
    d = min(want, n_clients)
    while n_clients % d:
        d -= 1
    return d


def client_mesh(n_devices: int) -> Mesh:
    """A 1-D mesh named 'clients' over the first `n_devices` devices (all processes)."""
    devs = np.asarray(jax.devices()[:n_devices])
    return Mesh(devs, (CLIENT_AXIS,))


def client_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (client) axis split over the mesh, other axes replicated."""
    return NamedSharding(mesh, P(CLIENT_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def set_cpu_devices(n: int) -> None:
    """Expose the host CPU as `n` JAX devices (`jax_num_cpu_devices`; before backend start).

    The client mesh then splits clients over them and XLA runs the per-device programs
    concurrently, each on part of the cores.
    """
    if n < 1:
        raise ValueError(f"--cpu-devices must be >= 1, got {n}")
    jax.config.update("jax_num_cpu_devices", n)


def default_cpu_device_count() -> int | None:
    """One JAX device per allowed core: the command lines' CPU split when none is given.

    Clients then train one per core (issue 14: a paper-protocol MNIST round 1.5x (FedAvg)
    and 1.6x (SPMC) faster on 2 cores than one device whose ops use both). None (keep one
    device) on one core, in a multi-host run (flags aside, which the caller checks: env
    SPMC_COORDINATOR / SPMC_NUM_PROCESSES / SPMC_DISTRIBUTED=auto), or when JAX_PLATFORMS
    excludes cpu.
    """
    if any(os.environ.get(v) for v in ("SPMC_COORDINATOR", "SPMC_NUM_PROCESSES")):
        return None
    if os.environ.get("SPMC_DISTRIBUTED", "").lower() == "auto":
        return None
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.lower().split(","):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores if cores and cores > 1 else None


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Start multi-host JAX (`jax.distributed.initialize`) when asked to.

    Args:
      coordinator: 'host:port' of process 0 (default: env SPMC_COORDINATOR).
      num_processes: total processes (default: env SPMC_NUM_PROCESSES).
      process_id: this process's rank (default: env SPMC_PROCESS_ID).

    Returns:
      True when `jax.distributed.initialize` was called. With no value from flags or the
      environment, it is called without arguments only when env SPMC_DISTRIBUTED=auto (JAX
      then auto-detects TPU pod slices / Slurm / Open MPI); otherwise nothing happens.
    """
    coordinator = coordinator or os.environ.get("SPMC_COORDINATOR")
    env_n = os.environ.get("SPMC_NUM_PROCESSES")
    env_id = os.environ.get("SPMC_PROCESS_ID")
    num_processes = num_processes if num_processes is not None else (int(env_n) if env_n else None)
    process_id = process_id if process_id is not None else (int(env_id) if env_id else None)
    if coordinator is None and num_processes is None and process_id is None:
        if os.environ.get("SPMC_DISTRIBUTED", "").lower() == "auto":
            jax.distributed.initialize()
            return True
        return False
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError(
            f"multi-host needs all of --coordinator ({coordinator!r}), --num-processes "
            f"({num_processes!r}) and --process-id ({process_id!r}), or none of them"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id} must be in [0, {num_processes})")
    # The CPU backend needs an explicit cross-process collectives implementation (gloo); the
    # option only affects the CPU client. Querying the backend here would initialise it too
    # early (initialize() must run first), so it is set unconditionally.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return True
