"""Timing shared by the benchmark programs."""

from __future__ import annotations

import time

import jax
import numpy as np


def time_alternating(fns: dict, states: dict, steps: int, repeats: int) -> tuple[dict, dict]:
    """Median seconds per step of each fn, timed in alternation (a, b, a, b, ...) so that the
    machine's noise hits every variant alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            state = states[name]
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = fn(state)
            jax.block_until_ready(metrics)
            times[name].append((time.perf_counter() - start) / steps)
            states[name] = state
    return {name: float(np.median(t)) for name, t in times.items()}, states
