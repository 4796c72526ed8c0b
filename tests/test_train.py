"""Train/eval steps as a library, full-split evaluation, reproducibility and config checks."""

import hashlib
import importlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hwrjax
from configs import default
from configs import mlp as mlp_config
from configs import resnet as resnet_config
from hwrjax import models
from hwrjax.apps import train
from hwrjax.core import augment, losses, rng, train_state
from hwrjax.core import steps as steps_lib
from hwrjax.core.errors import ConfigError
from hwrjax.training import checkpoint, config_checks, data, loop, parallel


class TinyNet(nn.Module):
    """A model defined outside hwrjax, as another project would."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), strides=(2, 2))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x).reshape((x.shape[0], -1))
        x = nn.Dropout(0.1, deterministic=not train)(x)
        return nn.Dense(10)(x)


def _toy_batch(n=64, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, 28, 28, 1), np.float32)
    for i, y in enumerate(labels):  # each class lights a different band: learnable
        images[i, 2 * y:2 * y + 3, :, 0] = 1.0
    images += 0.1 * rng.random(images.shape, dtype=np.float32)
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels, jnp.int32)}


def test_public_api_trains_a_user_model_with_a_user_optimizer():
    state = hwrjax.create_train_state(TinyNet(), optax.adam(1e-2), jax.random.key(0))
    assert jax.tree.leaves(state.batch_stats)  # the BatchNorm of the user model has running statistics
    batch = _toy_batch()
    before = hwrjax.summarize_eval(jax.device_get(hwrjax.eval_step(state, batch)))
    stats0 = jax.tree.leaves(state.batch_stats)
    for step in range(30):
        state, metrics = hwrjax.train_step(state, batch, jax.random.fold_in(jax.random.key(1), step))
    after = hwrjax.summarize_eval(jax.device_get(hwrjax.eval_step(state, batch)))
    assert int(state.step) == 30
    assert set(metrics) == {"loss", "accuracy", "grad_norm"}
    assert after["loss"] < before["loss"] * 0.5 and after["accuracy"] > 0.9
    assert any(not np.allclose(a, b) for a, b in zip(stats0, jax.tree.leaves(state.batch_stats)))
    # Any per-example loss can be plugged in.
    _, m = hwrjax.train_step(state, batch, jax.random.key(2), loss_fn=losses.multiclass_hinge)
    assert np.isfinite(float(m["loss"]))


def test_train_step_is_pure():
    state = hwrjax.create_train_state(TinyNet(), optax.sgd(0.1), jax.random.key(0))
    batch, key = _toy_batch(), jax.random.key(5)
    a, ma = hwrjax.train_step(state, batch, key)
    b, mb = hwrjax.train_step(state, batch, key)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
    assert float(ma["loss"]) == float(mb["loss"])
    assert int(state.step) == 0  # the input state is untouched


@pytest.mark.parametrize("n,batch_size", [(1003, 100), (7, 4), (200, 200)])
def test_evaluation_counts_every_example_exactly_once(n, batch_size):
    rng = np.random.default_rng(n)
    split = data.Split(images=rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
                       labels=rng.integers(0, 10, n).astype(np.int32))
    model = models.MLP(hidden_sizes=(16,))
    state = train_state.create_train_state(model, optax.sgd(0.1), jax.random.key(0))
    mesh = parallel.make_mesh()
    result = loop.make_evaluate(losses.cross_entropy, mesh)(state, loop.EvalSet(split, batch_size, mesh))
    logits = model.apply({"params": state.params}, jnp.asarray(split.images, jnp.float32) / 255.0)
    expected_acc = float(np.mean(np.argmax(np.asarray(logits), -1) == split.labels))
    expected_loss = float(np.mean(losses.cross_entropy(logits, jnp.asarray(split.labels))))
    assert result["num_examples"] == n
    assert result["accuracy"] == pytest.approx(expected_acc, abs=1e-9)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_epoch_order_is_a_keyed_permutation():
    keys = hwrjax.RunKeys.from_seed(3)
    a = np.asarray(steps_lib.epoch_order(keys.order, 0, 1000))
    assert sorted(a) == list(range(1000))
    assert np.array_equal(a, np.asarray(steps_lib.epoch_order(keys.order, 0, 1000)))
    assert not np.array_equal(a, np.asarray(steps_lib.epoch_order(keys.order, 1, 1000)))
    other = hwrjax.RunKeys.from_seed(4)
    assert not np.array_equal(a, np.asarray(steps_lib.epoch_order(other.order, 0, 1000)))
    # Epoch e's order is the permutation keyed by fold_in(order key, e) (DESIGN.md, promise 2).
    for epoch in (0, 1, 7):
        want = jax.random.permutation(jax.random.fold_in(keys.order, epoch), 1000)
        np.testing.assert_array_equal(np.asarray(steps_lib.epoch_order(keys.order, epoch, 1000)), np.asarray(want))


def _param_digest(workdir):
    variables, _ = checkpoint.load_variables(workdir, "latest")
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(variables):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def test_same_seed_same_parameters_different_seed_different(tmp_path, require_mnist):
    c = resnet_config.get_config("smoke")
    c.num_epochs = 1
    c.dataset.limit_train = 640
    c.dataset.test_split = "test[:300]"
    c.report_plots = False
    digests = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        c.seed = seed
        result = train.train_and_evaluate(c, str(tmp_path / name))
        assert result["num_examples"] == 300
        digests.append(_param_digest(str(tmp_path / name)))
    print("parameter sha256:", digests)
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]


def test_training_learns_on_real_mnist(tmp_path, require_mnist):
    c = mlp_config.get_config("smoke")
    result = train.train_and_evaluate(c, str(tmp_path / "mlp"))
    # 2 epochs on 2,048 examples: far above chance (10%).
    assert result["accuracy"] > 0.75
    assert result["num_examples"] == 1000


def test_validate_config_errors():
    def check(pattern, **changes):
        c = resnet_config.get_config()
        for path, value in changes.items():
            node = c
            *parents, leaf = path.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        with pytest.raises(ConfigError, match=pattern):
            config_checks.validate_config(c, num_devices=2)

    check("batch_size must be a positive integer", batch_size=0)
    check("does not divide over 2 devices", batch_size=129)
    check("eval_batch_size=999 does not divide", eval_batch_size=999)
    check("num_epochs must be a positive integer", num_epochs=-1)
    check("unknown model", **{"model.name": "vgg"})
    check("unknown loss", **{"loss.name": "focal"})
    check("unknown optimizer", **{"optimizer.name": "lion"})
    check("unknown schedule", **{"schedule.name": "linear"})
    check("learning_rate must be > 0", **{"optimizer.learning_rate": -0.1})
    check("dropout_rate", **{"model.dropout_rate": 1.5})
    check("unknown config.parallel", parallel="fsdp")


def test_workdir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot be written"):
        config_checks.check_workdir(str(blocker / "run"))


def test_config_differences_lists_changed_fields():
    a = resnet_config.get_config()
    b = resnet_config.get_config()
    b.optimizer.learning_rate = 0.05
    b.model.stage_sizes = (1, 1, 1)
    diffs = config_checks.config_differences(config_checks.config_as_dict(a), config_checks.config_as_dict(b))
    assert diffs == ["model.stage_sizes: [2, 2, 2] -> [1, 1, 1]", "optimizer.learning_rate: 0.1 -> 0.05"]


RECIPES = sorted(p.stem for p in __import__("pathlib").Path(__file__).parent.parent.joinpath("configs").glob("*.py")
                 if p.stem not in ("__init__", "default"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_and_its_smoke_variant_builds(recipe):
    module = importlib.import_module(f"configs.{recipe}")
    assert {"resnet", "cnn", "mlp", "fast"} <= set(RECIPES)
    for variant in ("", "smoke"):
        c = module.get_config(variant)
        config_checks.validate_config(c, num_devices=1)
        model = models.create_model(c.model, 10, dtype=c.dtype)
        variables = model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), train=False)
        assert model.apply(variables, jnp.zeros((2, 28, 28, 1)), train=False).shape == (2, 10)
    smoke = module.get_config("smoke")
    assert smoke.dataset.limit_train and smoke.num_epochs <= 2  # the quick-look variant really is small
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("huge")


def test_runs_saved_before_a_field_was_added_still_resume():
    current = config_checks.config_as_dict(resnet_config.get_config())
    current["model"]["space_to_depth"] = False  # the value every run had before the option existed
    saved = config_checks.config_as_dict(resnet_config.get_config())
    del saved["model"]["space_to_depth"]  # a config.json written before the option existed
    assert config_checks.config_differences(saved, current) == []
    current["model"]["space_to_depth"] = True  # turning it on is a real change
    assert config_checks.config_differences(saved, current) == ["model.space_to_depth: '<absent>' -> True"]
    # The same for every later field, in the configs that carry it (the speed recipe has them all).
    fast = config_checks.config_as_dict(importlib.import_module("configs.fast").get_config())
    for field, old_value in config_checks.ADDED_FIELDS.items():
        saved, current = _edited(fast, field), _edited(fast, field, old_value)
        assert config_checks.config_differences(saved, current) == [], field
        # and a value other than the old behaviour is a real change
        assert config_checks.config_differences(saved, _edited(fast, field, "changed")) != [], field


def _edited(config: dict, dotted: str, *value) -> dict:
    """A copy of a config dict with field `dotted` deleted, or set to `value` when one is given."""
    out = json.loads(json.dumps(config))
    *sections, name = dotted.split(".")
    node = out
    for section in sections:
        node = node[section]
    assert name in node, dotted
    if value:
        node[name] = value[0]
    else:
        del node[name]
    return out


def test_a_run_saved_by_an_earlier_version_still_resumes():
    """Every field added to configs/default.py since a saved snapshot (commit 454001f) is registered in
    train.ADDED_FIELDS with the value that behaves as before: a run made then resumes unrefused."""
    with open(os.path.join(os.path.dirname(__file__), "data", "default_config_454001f.json")) as f:
        saved = json.load(f)
    assert config_checks.config_differences(saved, json.loads(default.get_config().to_json())) == []


def test_input_pipeline_prepares_ahead_exactly_the_batches_of_each_step():
    n, b = 44, 8  # 5 steps per epoch, 4 examples left over each epoch
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8))
    labels = jnp.arange(n, dtype=jnp.int32)
    keys = rng.RunKeys.from_seed(3)
    mesh = parallel.make_mesh()
    plain = steps_lib.make_batch_fn(augment.AugmentParams(), keys, n, b, mesh)
    pipeline = loop.InputPipeline(plain, images, labels, keys.order, n, 5, total_steps=12)
    for step in range(12):
        got = pipeline.batch(step)
        # Without augmentation the batch is the step's slice of its epoch's permutation.
        order = np.asarray(steps_lib.epoch_order(keys.order, step // 5, n))
        idx = order[(step % 5) * b:(step % 5 + 1) * b]
        np.testing.assert_array_equal(np.asarray(got["label"]), idx)
        np.testing.assert_allclose(np.asarray(got["image"]), np.asarray(images)[idx] / 255.0, rtol=1e-6)
        ahead = pipeline.pending()
        assert (ahead is None) == (step == 11)  # nothing is prepared past the last step
    # With augmentation: the batch prepared ahead is bit for bit the one made on demand, so a
    # pipeline started mid-run (a resume) hands out the same batches as the uninterrupted one.
    aug = augment.AugmentParams(rotation_deg=10.0, scale=0.1, translate_px=2.0)
    batch_fn = steps_lib.make_batch_fn(aug, keys, n, b, mesh)
    whole = loop.InputPipeline(batch_fn, images, labels, keys.order, n, 5, total_steps=12)
    ahead_batches = [whole.batch(step) for step in range(12)]
    resumed = loop.InputPipeline(batch_fn, images, labels, keys.order, n, 5, total_steps=12)
    for step in (4, 5, 6):  # across the epoch boundary
        direct = batch_fn(images, labels, steps_lib.epoch_order(keys.order, step // 5, n), np.int32(step))
        for got in (ahead_batches[step], resumed.batch(step)):
            np.testing.assert_array_equal(np.asarray(got["image"]), np.asarray(direct["image"]))
    assert not np.array_equal(np.asarray(ahead_batches[4]["image"]), np.asarray(ahead_batches[5]["image"]))


def test_a_batch_source_of_its_own_runs_under_jit_only(tmp_path):
    """`train_and_evaluate(batches=...)` (finetune's way in) under config.parallel="pmap" is refused in
    one line before any data is loaded or any file written, naming the fix."""
    config = default.get_config()
    default.smoke(config)
    config.parallel = "pmap"
    never = lambda ctx: pytest.fail("the batch source must not be built")
    with pytest.raises(ConfigError, match="jit only; set config.parallel='jit'"):
        loop.train_and_evaluate(config, str(tmp_path / "run"), batches=never)
    assert not os.path.exists(tmp_path / "run" / "config.json")
