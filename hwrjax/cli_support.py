"""Process setup shared by launch.py and the `hwrjax` command: distributed init, errors for people."""

from __future__ import annotations

import os
import sys
from typing import Any

from absl import logging

from hwrjax.errors import Diverged, HwrjaxError, Preempted


CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def default_cache_dir() -> str:
    """Where compiled programs are kept between runs: $JAX_COMPILATION_CACHE_DIR (set but empty: no
    cache), else a per-user cache folder."""
    if CACHE_ENV in os.environ:
        return os.environ[CACHE_ENV]
    return user_cache_dir("jax")


def user_cache_dir(name: str) -> str:
    """hwrjax's folder `name` in the per-user cache ($XDG_CACHE_HOME, else ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hwrjax", name)


def enable_compilation_cache(path: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache in `path` (None: `default_cache_dir()`, "": off).

    A rerun, a resume or a second seed of the same recipe then loads its compiled train and
    eval steps instead of compiling them again (a smoke ResNet launch: 42 s -> 25 s here).
    The cache only saves time: a folder that cannot be created or written is logged and the
    run goes on without it. Returns the folder in use, or None.
    """
    import jax

    path = default_cache_dir() if path is None else path
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
        writable = os.access(path, os.W_OK | os.X_OK)
    except OSError as e:
        logging.warning("Compilation cache disabled: cannot create %s (%s).", path, e)
        return None
    if not writable:
        logging.warning("Compilation cache disabled: %s is not writable.", path)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # Small programs too: the eval step of a small model compiles in well under the 1 s default.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return path


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


# Exit statuses of launch.py (also in its --help and the README).
EXIT_OK = 0  # trained and reported, or stopped by SIGTERM / Ctrl-C after saving (rerun to resume)
EXIT_ERROR = 2  # a one-line error: bad config or flags, busy or unusable workdir, damaged files, full disk
EXIT_DIVERGED = 3  # the loss or gradient norm stopped being finite; the last finite checkpoint is the newest


def run_training(config: Any, workdir: str, allow_config_change: bool = False,
                 coordinator_address: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None, compilation_cache_dir: str | None = None) -> int:
    """Runs train_and_evaluate with errors turned into one line on stderr; returns an exit code (EXIT_*)."""
    try:
        from hwrjax.logs import quiet_library_logs

        quiet_library_logs()
        enable_compilation_cache(compilation_cache_dir)
        initialize_distributed(coordinator_address, num_processes, process_id)
        import jax

        from hwrjax import train  # TensorFlow is imported (GPUs hidden from it) only when data loads.

        logging.info("JAX process %d of %d, %d local / %d global devices (%s).", jax.process_index(),
                     jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())
        test = train.train_and_evaluate(config, workdir, allow_config_change=allow_config_change)
    except Preempted as e:
        sys.stderr.write(f"hwrjax: {e}\n")
        return EXIT_OK
    except Diverged as e:
        sys.stderr.write(f"hwrjax: error: {e}\n")
        return EXIT_DIVERGED
    except HwrjaxError as e:
        sys.stderr.write(f"hwrjax: error: {e}\n")
        return EXIT_ERROR
    except OSError as e:  # a file of the run cannot be written (full disk, lost mount, read-only files)
        where = f" ({e.filename})" if e.filename else ""
        sys.stderr.write(f"hwrjax: error: {e.strerror or e}{where}; fix the storage of {workdir} and rerun "
                         "the same command to resume from its last checkpoint\n")
        return EXIT_ERROR
    if jax.process_index() == 0:
        sys.stdout.write(f"test accuracy {test['accuracy']:.4%} (loss {test['loss']:.4f}, "
                         f"{test['num_examples']} examples) -> {os.path.join(workdir, 'report', 'test_metrics.json')}\n")
    return 0
