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


class RecipeStep:
    """A recipe's model, optimizer, loss and one random batch at its batch size: what a train-step
    benchmark compiles variants of. `new_step()` gives a new function object each call, since JAX
    reuses the trace of a function it has already seen (e.g. across a change of layers' settings)."""

    def __init__(self, config):
        from hwrjax import models
        from hwrjax.core import losses, optim, rng

        self.batch_size = b = config.batch_size
        self.model = models.create_model(config.model, 10, dtype=config.dtype)
        self.tx = optim.make_optimizer(config, optim.make_schedule(config, 100, config.num_epochs))
        self.keys = rng.RunKeys.from_seed(0)
        self.loss_fn = losses.get_loss(config.loss)
        data = np.random.default_rng(0)
        self.batch = {"image": jax.numpy.asarray(data.random((b, 28, 28, 1), dtype=np.float32)),
                      "label": jax.numpy.asarray(data.integers(0, 10, b).astype(np.int32))}

    def new_state(self):
        from hwrjax.core import train_state

        return train_state.create_train_state(self.model, self.tx, self.keys.init)

    def new_step(self):
        from hwrjax.core import steps as steps_lib

        return lambda s, bt, k: steps_lib.train_step(s, bt, k, loss_fn=self.loss_fn)

    def compile(self, **jit_kwargs):
        return jax.jit(self.new_step(), **jit_kwargs).lower(self.new_state(), self.batch, self.keys.dropout).compile()

    def bind(self, compiled):
        """compiled(state, batch, key) as the state -> (state, metrics) function time_alternating times."""
        return lambda s: compiled(s, self.batch, self.keys.dropout)
