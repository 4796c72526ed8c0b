"""Training from the command line (launch.py): process setup, the run, and errors for people as exit codes."""

from __future__ import annotations

import os
import sys
from typing import Any

from absl import logging

from hwrjax.cli.toolkit import EXIT_ERROR, error_line
from hwrjax.core.errors import Diverged, HwrjaxError, Preempted
from hwrjax.training.cache import enable_compilation_cache
from hwrjax.training.distributed import initialize_distributed
from hwrjax.training.logs import quiet_library_logs


# Exit statuses of launch.py (also in its --help and the README); EXIT_ERROR (the toolkit's): a one-line
# error: bad config or flags, busy or unusable workdir, damaged files, full disk.
EXIT_OK = 0  # trained and reported, or stopped by SIGTERM / Ctrl-C after saving (rerun to resume)
EXIT_DIVERGED = 3  # the loss or gradient norm stopped being finite; the last finite checkpoint is the newest


def run_training(config: Any, workdir: str, allow_config_change: bool = False,
                 coordinator_address: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None, compilation_cache_dir: str | None = None) -> int:
    """Runs train_and_evaluate with errors turned into one line on stderr; returns an exit code (EXIT_*)."""
    try:
        quiet_library_logs()
        enable_compilation_cache(compilation_cache_dir)
        initialize_distributed(coordinator_address, num_processes, process_id)
        import jax

        from hwrjax.apps import train  # TensorFlow is imported (GPUs hidden from it) only when data loads.

        logging.info("JAX process %d of %d, %d local / %d global devices (%s).", jax.process_index(),
                     jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())
        test = train.train_and_evaluate(config, workdir, allow_config_change=allow_config_change)
    except Preempted as e:
        sys.stderr.write(f"hwrjax: {e}\n")
        return EXIT_OK
    except Diverged as e:
        sys.stderr.write(error_line(e))
        return EXIT_DIVERGED
    except HwrjaxError as e:
        sys.stderr.write(error_line(e))
        return EXIT_ERROR
    except OSError as e:  # a file of the run cannot be written (full disk, lost mount, read-only files)
        where = f" ({e.filename})" if e.filename else ""
        sys.stderr.write(error_line(f"{e.strerror or e}{where}; fix the storage of {workdir} and rerun "
                                    "the same command to resume from its last checkpoint"))
        return EXIT_ERROR
    if jax.process_index() == 0:
        sys.stdout.write(f"test accuracy {test['accuracy']:.4%} (loss {test['loss']:.4f}, "
                         f"{test['num_examples']} examples) -> {os.path.join(workdir, 'report', 'test_metrics.json')}\n")
    return 0
