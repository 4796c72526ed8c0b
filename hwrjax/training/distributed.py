"""Multi-process runs: JAX's distributed runtime, started from flags or from the cluster launcher."""

from __future__ import annotations

import os

from hwrjax.core.errors import HwrjaxError


def _cluster_detected() -> bool:
    """True when a launcher that jax.distributed can read by itself started several processes."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return "MEGASCALE_COORDINATOR_ADDRESS" in os.environ or "TPU_WORKER_HOSTNAMES" in os.environ


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Starts JAX's distributed runtime when flags ask for it or the cluster launcher implies it."""
    import jax

    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise HwrjaxError("pass all of --coordinator_address, --num_processes and --process_id, or none of them")
    if all(given):
        if num_processes <= 0 or not 0 <= process_id < num_processes:
            raise HwrjaxError(f"--process_id must be in [0, {num_processes}) and --num_processes positive")
        # CPU devices of different processes talk through gloo; GPU/TPU use their own collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # Process 0's coordinator listens only on the address it was given (JAX's default is every interface).
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, coordinator_bind_address=coordinator_address)
    elif _cluster_detected():
        jax.distributed.initialize()
