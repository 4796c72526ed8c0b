"""The `hwrjax` command: evaluate, compare, calibrate, predict, serve, export, finetune.

Each command's `*_main(argv)` lives in a module of this package (hwrjax.cli.evaluate, .predict, .serve,
.export, .finetune), built with hwrjax.cli.toolkit and calling the applications of hwrjax.apps;
hwrjax.cli.training is launch.py's side.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

# A write that fails for want of room: a full disk or quota, or a file past its size limit.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# Subcommand -> "module:function"; each function takes the remaining argv and returns an exit code.
COMMANDS = {
    "evaluate": ("hwrjax.cli.evaluate:evaluate_main", "metrics, plots, TTA and ensembles of trained runs"),
    "compare": ("hwrjax.cli.evaluate:compare_main", "a side-by-side table of several workdirs"),
    "calibrate": ("hwrjax.cli.evaluate:calibrate_main", "fit the temperature that calibrates a run's probabilities"),
    "predict": ("hwrjax.cli.predict:predict_main", "read digits and numbers from image files"),
    "serve": ("hwrjax.cli.serve:serve_main", "an HTTP service and a page to draw digits on"),
    "export": ("hwrjax.cli.export:export_main", "serialize a trained model (stablehlo, savedmodel, tflite)"),
    "finetune": ("hwrjax.cli.finetune:finetune_main", "continue training on your own samples"),
}


def _usage() -> str:
    lines = ["usage: hwrjax COMMAND [options]   (hwrjax COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Dispatches to a subcommand; returns its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"hwrjax: unknown command {name!r}; use one of {', '.join(COMMANDS)}\n")
        return 2
    from hwrjax.training.cache import enable_compilation_cache

    enable_compilation_cache(None)
    module_name, func_name = COMMANDS[name][0].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            sys.stderr.write(f"hwrjax: command {name!r} is not available in this version\n")
            return 2
        raise
    try:
        code = int(getattr(module, func_name)(rest) or 0)
        sys.stdout.flush()  # here, so that a full disk under the output is reported like any other
        return code
    except OSError as e:
        if e.errno not in _NO_ROOM:
            raise
        _drop_stdout()
        where = e.filename or "its output"
        sys.stderr.write(f"hwrjax {name}: error: cannot write {where}: {e.strerror}; free some space there "
                         "(or send the output elsewhere) and rerun\n")
        return 1


def _drop_stdout() -> None:
    """Points stdout at the null device, so what it still holds is not written again at exit."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # stdout is no file (captured, replaced)
        pass

