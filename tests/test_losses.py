"""Losses: values on hand-computed cases, and a few steps of each lower it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from hwrjax.core import losses
from hwrjax.core.errors import ConfigError

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


def _log_sigmoid(z):
    return -np.log1p(np.exp(-z))


def test_binary_cross_entropy_by_hand():
    # Row 0, label 0: -log s(2) - log(1 - s(0)) - log(1 - s(-1)), with 1 - s(z) = s(-z).
    row0 = -(_log_sigmoid(2.0) + _log_sigmoid(-0.0) + _log_sigmoid(1.0))
    row1 = -(_log_sigmoid(-0.5) + _log_sigmoid(0.5) + _log_sigmoid(-3.0))
    np.testing.assert_allclose(losses.binary_cross_entropy(LOGITS, LABELS), [row0, row1], rtol=1e-6)
    # Its gradient with respect to each logit is sigmoid(z) - target.
    sig = 1 / (1 + np.exp(-np.asarray(LOGITS)))
    want = sig - np.eye(3)[np.asarray(LABELS)]
    got = jax.grad(lambda z: jnp.sum(losses.binary_cross_entropy(z, LABELS)))(LOGITS)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_binary_cross_entropy_label_smoothing():
    # Smoothing 0.3 over 3 classes: targets [0.8, 0.1, 0.1] for label 0; each class pays
    # -(t log s(z) + (1 - t) log s(-z)), and the gradient is sigmoid(z) - t.
    z, t = np.asarray(LOGITS[0]), np.array([0.8, 0.1, 0.1])
    want = -np.sum(t * _log_sigmoid(z) + (1 - t) * _log_sigmoid(-z))
    fn = losses.get_loss(_cfg("bce", label_smoothing=0.3))
    np.testing.assert_allclose(fn(LOGITS[:1], LABELS[:1]), [want], rtol=1e-6)
    got = jax.grad(lambda z: jnp.sum(fn(z, LABELS[:1])))(LOGITS[:1])
    np.testing.assert_allclose(got[0], 1 / (1 + np.exp(-z)) - t, rtol=1e-6, atol=1e-7)


def test_probabilities_follow_the_loss():
    soft = losses.probabilities(LOGITS, "cross_entropy")
    np.testing.assert_allclose(soft, jax.nn.softmax(LOGITS, -1), rtol=1e-6)
    for name in ("mse", "hinge", "huber"):
        np.testing.assert_allclose(losses.probabilities(LOGITS, name), soft, rtol=1e-6)
    # bce: each class's own sigmoid, divided by the row's sum for reading.
    sig = 1 / (1 + np.exp(-np.asarray(LOGITS)))
    got = losses.probabilities(LOGITS, "bce")
    np.testing.assert_allclose(got, sig / sig.sum(-1, keepdims=True), rtol=1e-6)
    assert got.dtype == jnp.float32
    # Every class far below zero: the sigmoids underflow, their normalized ratio does not.
    far = losses.probabilities(jnp.array([[-200.0, -201.0, -210.0]]), "bce")
    np.testing.assert_allclose(far.sum(), 1.0, rtol=1e-6)
    assert far[0, 0] > far[0, 1] > far[0, 2] > 0
    assert "normalized" in losses.describe_probabilities("bce") and losses.describe_probabilities("mse") == "softmax"
    with pytest.raises(ConfigError, match="unknown loss 'focal'.*one of"):
        losses.probabilities(LOGITS, "focal")


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
    with pytest.raises(ConfigError, match="label_smoothing"):
        losses.get_loss(_cfg("bce", label_smoothing=-0.1))
    with pytest.raises(ConfigError, match="huber_delta"):
        losses.get_loss(_cfg("huber", huber_delta=0.0))
