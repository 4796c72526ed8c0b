"""The toolkit every `hwrjax` command is built with: a parser whose usage errors are one line,
the checkpoint choice (best, latest or a step), writable-folder checks made before any work, and a
runner that turns a HwrjaxError into one line on stderr and quiets library chatter meanwhile."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from hwrjax.core.errors import HwrjaxError
from hwrjax.training import storage


class ArgumentParser(argparse.ArgumentParser):
    """Reports usage errors as one HwrjaxError line instead of exiting."""

    def error(self, message: str):
        raise HwrjaxError(f"{self.prog}: {message} (see {self.prog} --help)")


def parse_checkpoint(value: str) -> str | int:
    """An argparse type: best, latest or a step number."""
    if value in ("best", "latest"):
        return value
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected best, latest or a step number, got {value!r}")


class DropLibraryChatter:
    """Drops INFO and WARNING records of orbax and tfds (e.g. that checkpoints open read-only)."""

    _NOISY = ("/orbax/", "/tensorflow_datasets/", "/etils/")

    def filter(self, record) -> bool:
        import logging as std_logging

        return record.levelno > std_logging.WARNING or not any(p in record.pathname for p in self._NOISY)


def run_command(body: Callable[[], int]) -> int:
    """Runs a command body; a HwrjaxError becomes one line on stderr and exit code 2."""
    import logging as std_logging

    absl_logger, filt = std_logging.getLogger("absl"), DropLibraryChatter()
    absl_logger.addFilter(filt)
    try:
        return body()
    except HwrjaxError as e:
        sys.stderr.write(f"hwrjax: error: {e}\n")
        return 2
    finally:
        absl_logger.removeFilter(filt)


def writable_at(directory: str) -> str | None:
    """None if `directory` exists writable or can be created, else the folder in the way (a folder in
    object storage, a URL, is taken as writable: a failed write there is reported when it happens)."""
    if storage.is_url(directory):
        return None
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return None if os.path.isdir(probe) and os.access(probe, os.W_OK) else probe


def check_writable(directory: str) -> None:
    """Raises unless `directory` exists writable or can be created (checked before any work)."""
    probe = writable_at(directory)
    if probe is not None:
        raise HwrjaxError(f"cannot write to {directory} ({probe} is not a writable directory); "
                          "pass an --output you can write to")
