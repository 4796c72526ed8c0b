"""Optimizers, regularizers and learning-rate schedules by name, built from optax pieces."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from hwrjax.core.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "piecewise", "exponential", "cosine", "onecycle")
WEIGHT_DECAY_MODES = ("decoupled", "l2")


def decay_mask(params: Any) -> Any:
    """True for weight matrices and conv kernels; False for biases and normalization scales."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def add_l1_subgradient(strength: float) -> optax.GradientTransformation:
    """Adds strength * sign(param) to each update: the gradient of an L1 penalty."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("L1 regularization needs params passed to update()")
        updates = jax.tree.map(lambda g, p: g + strength * jnp.sign(p).astype(g.dtype), updates, params)
        return updates, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def make_schedule(config: Any, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
    """Returns the learning-rate schedule of `config.schedule` for `config.optimizer.learning_rate`."""
    base = float(config.optimizer.learning_rate)
    if base <= 0:
        raise ConfigError(f"config.optimizer.learning_rate must be > 0, got {base}")
    s = config.schedule
    total = steps_per_epoch * num_epochs
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    if s.warmup_epochs < 0 or warmup >= total:
        raise ConfigError(f"config.schedule.warmup_epochs must be >= 0 and shorter than training, got {s.warmup_epochs}")
    if s.name == "constant":
        main = optax.constant_schedule(base)
    elif s.name == "piecewise":
        if not 0 < s.decay_factor <= 1:
            raise ConfigError(f"config.schedule.decay_factor must be in (0, 1], got {s.decay_factor}")
        boundaries = {int(round(e * steps_per_epoch)) - warmup: float(s.decay_factor) for e in s.boundaries_epochs}
        if any(b <= 0 for b in boundaries):
            raise ConfigError("config.schedule.boundaries_epochs must lie after the warmup")
        main = optax.piecewise_constant_schedule(base, boundaries)
    elif s.name == "exponential":
        if not 0 < s.decay_factor <= 1:
            raise ConfigError(f"config.schedule.decay_factor must be in (0, 1], got {s.decay_factor}")
        # decay_factor is applied once per epoch, smoothly.
        main = optax.exponential_decay(base, transition_steps=steps_per_epoch, decay_rate=float(s.decay_factor))
    elif s.name == "cosine":
        main = optax.cosine_decay_schedule(base, max(1, total - warmup), alpha=float(s.final_lr_fraction))
    elif s.name == "onecycle":
        # One-cycle has its own warm-up phase (pct_start); warmup_epochs is ignored for it.
        if not 0 < s.onecycle_pct_start < 1:
            raise ConfigError(f"config.schedule.onecycle_pct_start must be in (0, 1), got {s.onecycle_pct_start}")
        return optax.cosine_onecycle_schedule(total, base, pct_start=float(s.onecycle_pct_start))
    else:
        raise ConfigError(f"unknown schedule {s.name!r}; set config.schedule.name to one of {list(SCHEDULES)}")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def make_optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Builds clip -> (coupled L2, L1) -> base optimizer -> (decoupled decay) -> learning rate."""
    o = config.optimizer
    if o.name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {o.name!r}; set config.optimizer.name to one of {list(OPTIMIZERS)}")
    mode = "decoupled" if o.name == "adamw" else o.weight_decay_mode
    if mode not in WEIGHT_DECAY_MODES:
        raise ConfigError(f"unknown weight_decay_mode {mode!r}; set config.optimizer.weight_decay_mode "
                          f"to one of {list(WEIGHT_DECAY_MODES)}")
    for field in ("weight_decay", "l1", "grad_clip_norm", "momentum"):
        if o[field] < 0:
            raise ConfigError(f"config.optimizer.{field} must be >= 0, got {o[field]}")
    chain = []
    if o.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(float(o.grad_clip_norm)))
    if o.weight_decay > 0 and mode == "l2":
        # Same gradient as adding weight_decay/2 * ||w||^2 to the loss.
        chain.append(optax.add_decayed_weights(float(o.weight_decay), mask=decay_mask))
    if o.l1 > 0:
        chain.append(optax.masked(add_l1_subgradient(float(o.l1)), decay_mask))
    if o.name == "sgd":
        if o.momentum > 0:
            chain.append(optax.trace(decay=float(o.momentum), nesterov=bool(o.nesterov)))
    elif o.name in ("adam", "adamw"):
        chain.append(optax.scale_by_adam(b1=float(o.b1), b2=float(o.b2), eps=float(o.eps)))
    elif o.name == "rmsprop":
        chain.append(optax.scale_by_rms(decay=float(o.rms_decay), eps=float(o.eps)))
        if o.momentum > 0:
            chain.append(optax.trace(decay=float(o.momentum), nesterov=bool(o.nesterov)))
    if o.weight_decay > 0 and mode == "decoupled":
        chain.append(optax.add_decayed_weights(float(o.weight_decay), mask=decay_mask))
    chain.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*chain)
