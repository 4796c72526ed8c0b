"""The CLI toolkit every `hwrjax` command is built with: a bad --checkpoint (or workdir, or option) is one
line on stderr and exit code 2 from every command, before any work; --help is exit 0; library log noise
is dropped while a command runs and hwrjax's own warnings are kept."""

import logging

import pytest

from hwrjax.cli import evaluate as evaluate_cli
from hwrjax.cli import export as export_cli
from hwrjax.cli import finetune as finetune_cli
from hwrjax.cli import predict as predict_cli
from hwrjax.cli import serve as serve_cli
from hwrjax.cli import toolkit
from hwrjax.core.errors import HwrjaxError
from hwrjax.training import logs


def _commands(workdir: str, tmp) -> dict:
    """Each command's main with the arguments it needs besides --checkpoint."""
    return {
        "evaluate": (evaluate_cli.evaluate_main, [f"--workdir={workdir}"]),
        "calibrate": (evaluate_cli.calibrate_main, [f"--workdir={workdir}"]),
        "predict": (predict_cli.predict_main, [f"--workdir={workdir}", str(tmp)]),
        "export": (export_cli.export_main, [f"--workdir={workdir}", "--format=stablehlo", f"--output={tmp / 'm'}"]),
        "finetune": (finetune_cli.finetune_main, [f"--workdir={workdir}", f"--samples={tmp}",
                                                  f"--output-workdir={tmp / 'tuned'}"]),
        "serve": (serve_cli.serve_main, [f"--workdir={workdir}", "--port=0"]),
    }


# predict and serve head their lines with their own name, as their other messages ("note:", "skipped").
OWN_NAME = ("predict", "serve")


def _one_line(capsys, code: int, prefix: str = "hwrjax") -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{prefix}: error: "), captured.err
    assert "Traceback" not in captured.err and "usage:" not in captured.err
    return lines[0]


def _usage_prefix(name: str) -> str:
    return f"hwrjax {name}: error: " if name in OWN_NAME else f"hwrjax: error: hwrjax {name}: "


@pytest.mark.parametrize("name", ["evaluate", "calibrate", "predict", "export", "finetune", "serve"])
def test_every_command_refuses_a_bad_checkpoint_in_one_line(name, tmp_path, capsys):
    main, argv = _commands(str(tmp_path), tmp_path)[name]
    for bad in ("newest", "-1", "1.5"):
        line = _one_line(capsys, main([*argv, f"--checkpoint={bad}"]), _usage_prefix(name).split(": error")[0])
        assert line == (f"{_usage_prefix(name)}argument --checkpoint: expected best, latest or a step number, "
                        f"got {bad!r} (see hwrjax {name} --help)")
    assert not (tmp_path / "m").exists() and not (tmp_path / "tuned").exists()


@pytest.mark.parametrize("name", ["evaluate", "calibrate", "predict", "export", "finetune", "serve"])
def test_every_command_refuses_a_missing_workdir_in_one_line(name, tmp_path, capsys):
    main, argv = _commands(str(tmp_path / "nowhere"), tmp_path)[name]
    line = _one_line(capsys, main(argv), f"hwrjax {name}" if name in OWN_NAME else "hwrjax")
    assert "nowhere is not a directory (it does not exist); pass the --workdir of a training run" in line


@pytest.mark.parametrize("name", ["evaluate", "predict", "serve", "export"])
def test_help_and_usage_errors(name, tmp_path, capsys):
    main, argv = _commands(str(tmp_path), tmp_path)[name]
    assert main(["--help"]) == 0
    assert f"usage: hwrjax {name}" in capsys.readouterr().out
    line = _one_line(capsys, main([*argv, "--no-such-option"]), _usage_prefix(name).split(": error")[0])
    assert line.startswith(_usage_prefix(name)) and "unrecognized arguments: --no-such-option" in line


def test_option_errors_of_predict_and_serve_are_one_line(tmp_path, capsys):
    line = _one_line(capsys, predict_cli.predict_main([str(tmp_path), f"--workdir={tmp_path}", "--batch-size=0"]),
                     "hwrjax predict")
    assert line == "hwrjax predict: error: --batch-size must be at least 1 (see hwrjax predict --help)"
    line = _one_line(capsys, serve_cli.serve_main([f"--workdir={tmp_path}", "--port=70000"]), "hwrjax serve")
    assert line == "hwrjax serve: error: --port must be in 0..65535, got 70000 (see hwrjax serve --help)"


def test_run_command_turns_errors_into_exit_codes(capsys):
    parser = toolkit.ArgumentParser(prog="hwrjax demo")
    parser.add_checkpoint()

    def fails(args):
        raise HwrjaxError(f"cannot use checkpoint {args.checkpoint}; pick another")

    assert toolkit.run_command(parser, ["--checkpoint=12"], fails) == 2
    assert capsys.readouterr().err == "hwrjax: error: cannot use checkpoint 12; pick another\n"
    assert toolkit.run_command(parser, ["--checkpoint=x"], fails) == 2
    assert capsys.readouterr().err == ("hwrjax: error: hwrjax demo: argument --checkpoint: expected best, latest or "
                                       "a step number, got 'x' (see hwrjax demo --help)\n")
    assert toolkit.run_command(parser, ["--checkpoint=x"], fails, command="hwrjax demo") == 2
    assert capsys.readouterr().err == ("hwrjax demo: error: argument --checkpoint: expected best, latest or "
                                       "a step number, got 'x' (see hwrjax demo --help)\n")
    assert toolkit.run_command(parser, [], lambda args: None) == 0
    assert toolkit.run_command(parser, ["--checkpoint=latest"], lambda args: 3 if args.checkpoint == "latest" else 0) == 3


def _record(pathname: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("absl", level, pathname, 1, "message", None, None)


def test_library_noise_filter():
    orbax = "/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"
    ours = "/work/hwrjax/apps/recognize.py"
    training, command = logs.LibraryNoise(logging.INFO), logs.LibraryNoise(logging.WARNING)
    assert not training.filter(_record(orbax, logging.INFO)) and training.filter(_record(orbax, logging.WARNING))
    assert not command.filter(_record(orbax, logging.WARNING)) and command.filter(_record(orbax, logging.ERROR))
    assert command.filter(_record(ours, logging.INFO)) and command.filter(_record(ours, logging.WARNING))
    absl_logger = logging.getLogger("absl")
    before = list(absl_logger.filters)
    with logs.library_logs_quieted():
        assert any(isinstance(f, logs.LibraryNoise) for f in absl_logger.filters)
    assert absl_logger.filters == before
