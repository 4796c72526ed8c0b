"""Losses: values on hand-computed cases, and a few steps of each lower it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from hwrjax import losses
from hwrjax.errors import ConfigError

LOGITS = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
LABELS = jnp.array([0, 1])


def _cfg(name, **kw):
    base = dict(name=name, label_smoothing=0.0, hinge_margin=1.0, huber_delta=1.0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_cross_entropy_matches_log_softmax():
    expected = -np.array([jax.nn.log_softmax(LOGITS[0])[0], jax.nn.log_softmax(LOGITS[1])[1]])
    np.testing.assert_allclose(losses.cross_entropy(LOGITS, LABELS), expected, rtol=1e-6)


def test_label_smoothing_spreads_the_target():
    # Smoothing 0.3 over 3 classes: target [0.8, 0.1, 0.1] for label 0.
    logp = jax.nn.log_softmax(LOGITS[0])
    expected = -(0.8 * logp[0] + 0.1 * logp[1] + 0.1 * logp[2])
    got = losses.get_loss(_cfg("cross_entropy", label_smoothing=0.3))(LOGITS[:1], LABELS[:1])
    np.testing.assert_allclose(got, [expected], rtol=1e-6)


def test_mse_on_one_hot_targets():
    # Row 0: ((2-1)^2 + 0 + 1) / 3; row 1: (0.25 + 0.25 + 9) / 3.
    np.testing.assert_allclose(losses.mean_squared_error(LOGITS, LABELS), [2 / 3, 9.5 / 3], rtol=1e-6)


def test_multiclass_hinge():
    # Row 0: max(1 + 0 - 2, 1 - 1 - 2, 0) = 0; row 1: 1 + 3 - 0.5 = 3.5.
    np.testing.assert_allclose(losses.multiclass_hinge(LOGITS, LABELS), [0.0, 3.5], rtol=1e-6)
    # Margin 2: row 0: 2 + 0 - 2 = 0; row 1: 2 + 3 - 0.5 = 4.5.
    np.testing.assert_allclose(losses.multiclass_hinge(LOGITS, LABELS, margin=2.0), [0.0, 4.5], rtol=1e-6)


def test_huber():
    # delta 1: |d|<=1 -> d^2/2, else |d| - 1/2. Row 0: d = [1, 0, -1] -> (0.5 + 0 + 0.5)/3.
    # Row 1: d = [0.5, -0.5, 3] -> (0.125 + 0.125 + 2.5)/3.
    np.testing.assert_allclose(losses.huber(LOGITS, LABELS), [1 / 3, 2.75 / 3], rtol=1e-6)


@pytest.mark.parametrize("name", losses.LOSSES)
def test_a_few_steps_lower_each_loss(name):
    loss_fn = losses.get_loss(_cfg(name, label_smoothing=0.1))
    x = jax.random.normal(jax.random.key(0), (64, 5))
    y = jnp.argmax(x @ jax.random.normal(jax.random.key(1), (5, 4)), -1)
    w = jnp.zeros((5, 4))
    objective = lambda w: jnp.mean(loss_fn(x @ w, y))
    tx = optax.sgd(0.1)
    opt = tx.init(w)
    start = objective(w)
    for _ in range(20):
        g = jax.grad(objective)(w)
        u, opt = tx.update(g, opt)
        w = optax.apply_updates(w, u)
    assert objective(w) < start * 0.9


def test_bad_loss_config():
    with pytest.raises(ConfigError, match="unknown loss 'focal'.*config.loss.name"):
        losses.get_loss(_cfg("focal"))
    with pytest.raises(ConfigError, match="label_smoothing"):
        losses.get_loss(_cfg("cross_entropy", label_smoothing=1.5))
    with pytest.raises(ConfigError, match="huber_delta"):
        losses.get_loss(_cfg("huber", huber_delta=0.0))
