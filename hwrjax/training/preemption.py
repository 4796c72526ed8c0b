"""Preemption: SIGTERM / Ctrl-C make the training loop save a checkpoint and stop cleanly."""

from __future__ import annotations

import os
import signal

from hwrjax.core.errors import ConfigError


# Test hook: HWRJAX_TEST_SIGNAL_AT_STEP="STEP:SIGNAL" (e.g. "40:SIGKILL") makes the training loop send
# SIGNAL to its own process right after step STEP (and that step's validation and checkpoint calls),
# so tests interrupt a run at a chosen step instead of racing the clock. Unset, it costs nothing.
SIGNAL_AT_STEP_ENV = "HWRJAX_TEST_SIGNAL_AT_STEP"


def signal_at_step_hook() -> tuple[int, signal.Signals] | None:
    """(step, signal) from $HWRJAX_TEST_SIGNAL_AT_STEP, or None when it is unset or empty."""
    value = os.environ.get(SIGNAL_AT_STEP_ENV, "")
    if not value:
        return None
    step, _, name = value.partition(":")
    try:
        return int(step), signal.Signals[name]
    except (ValueError, KeyError):
        raise ConfigError(f"{SIGNAL_AT_STEP_ENV}={value!r} is not STEP:SIGNAL (e.g. 40:SIGTERM); "
                          "fix or unset it") from None


class StopSignal:
    """Within `with StopSignal() as stop:`, SIGTERM and Ctrl-C set `stop.received` instead of killing the
    process, so the loop saves a checkpoint and stops; a second Ctrl-C stops at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # Not the main thread: leave signals alone.
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # A second Ctrl-C stops at once.
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
