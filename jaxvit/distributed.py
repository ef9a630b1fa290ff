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
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
    else:
        return
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
