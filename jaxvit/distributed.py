"""Multi-process start-up: jax.distributed from SLURM or explicit environment variables."""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("jaxvit")


def initialize() -> None:
    """Join the other processes when launched as one of several; a no-op for a single process.

    Explicit: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID (launch/local.sh sets them).
    SLURM: detected from SLURM_* variables when more than one task runs (jax reads them itself).
    JAXVIT_DISTRIBUTED=auto: jax's own cluster detection (Cloud TPU pods, GKE, Open MPI, ...).
    Failure detection (seconds, from the environment): a process that dies is noticed by the coordination
    service within JAXVIT_HEARTBEAT_TIMEOUT (30; jax's default is 100) and every other process then aborts
    with an error; the barrier at exit waits at most JAXVIT_SHUTDOWN_TIMEOUT (120) for slower peers;
    start-up waits JAXVIT_INIT_TIMEOUT (300) for all processes to join. Starts no backend.
    """
    timeouts = dict(heartbeat_timeout_seconds=int(os.environ.get("JAXVIT_HEARTBEAT_TIMEOUT", "30")),
                    shutdown_timeout_seconds=int(os.environ.get("JAXVIT_SHUTDOWN_TIMEOUT", "120")),
                    initialization_timeout=int(os.environ.get("JAXVIT_INIT_TIMEOUT", "300")))
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]), **timeouts)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("JAXVIT_DISTRIBUTED") == "auto":
        jax.distributed.initialize(**timeouts)


def log_topology() -> None:
    """Log this process's place and what it computes on (starts jax's backends)."""
    from jaxvit.accelerator import describe_devices
    log.info("process %d of %d on %s; %d global devices", jax.process_index(), jax.process_count(),
             describe_devices(jax.local_devices()), jax.device_count())
