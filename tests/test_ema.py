"""The moving average of the weights: its arithmetic, the library API, and what a run with
config.ema_decay > 0 validates, checkpoints, resumes and delivers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hwrjax
from configs import resnet as resnet_config
from hwrjax.apps import train
from hwrjax.core import losses, train_state
from hwrjax.core.errors import ConfigError
from hwrjax.inference import loader
from hwrjax.training import checkpoint, config_checks, data, loop, parallel
from test_train import TinyNet, _toy_batch


def test_update_ema_follows_the_ramped_recurrence():
    rng = np.random.default_rng(0)
    state = train_state.TrainState.create(apply_fn=None, params={"w": jnp.zeros(3)}, tx=optax.sgd(0.1),
                                          batch_stats={"mean": jnp.ones(2)})
    state = train_state.init_ema(state)
    expected_w, expected_mean = np.zeros(3), np.ones(2)
    decay = 0.95
    for t in range(1, 80):
        w, mean = rng.normal(size=3).astype(np.float32), rng.normal(size=2).astype(np.float32)
        state = state.replace(step=t, params={"w": jnp.asarray(w)}, batch_stats={"mean": jnp.asarray(mean)})
        state = jax.jit(train_state.update_ema, static_argnums=1)(state, decay)
        d = min(decay, (1 + t) / (10 + t))  # the ramp reaches the cap 0.95 at t = 170: checked below
        expected_w = d * expected_w + (1 - d) * w
        expected_mean = d * expected_mean + (1 - d) * mean
        np.testing.assert_allclose(np.asarray(state.ema["params"]["w"]), expected_w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.ema["batch_stats"]["mean"]), expected_mean, rtol=1e-5, atol=1e-6)
    # The decay ramps from 2/11 at the first step and is capped at `decay`.
    assert float(train_state.ema_decay_at(0.999, 1)) == pytest.approx(2 / 11)
    assert float(train_state.ema_decay_at(0.95, 10_000)) == pytest.approx(0.95)
    assert float(train_state.ema_decay_at(0.999, 100)) == pytest.approx(101 / 110)


def test_public_api_keeps_an_average_of_a_user_model():
    state = hwrjax.init_ema(hwrjax.create_train_state(TinyNet(), optax.adam(1e-2), jax.random.key(0)))
    assert hwrjax.averaged(hwrjax.create_train_state(TinyNet(), optax.sgd(0.1), jax.random.key(0))).ema == {}
    batch = _toy_batch()
    update = jax.jit(hwrjax.update_ema, static_argnums=1)
    for step in range(40):
        state, _ = hwrjax.train_step(state, batch, jax.random.fold_in(jax.random.key(1), step))
        state = update(state, 0.9)
    avg = hwrjax.averaged(state)
    # The average lags the weights but has learned the task too, BatchNorm statistics included.
    assert not np.allclose(jax.tree.leaves(avg.params)[0], jax.tree.leaves(state.params)[0])
    assert jax.tree.structure(avg.batch_stats) == jax.tree.structure(state.batch_stats)
    result = hwrjax.summarize_eval(jax.device_get(hwrjax.eval_step(avg, batch)))
    assert result["accuracy"] > 0.9
    # Inference helpers given the state use the average, as they would from its checkpoint.
    loaded = loader.as_loaded_model(state)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded.variables["params"]),
                                                    jax.tree.leaves(avg.params)))


def test_ema_decay_out_of_range_is_refused():
    c = resnet_config.get_config("smoke")
    for bad in (1.0, -0.1, 1.5):
        c.ema_decay = bad
        with pytest.raises(ConfigError, match="config.ema_decay must be in"):
            config_checks.validate_config(c, 1)


def _smoke(ema_decay: float):
    c = resnet_config.get_config("smoke")
    c.dataset.test_split = "test[:500]"
    c.report_plots = False
    c.ema_decay = ema_decay
    return c


def _lines(workdir: str, key: str) -> list:
    return [json.loads(line)[key] for line in open(os.path.join(workdir, "metrics.jsonl"))
            if f'"{key}"' in line]


def _evaluate(variables: dict, config, split) -> dict:
    mesh = parallel.make_mesh()
    model = hwrjax.create_model(config.model, 10)
    state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.0),
                                          batch_stats=variables["batch_stats"])
    return loop.make_evaluate(losses.get_loss(config.loss), mesh)(state, loop.EvalSet(split, 250, mesh))


def test_a_run_validates_selects_and_delivers_the_average(tmp_path, require_mnist):
    plain, averaged = str(tmp_path / "plain"), str(tmp_path / "ema")
    train.train_and_evaluate(_smoke(0.0), plain)
    config = _smoke(0.9)
    result = train.train_and_evaluate(config, averaged)

    # The average never feeds back into training: the same losses, bit for bit, and the same raw weights.
    assert _lines(plain, "train_loss") == _lines(averaged, "train_loss")
    raw, _ = checkpoint.load_variables(averaged, "latest", average=False)
    plain_vars, _ = checkpoint.load_variables(plain, "latest")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(plain_vars)))
    # What it validated on is the average, not the raw weights.
    assert _lines(plain, "val_accuracy") != _lines(averaged, "val_accuracy")

    # The checkpoint keeps both; inference code gets the average unless it asks otherwise.
    avg, step = checkpoint.load_variables(averaged, "latest")
    assert step == 64 and set(avg) == {"params", "batch_stats"}
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(avg), jax.tree.leaves(raw)))
    best, best_step = checkpoint.load_variables(averaged, "best")
    splits = data.load_splits(config)
    val = _evaluate(best, config, splits.validation)
    assert val["accuracy"] == pytest.approx(max(_lines(averaged, "val_accuracy")), abs=1e-9)
    # The reported test accuracy is that of the best averaged weights.
    assert result["checkpoint_step"] == best_step
    assert result["accuracy"] == pytest.approx(_evaluate(best, config, splits.test)["accuracy"], abs=1e-9)


def test_turning_the_average_on_part_way_resumes(tmp_path, require_mnist, caplog):
    workdir = str(tmp_path / "run")
    first = _smoke(0.0)
    first.num_epochs = 1
    train.train_and_evaluate(first, workdir)
    later = _smoke(0.9)
    later.num_epochs = 1
    with pytest.raises(ConfigError, match="ema_decay: 0.0 -> 0.9"):
        train.train_and_evaluate(later, workdir)
    later.num_epochs = 2
    with caplog.at_level("WARNING"):
        train.train_and_evaluate(later, workdir, allow_config_change=True)
    assert "keeps no moving average" in caplog.text
    raw, step = checkpoint.load_variables(workdir, "latest", average=False)
    avg, _ = checkpoint.load_variables(workdir, "latest")
    assert step == 64
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(avg), jax.tree.leaves(raw)))
    # And off again: the checkpoints with an average still resume.
    off = _smoke(0.0)
    off.num_epochs = 3
    train.train_and_evaluate(off, workdir, allow_config_change=True)
    assert checkpoint.load_variables(workdir, "latest")[1] == 96
