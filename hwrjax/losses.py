"""Classification losses by name, built on optax. Each maps (logits [B, C], labels [B]) to
per-example losses [B]."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from hwrjax.errors import ConfigError

LossFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: float = 0.0) -> jnp.ndarray:
    """Softmax cross-entropy against (optionally smoothed) one-hot labels."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def mean_squared_error(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """Mean squared error of the logits against one-hot targets (square-loss classification)."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    return jnp.mean(jnp.square(logits - targets), axis=-1)


def multiclass_hinge(logits: jnp.ndarray, labels: jnp.ndarray, margin: float = 1.0) -> jnp.ndarray:
    """Crammer-Singer hinge: max over wrong classes of (margin + wrong score - true score), at least 0."""
    if margin == 1.0:
        return optax.losses.multiclass_hinge_loss(logits, labels)
    true = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    wrong = logits + margin * (1.0 - jax.nn.one_hot(labels, logits.shape[-1]))
    return jnp.maximum(jnp.max(wrong, axis=-1) - true[:, 0], 0.0)


def huber(logits: jnp.ndarray, labels: jnp.ndarray, delta: float = 1.0) -> jnp.ndarray:
    """Huber loss of the logits against one-hot targets, averaged over classes."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    return jnp.mean(optax.huber_loss(logits, targets, delta=delta), axis=-1)


LOSSES = ("cross_entropy", "mse", "hinge", "huber")


def get_loss(config: Any) -> LossFn:
    """Returns the per-example loss named by `config.name` with its options bound."""
    name = config.name
    if name == "cross_entropy":
        if not 0.0 <= config.label_smoothing < 1.0:
            raise ConfigError(f"config.loss.label_smoothing must be in [0, 1), got {config.label_smoothing}")
        return functools.partial(cross_entropy, label_smoothing=float(config.label_smoothing))
    if name == "mse":
        return mean_squared_error
    if name == "hinge":
        if config.hinge_margin <= 0:
            raise ConfigError(f"config.loss.hinge_margin must be > 0, got {config.hinge_margin}")
        return functools.partial(multiclass_hinge, margin=float(config.hinge_margin))
    if name == "huber":
        if config.huber_delta <= 0:
            raise ConfigError(f"config.loss.huber_delta must be > 0, got {config.huber_delta}")
        return functools.partial(huber, delta=float(config.huber_delta))
    raise ConfigError(f"unknown loss {name!r}; set config.loss.name to one of {list(LOSSES)}")
