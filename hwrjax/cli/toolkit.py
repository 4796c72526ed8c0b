"""The toolkit every `hwrjax` command is built with: a parser whose usage errors are one line, the
checkpoint choice (best, latest or a step), the workdir and writable-folder checks made before any
work, and a runner that turns a HwrjaxError into one line on stderr and an exit code, with library
chatter quieted meanwhile."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from hwrjax.core.errors import HwrjaxError
from hwrjax.training import storage
from hwrjax.training.checkpoint import check_run_workdir, parse_choice
from hwrjax.training.logs import library_logs_quieted

__all__ = ["EXIT_ERROR", "ArgumentParser", "UsageError", "check_run_workdir", "check_writable", "error_line",
           "parse_checkpoint", "run_command", "writable_at"]

EXIT_ERROR = 2  # a one-line error: bad options, an unusable workdir or output, damaged files


def error_line(message: object, command: str = "hwrjax") -> str:
    """The one line (newline included) `command` writes to stderr for an error meant for people."""
    return f"{command}: error: {message}\n"


def parse_checkpoint(value: str) -> str | int:
    """An argparse type: best, latest or a step number."""
    try:
        return parse_choice(value)
    except HwrjaxError:
        raise argparse.ArgumentTypeError(f"expected best, latest or a step number, got {value!r}") from None


class UsageError(HwrjaxError):
    """A bad command line; the message names the option and points to --help."""


class ArgumentParser(argparse.ArgumentParser):
    """Reports usage errors as one UsageError line instead of printing the usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")

    def add_checkpoint(self, default: str | int = "best", help: str = "best (default), latest or a step number"):
        """Adds --checkpoint: which checkpoint of the run to load."""
        return self.add_argument("--checkpoint", type=parse_checkpoint, default=default, help=help)


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str],
                body: Callable[[argparse.Namespace], int | None], command: str = "hwrjax") -> int:
    """Parses `argv` and runs `body(args)` with library chatter quieted; returns its exit code (0 for
    None, 0 after --help). A HwrjaxError (a usage error included) becomes one line on stderr, headed by
    `command` (and the program's name for a usage error, unless `command` is it), and EXIT_ERROR."""
    with library_logs_quieted():
        try:
            try:
                args = parser.parse_args(list(argv))
            except SystemExit as e:  # --help
                return int(e.code or 0)
            return int(body(args) or 0)
        except UsageError as e:
            sys.stderr.write(error_line(e if command == parser.prog else f"{parser.prog}: {e}", command))
        except HwrjaxError as e:
            sys.stderr.write(error_line(e, command))
        return EXIT_ERROR


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
