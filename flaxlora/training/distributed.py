"""Several processes, one mesh: JAX's multi-controller runtime, set up before anything else.

Each process runs the same program; after :func:`initialize` the mesh spans every process's
devices, each process builds the same global batches and copies only its own shards
(:func:`flaxlora.training.sharding.global_batch`), and process 0 alone writes logs and results.
On CPUs the collectives between processes go through gloo, so N local processes, each started
with ``XLA_FLAGS=--xla_force_host_platform_device_count=K``, form one N*K-device mesh.
"""

from __future__ import annotations

import dataclasses
import socket
import time

import jax


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where the coordinator is, how many processes take part and which one this is.

    ``Cluster.parse`` validates the three together; :func:`initialize` with ``None`` lets JAX
    detect them (TPU pods, SLURM, Open MPI).
    """

    coordinator: str
    num_processes: int
    process_id: int

    @classmethod
    def parse(cls, coordinator: str | None, num_processes: int | None, process_id: int | None) -> "Cluster | None":
        """None when none of the three is given; ValueError naming the problem otherwise."""
        given = (coordinator is not None, num_processes is not None, process_id is not None)
        if not any(given):
            return None
        if not all(given):
            raise ValueError("--coordinator, --num-processes and --process-id go together: give all three")
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--coordinator must be HOST:PORT with a port in 1..65535, got {coordinator!r}")
        if num_processes < 1:
            raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in 0..{num_processes - 1} for --num-processes "
                             f"{num_processes}, got {process_id}")
        return cls(coordinator, num_processes, process_id)


def _wait_for_coordinator(cluster: Cluster, timeout_s: float) -> None:
    """Process 0: its coordinator port must be free. Others: poll it until it answers.

    JAX's runtime aborts the whole process (no exception) when it cannot register in time, so
    what can be checked beforehand is checked here, with a one-line error.
    """
    host, _, port = cluster.coordinator.rpartition(":")
    address = (host.strip("[]"), int(port))
    if cluster.process_id == 0:
        try:
            with socket.create_server(address, reuse_port=False):
                return
        except OSError as err:
            raise RuntimeError(f"process 0 cannot serve the coordinator at {cluster.coordinator}: {err.strerror} "
                               "(pick a free port)") from None
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(address, timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no coordinator answered at {cluster.coordinator} within {timeout_s:.0f} s: "
                                   "start process 0 with the same --coordinator (and check host and port)") from None
            time.sleep(0.2)


def initialize(cluster: Cluster | None, *, timeout_s: int = 120) -> None:
    """Join the processes of ``cluster`` (None: let JAX detect the cluster) before any other JAX call.

    Raises RuntimeError in one line when process 0 cannot serve the coordinator's port or, for
    the other processes, no coordinator answers within ``timeout_s``. Past that, JAX's runtime
    waits up to ``timeout_s`` for every process to register and then ends the process itself.
    """
    # CPU devices talk through gloo; the setting only concerns the CPU backend, so it is harmless
    # on TPU and GPU, and it must be made before any backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cluster is None:
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return
    _wait_for_coordinator(cluster, timeout_s)
    jax.distributed.initialize(coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
                               process_id=cluster.process_id, initialization_timeout=timeout_s)
