"""Process setup shared by launch.py and the `hwrjax` command: distributed init, errors for people."""

from __future__ import annotations

import os
import sys
from typing import Any

from absl import logging

from hwrjax.errors import HwrjaxError


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
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif _cluster_detected():
        jax.distributed.initialize()


def run_training(config: Any, workdir: str, allow_config_change: bool = False,
                 coordinator_address: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None) -> int:
    """Runs train_and_evaluate with errors turned into one line on stderr; returns an exit code."""
    try:
        from hwrjax.logs import quiet_library_logs

        quiet_library_logs()
        initialize_distributed(coordinator_address, num_processes, process_id)
        import jax

        from hwrjax import train  # TensorFlow is imported (GPUs hidden from it) only when data loads.

        logging.info("JAX process %d of %d, %d local / %d global devices (%s).", jax.process_index(),
                     jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())
        test = train.train_and_evaluate(config, workdir, allow_config_change=allow_config_change)
    except train.Preempted as e:
        sys.stderr.write(f"hwrjax: {e}\n")
        return 0
    except HwrjaxError as e:
        sys.stderr.write(f"hwrjax: error: {e}\n")
        return 2
    if jax.process_index() == 0:
        sys.stdout.write(f"test accuracy {test['accuracy']:.4%} (loss {test['loss']:.4f}, "
                         f"{test['num_examples']} examples) -> {os.path.join(workdir, 'report', 'test_metrics.json')}\n")
    return 0
