"""Optimizers, regularizers and schedules built from the config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from hwrjax.core import optim
from hwrjax.core.errors import ConfigError


def _config(**overrides):
    c = default.get_config()
    for path, value in overrides.items():
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _problem():
    x = jax.random.normal(jax.random.key(0), (128, 6))
    y = jnp.argmax(x @ jax.random.normal(jax.random.key(1), (6, 3)), -1)
    params = {"dense": {"kernel": jnp.zeros((6, 3)), "bias": jnp.zeros((3,))}}
    loss = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ p["dense"]["kernel"]
                                                                               + p["dense"]["bias"], y))
    return params, loss


def _run(tx, params, loss, steps=30):
    state = tx.init(params)
    for _ in range(steps):
        g = jax.grad(loss)(params)
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
    return params


@pytest.mark.parametrize("name,lr", [("sgd", 0.5), ("adam", 0.05), ("adamw", 0.05), ("rmsprop", 0.01)])
@pytest.mark.parametrize("mode", ["l2", "decoupled"])
def test_each_optimizer_lowers_the_loss(name, lr, mode):
    c = _config(**{"optimizer.name": name, "optimizer.learning_rate": lr, "optimizer.weight_decay_mode": mode,
                   "optimizer.l1": 1e-4, "optimizer.grad_clip_norm": 1.0, "schedule.name": "constant",
                   "schedule.warmup_epochs": 0.0})
    tx = optim.make_optimizer(c, optim.make_schedule(c, 10, 3))
    params, loss = _problem()
    assert loss(_run(tx, params, loss)) < loss(params) * 0.8


def test_weight_decay_leaves_biases_and_scales_alone():
    c = _config(**{"optimizer.name": "sgd", "optimizer.momentum": 0.0, "optimizer.weight_decay": 0.1,
                   "schedule.name": "constant", "schedule.warmup_epochs": 0.0, "optimizer.learning_rate": 1.0})
    tx = optim.make_optimizer(c, optim.make_schedule(c, 10, 1))
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,)), "bn": {"scale": jnp.ones((2,))}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], 0.0)
    np.testing.assert_array_equal(updates["bn"]["scale"], 0.0)


def test_coupled_l2_is_scaled_by_adam_but_decoupled_is_not():
    params = {"kernel": jnp.full((1, 1), 2.0)}
    zeros = {"kernel": jnp.zeros((1, 1))}
    out = {}
    for mode in ("l2", "decoupled"):
        c = _config(**{"optimizer.name": "adam", "optimizer.weight_decay": 0.01, "optimizer.weight_decay_mode": mode,
                       "optimizer.learning_rate": 0.1, "schedule.name": "constant", "schedule.warmup_epochs": 0.0})
        tx = optim.make_optimizer(c, optim.make_schedule(c, 10, 1))
        out[mode] = float(tx.update(zeros, tx.init(params), params)[0]["kernel"][0, 0])
    # Decoupled: -lr * wd * w = -0.002. Coupled: Adam normalizes the decay gradient to ~ -lr.
    assert out["decoupled"] == pytest.approx(-0.002, rel=1e-5)
    assert out["l2"] == pytest.approx(-0.1, rel=1e-3)


def test_l1_adds_the_sign_of_the_weights():
    c = _config(**{"optimizer.name": "sgd", "optimizer.momentum": 0.0, "optimizer.weight_decay": 0.0,
                   "optimizer.l1": 0.5, "optimizer.learning_rate": 1.0, "schedule.name": "constant",
                   "schedule.warmup_epochs": 0.0})
    tx = optim.make_optimizer(c, optim.make_schedule(c, 10, 1))
    params = {"kernel": jnp.array([[2.0, -3.0]]), "bias": jnp.array([1.0])}
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(u["kernel"], [[-0.5, 0.5]])
    np.testing.assert_array_equal(u["bias"], [0.0])


def test_gradient_clipping_bounds_the_update():
    c = _config(**{"optimizer.name": "sgd", "optimizer.momentum": 0.0, "optimizer.weight_decay": 0.0,
                   "optimizer.grad_clip_norm": 1.0, "optimizer.learning_rate": 1.0, "schedule.name": "constant",
                   "schedule.warmup_epochs": 0.0})
    tx = optim.make_optimizer(c, optim.make_schedule(c, 10, 1))
    params = {"kernel": jnp.zeros((1, 2))}
    u, _ = tx.update({"kernel": jnp.array([[30.0, 40.0]])}, tx.init(params), params)
    np.testing.assert_allclose(u["kernel"], [[-0.6, -0.8]], rtol=1e-6)


def test_schedules():
    spe, epochs = 10, 10
    cos = optim.make_schedule(_config(**{"schedule.name": "cosine", "schedule.warmup_epochs": 1.0}), spe, epochs)
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.05)
    assert float(cos(10)) == pytest.approx(0.1) and float(cos(100)) == pytest.approx(0.0, abs=1e-7)
    pw = optim.make_schedule(_config(**{"schedule.name": "piecewise", "schedule.warmup_epochs": 0.0,
                                        "schedule.boundaries_epochs": (5.0, 8.0)}), spe, epochs)
    assert [float(pw(s)) for s in (49, 50, 79, 80)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    ex = optim.make_schedule(_config(**{"schedule.name": "exponential", "schedule.warmup_epochs": 0.0,
                                        "schedule.decay_factor": 0.5}), spe, epochs)
    assert float(ex(20)) == pytest.approx(0.025)
    const = optim.make_schedule(_config(**{"schedule.name": "constant", "schedule.warmup_epochs": 0.0}), spe, epochs)
    assert float(const(73)) == pytest.approx(0.1)
    one = optim.make_schedule(_config(**{"schedule.name": "onecycle"}), spe, epochs)
    values = np.array([float(one(s)) for s in range(100)])
    assert values.argmax() == 30 and values.max() == pytest.approx(0.1, rel=1e-3) and values[-1] < 0.01


@pytest.mark.parametrize("overrides,pattern", [
    ({"optimizer.name": "lion"}, "unknown optimizer 'lion'"),
    ({"schedule.name": "linear"}, "unknown schedule 'linear'"),
    ({"optimizer.learning_rate": 0.0}, "learning_rate must be > 0"),
    ({"optimizer.weight_decay": -1.0}, "weight_decay must be >= 0"),
    ({"optimizer.weight_decay_mode": "both"}, "unknown weight_decay_mode"),
    ({"schedule.warmup_epochs": 50.0}, "warmup_epochs"),
])
def test_bad_optimizer_config(overrides, pattern):
    c = _config(**overrides)
    with pytest.raises(ConfigError, match=pattern):
        optim.make_optimizer(c, optim.make_schedule(c, 10, 10))
