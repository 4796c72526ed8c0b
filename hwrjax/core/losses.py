"""Classification losses by name, built on optax. Each maps (logits [B, C], labels [B]) to
per-example losses [B]."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from hwrjax.core.errors import ConfigError

LossFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: float = 0.0) -> jnp.ndarray:
    """Softmax cross-entropy against (optionally smoothed) one-hot labels."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def binary_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: float = 0.0) -> jnp.ndarray:
    """One sigmoid per class against the (optionally smoothed) one-hot target, summed over classes."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    # The sum (not the mean) over classes is the negative log-likelihood of the C independent
    # yes/no outputs, on the same scale as cross-entropy, so the recipes' learning rates carry over.
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)


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


LOSSES = ("cross_entropy", "bce", "mse", "hinge", "huber")
# Losses whose model scores each class on its own (a sigmoid per class); all others are read
# through a softmax.
SIGMOID_LOSSES = ("bce",)


def probabilities(logits: jnp.ndarray, loss: str = "cross_entropy") -> jnp.ndarray:
    """Class probabilities [..., C] (float32, rows summing to 1) of logits from a model trained with `loss`.

    A softmax, except for losses that score each class with its own sigmoid (bce), whose
    sigmoid outputs need not sum to 1 and are divided by their sum for reading. The one place
    predictions, TTA, ensembles, export and the recognizer turn logits into probabilities.
    """
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; set config.loss.name to one of {list(LOSSES)}")
    logits = jnp.asarray(logits).astype(jnp.float32)
    if loss in SIGMOID_LOSSES:
        # sigmoid(z) / sum sigmoid(z) in log space: exp(log_sigmoid(z) - logsumexp(log_sigmoid(z))),
        # so very negative logits of every class still give a finite distribution.
        return jax.nn.softmax(jax.nn.log_sigmoid(logits), axis=-1)
    return jax.nn.softmax(logits, axis=-1)


def log_probabilities(logits: jnp.ndarray, loss: str = "cross_entropy") -> jnp.ndarray:
    """The log of `probabilities(logits, loss)`, computed stably."""
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; set config.loss.name to one of {list(LOSSES)}")
    logits = jnp.asarray(logits).astype(jnp.float32)
    if loss in SIGMOID_LOSSES:
        return jax.nn.log_softmax(jax.nn.log_sigmoid(logits), axis=-1)
    return jax.nn.log_softmax(logits, axis=-1)


def describe_probabilities(loss: str = "cross_entropy") -> str:
    """How `probabilities` reads a model trained with `loss`, for reports."""
    if loss in SIGMOID_LOSSES:
        return "sigmoid per class, normalized to sum to 1"
    return "softmax"


def get_loss(config: Any) -> LossFn:
    """Returns the per-example loss named by `config.name` with its options bound."""
    name = config.name
    if name in ("cross_entropy", "bce"):
        if not 0.0 <= config.label_smoothing < 1.0:
            raise ConfigError(f"config.loss.label_smoothing must be in [0, 1), got {config.label_smoothing}")
        fn = cross_entropy if name == "cross_entropy" else binary_cross_entropy
        return functools.partial(fn, label_smoothing=float(config.label_smoothing))
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
