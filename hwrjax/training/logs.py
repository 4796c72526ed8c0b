"""Metric logging from process 0: metrics.jsonl, TensorBoard events, absl logs, a progress display."""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import sys
from typing import Any, Iterator

from absl import logging

from hwrjax.training import storage


def summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without importing PyTorch.

    tensorboardX probes for torch at import time (to accept torch tensors), which costs 2-4 s of
    every launch wherever torch happens to be installed; scalars need none of it. Unless the
    process already uses torch, the probe is answered "not installed" for the duration of the
    import only, so a later `import torch` elsewhere works as usual.
    """
    if "torch" in sys.modules or "tensorboardX.writer" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def keep_rows_until(path: str, step: int) -> None:
    """Rewrites the metrics file `path` without the rows a run resumed at `step` writes again.

    Those are the rows after `step` and the test report row at `step` (a finished run reports
    again); a line cut short by a killed process goes too. Every logged step then has one
    row of each kind, however often the run was resumed.
    """
    if not storage.exists(path):
        return
    kept = []
    for line in storage.read_text(path).splitlines(keepends=True):
        try:
            row = json.loads(line)
            row_step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if row_step < step or (row_step == step and not any(k.startswith("test_") for k in row)):
            kept.append(line if line.endswith("\n") else line + "\n")
    storage.write_atomic(path, "".join(kept))


class MetricLogger:
    """Writes each metrics row to WORKDIR/metrics.jsonl, TensorBoard and the log (a local or URL workdir,
    through hwrjax.training.storage).

    With `resume_step`, rows a run resumed at that step writes again are dropped from
    metrics.jsonl first (see `keep_rows_until`).
    """

    def __init__(self, workdir: str, enabled: bool = True, total_steps: int = 0, progress: bool = False,
                 resume_step: int | None = None):
        self.workdir = workdir
        self.enabled = enabled
        self.total_steps = total_steps
        self._file = None
        self._tb = None
        self._progress = None
        self._task = None
        if not enabled:
            return
        if resume_step is not None:
            keep_rows_until(storage.join(workdir, "metrics.jsonl"), resume_step)
        self._file = storage.LineLog(storage.join(workdir, "metrics.jsonl"))
        tensorboard = storage.join(workdir, "tensorboard")
        storage.register_tensorboard_scheme(tensorboard)
        self._tb = summary_writer_class()(tensorboard)
        if progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                      TimeRemainingColumn(), TextColumn("{task.description}"), transient=False)

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("", total=self.total_steps)
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        return False

    def write(self, step: int, row: dict[str, Any]) -> None:
        """Records one row of scalar metrics at `step`."""
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": int(step), **row}))
        for key, value in row.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        logging.info("step %d: %s", step, text)
        if self._progress is not None and self._task is not None:
            summary = ", ".join(f"{k.replace('train_', '')} {row[k]:.4f}" for k in
                                ("train_loss", "train_accuracy", "val_accuracy") if k in row)
            self._progress.update(self._task, completed=step, **({"description": summary} if summary else {}))

    def write_image(self, tag: str, image, step: int) -> None:
        """Records an HWC uint8 image in TensorBoard."""
        if self.enabled:
            self._tb.add_image(tag, image, step, dataformats="HWC")

    def write_report(self, name: str, report: dict) -> str:
        """Writes `report` as JSON to WORKDIR/report/NAME atomically and returns the path."""
        path = storage.join(self.workdir, "report", name)
        if self.enabled:
            storage.write_json_atomic(path, report)
        return path

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class LibraryNoise:
    """A log filter: drops the records of libraries that log every checkpoint and dataset file
    operation (orbax, tfds, etils, JAX's backend probe) at or below `level`, and the tracebacks of
    their errors (each background thread of a failed save logs one; hwrjax reports the failure
    itself in one line).

    Training keeps those libraries' warnings (`level` INFO); a command whose user only reads
    what it prints drops them too (`level` WARNING, e.g. that checkpoints open read-only).
    """

    _NOISY = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/xla_bridge", "/etils/")
    # Where those background threads' failures surface too (futures calling back into closed loops).
    _THREADS = ("/concurrent/futures/", "/asyncio/")

    def __init__(self, level: int = std_logging.INFO):
        self.level = level

    def filter(self, record: std_logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in self._NOISY)
        if record.levelno > self.level:
            if record.exc_info and (noisy or any(part in record.pathname for part in self._THREADS)):
                record.exc_info, record.exc_text = None, None
            return True
        return not noisy


def is_library_noise(unraisable: Any) -> bool:
    """True for an unraisable exception left by Orbax's background reads and writes: a coroutine
    it abandoned when a restore or save failed, or a callback into an event loop it had closed.

    Python prints each with a traceback when it is collected; the failure itself is reported
    once, in one line, by hwrjax.
    """
    code = getattr(unraisable.object, "cr_code", None)
    files = [code.co_filename] if code is not None else []
    tb = unraisable.exc_traceback
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    if any("/orbax/" in f for f in files):
        return True
    return isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed" \
        and any("/asyncio/" in f for f in files)


def _quiet_unraisable_hook(previous: Any) -> Any:
    def hook(unraisable: Any) -> None:
        if not is_library_noise(unraisable):
            previous(unraisable)

    hook.quiet = True
    return hook


def _quiet_unraisable() -> None:
    if not getattr(sys.unraisablehook, "quiet", False):
        sys.unraisablehook = _quiet_unraisable_hook(sys.unraisablehook)


def quiet_library_logs(level: int = std_logging.INFO) -> None:
    """From now on, keeps the log to what hwrjax says: drops the libraries' records at or below
    `level` and their tracebacks (see `LibraryNoise`), and the tracebacks of Orbax's background
    threads (see `is_library_noise`)."""
    _quiet_unraisable()
    filt = LibraryNoise(level)
    std_logging.getLogger("absl").addFilter(filt)
    for handler in std_logging.getLogger().handlers:
        handler.addFilter(filt)


@contextlib.contextmanager
def library_logs_quieted(level: int = std_logging.WARNING) -> Iterator[None]:
    """`quiet_library_logs(level)` for the duration of a block (a command's run)."""
    _quiet_unraisable()
    filt = LibraryNoise(level)
    loggers = [std_logging.getLogger("absl"), *std_logging.getLogger().handlers]
    for logger in loggers:
        logger.addFilter(filt)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(filt)
