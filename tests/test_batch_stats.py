"""BatchNorm statistics recomputed on clean training images: the arithmetic, any momentum, and
what a run with config.batch_stats_examples > 0 validates, checkpoints and reports."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hwrjax
from configs import resnet as resnet_config
from hwrjax.apps import train
from hwrjax.core import batch_stats
from hwrjax.core.errors import ConfigError
from hwrjax.training import checkpoint, config_checks, data
from test_ema import _evaluate, _lines
from test_ema import _smoke as _ema_smoke


class DenseBN(nn.Module):
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dense(3)(x.reshape(x.shape[0], -1))
        h = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, name="bn")(h)
        return nn.Dense(2)(h)


def _images(n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, 4, 4, 1)).astype(np.float32))


@pytest.mark.parametrize("momentum", [0.5, 0.9, 0.99])
def test_statistics_are_the_mean_of_equal_batches_whatever_the_momentum(momentum):
    model = DenseBN(momentum)
    images = _images(35)
    variables = model.init(jax.random.key(0), images[:2])
    # Stored statistics far from the truth: the result must not depend on them.
    stale = jax.tree.map(lambda s: s + 7.0, variables["batch_stats"])
    got = batch_stats.recompute_batch_stats(model.apply, variables["params"], stale, images, batch_size=10)
    # Three full batches of 10 (the last 5 images are left out); statistics per batch, then averaged.
    p = variables["params"]["Dense_0"]
    h = np.asarray(images[:30]).reshape(30, -1) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
    batches = h.reshape(3, 10, 3)
    np.testing.assert_allclose(got["bn"]["mean"], batches.mean(axis=1).mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["bn"]["var"], batches.var(axis=1).mean(axis=0), rtol=1e-4, atol=1e-5)


def test_a_trained_model_evaluated_with_recomputed_statistics():
    model = DenseBN()
    images = _images(40, seed=1)
    labels = (images.reshape(40, -1).mean(-1) > 0.5).astype(jnp.int32)
    state = hwrjax.create_train_state(model, optax.adam(0.05), jax.random.key(0), (1, 4, 4, 1))
    for step in range(30):
        state, _ = hwrjax.train_step(state, {"image": images, "label": labels}, jax.random.key(step))
    fresh = batch_stats.recompute_batch_stats(state.apply_fn, state.params, state.batch_stats, images, 40)
    # One batch of all 40: the statistics are exactly that batch's, so inference mode on it
    # gives the logits of train mode.
    eval_logits = model.apply({"params": state.params, "batch_stats": fresh}, images, train=False)
    train_logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images, train=True,
                                  mutable=["batch_stats"])
    np.testing.assert_allclose(eval_logits, train_logits, rtol=1e-4, atol=1e-4)
    assert not np.allclose(fresh["bn"]["mean"], state.batch_stats["bn"]["mean"])


def test_models_without_batchnorm_and_bad_sizes():
    mlp = hwrjax.MLP(hidden_sizes=(4,))
    params = mlp.init(jax.random.key(0), _images(2))["params"]
    assert batch_stats.recompute_batch_stats(mlp.apply, params, {}, _images(5), 2) == {}
    model = DenseBN()
    variables = model.init(jax.random.key(0), _images(2))
    with pytest.raises(ConfigError, match="at least one batch of 10"):
        batch_stats.recompute_batch_stats(model.apply, variables["params"], variables["batch_stats"], _images(5), 10)
    frozen = DenseBN(momentum=1.0)
    with pytest.raises(ConfigError, match="momentum 1"):
        batch_stats.recompute_batch_stats(frozen.apply, variables["params"], variables["batch_stats"], _images(5), 5)


@pytest.mark.parametrize("bad,message", [(-1, "whole number >= 0"),
                                         (100, "less than one batch")])
def test_config_is_checked_before_training(bad, message):
    c = resnet_config.get_config("smoke")
    c.batch_stats_examples = bad
    with pytest.raises(ConfigError, match=message):
        config_checks.validate_config(c, 1)


def _smoke(examples: int):
    c = _ema_smoke(0.999)  # the recipe's own moving average
    c.batch_stats_examples = examples
    return c


def test_a_run_validates_selects_and_delivers_recomputed_statistics(tmp_path, require_mnist):
    plain, fresh = str(tmp_path / "plain"), str(tmp_path / "fresh")
    train.train_and_evaluate(_smoke(0), plain)
    config = _smoke(512)
    result = train.train_and_evaluate(config, fresh)

    # Training itself is untouched: the same losses bit for bit, the same raw state to resume from.
    assert _lines(plain, "train_loss") == _lines(fresh, "train_loss")
    a, _ = checkpoint.load_variables(plain, "latest")
    b, _ = checkpoint.load_variables(fresh, "latest")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert _lines(plain, "val_loss") != _lines(fresh, "val_loss")

    # The best checkpoint holds the averaged weights' statistics on the first 512 training images
    # (the recipe keeps a moving average), and its validation accuracy is the one selected on.
    best, best_step = checkpoint.load_variables(fresh, "best")
    splits = data.load_splits(config)
    model = hwrjax.create_model(config.model, 10)
    expected = batch_stats.recompute_batch_stats(model.apply, best["params"], best["batch_stats"],
                                                 jnp.asarray(splits.train.images[:512]), config.eval_batch_size)
    for x, y in zip(jax.tree.leaves(best["batch_stats"]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert _evaluate(best, config, splits.validation)["accuracy"] == pytest.approx(
        max(_lines(fresh, "val_accuracy")), abs=1e-9)
    assert result["checkpoint_step"] == best_step
    assert result["accuracy"] == pytest.approx(_evaluate(best, config, splits.test)["accuracy"], abs=1e-9)


_SHARDED = """
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from hwrjax import models
from hwrjax.core import batch_stats
model = models.ResNet(stage_sizes=(1,), stage_widths=(8,), stem_width=8)
images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8))
variables = model.init(jax.random.key(0), images[:1].astype(jnp.float32))
mesh = Mesh(np.array(jax.devices()), ("data",))
whole = batch_stats.recompute_batch_stats(model.apply, variables["params"], variables["batch_stats"], images, 32)
spread = batch_stats.recompute_batch_stats(model.apply, variables["params"], variables["batch_stats"], images, 32,
                                           batch_sharding=NamedSharding(mesh, P("data")))
diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(spread)))
scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(whole))
print(json.dumps({"devices": jax.device_count(), "diff": diff, "scale": scale}))
"""


def test_batches_spread_over_devices_give_the_whole_batch_statistics():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Each device holds 4 of a batch's 32 images; the statistics must still be the batch's.
    assert result["devices"] == 8 and result["scale"] > 0.1
    assert result["diff"] <= 1e-5 * result["scale"]
