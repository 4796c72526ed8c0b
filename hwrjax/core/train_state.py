"""The train state: params, optimizer state, BatchNorm statistics and the moving average of the weights.

`TrainState` is flax's TrainState plus `batch_stats` and `ema`; `init_ema` / `update_ema` keep an
exponential moving average of the weights beside them, `averaged` reads it.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state as flax_train_state


class TrainState(flax_train_state.TrainState):
    """flax TrainState plus BatchNorm statistics (an empty dict for models without them) and
    the moving average of the weights (`ema`: {} when none is kept, see `init_ema`)."""

    batch_stats: Any = flax.struct.field(default_factory=dict)
    ema: Any = flax.struct.field(default_factory=dict)


def create_train_state(model: Any, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape: tuple[int, ...] = (1, 28, 28, 1)) -> TrainState:
    """Initializes `model` on zeros of `input_shape` and wraps it with optimizer `tx`."""
    variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(input_shape, jnp.float32), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}))


def _weights(state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def init_ema(state: TrainState) -> TrainState:
    """Starts an exponential moving average of the params and BatchNorm statistics at their current values.

    The average gets its own copies of the arrays, so a step that donates the state's buffers
    does not find one buffer in two places.
    """
    return state.replace(ema=jax.tree.map(jnp.copy, _weights(state)))


def ema_decay_at(decay: float, step: jnp.ndarray) -> jnp.ndarray:
    """The decay applied after optimizer step `step` (1 for the first): min(decay, (1+t)/(10+t)).

    The ramp keeps the first updates from being swamped by the initial weights, so a short run
    (or a low step count) averages its recent weights instead of its random start.
    """
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def update_ema(state: TrainState, decay: float) -> TrainState:
    """Moves `state.ema` towards the current params and BatchNorm statistics by 1 - ema_decay_at(decay, step).

    Call it after each optimizer step on a state made by `init_ema`. The average never feeds back
    into training: the params follow exactly the trajectory they follow without it.
    """
    d = ema_decay_at(decay, state.step)
    return state.replace(ema=jax.tree.map(lambda e, p: e + (1.0 - d).astype(e.dtype) * (p - e), state.ema,
                                          _weights(state)))


def averaged(state: TrainState) -> TrainState:
    """`state` with its moving average in place of params and BatchNorm statistics (unchanged
    when it keeps none): the weights a run with config.ema_decay > 0 validates, selects and delivers."""
    if not state.ema:
        return state
    return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])


def with_delivered_batch_stats(state: TrainState, batch_stats: Any) -> TrainState:
    """`state` with `batch_stats` where a checkpoint of it is read for inference: in its moving
    average when it keeps one (see `averaged`), else in place of its own statistics."""
    if state.ema:
        return state.replace(ema=dict(state.ema, batch_stats=batch_stats))
    return state.replace(batch_stats=batch_stats)
