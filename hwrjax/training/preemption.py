"""Preemption: SIGTERM / Ctrl-C make the training loop save a checkpoint and stop cleanly.

A signal reaches one process; the decision to stop is taken by all of them together
(`agreed_stop`), at the same step, so that every process saves that step and leaves: none is
left waiting in a collective for a process that has gone.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

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


@dataclasses.dataclass(frozen=True)
class StopDecision:
    """The signal that stops a run and the first process that received it."""

    signum: int
    process: int

    def describe(self) -> str:
        """'signal 15' in a one-process run, 'signal 15 (received by process 1)' in a multi-process one."""
        name = f"signal {self.signum}"
        return name if jax.process_count() == 1 else f"{name} (received by process {self.process})"


def agreed_stop(received: int | None) -> StopDecision | None:
    """Whether the run stops here, the same answer on every process: a StopDecision when any process
    received a stop signal (`received`, this process's `StopSignal.received`), else None.

    In a multi-process run every process must call it at the same step (it gathers one number from
    each process); a one-process run decides alone, at no cost.
    """
    if jax.process_count() == 1:
        return None if received is None else StopDecision(int(received), 0)
    signals = np.asarray(multihost_utils.process_allgather(np.asarray(received or 0, np.int32))).reshape(-1)
    first = np.flatnonzero(signals)
    return StopDecision(int(signals[first[0]]), int(first[0])) if first.size else None
