"""Models: output shapes, parameter counts, modes and bad names."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from hwrjax import models
from hwrjax.core import steps, train_state
from hwrjax.core.errors import ConfigError
from hwrjax.models import networks


def _count(variables):
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


def _init(model, batch=3):
    x = jnp.ones((batch, 28, 28, 1))
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=False)
    return variables, x


def test_mlp_shape_and_parameter_count():
    variables, x = _init(models.MLP(hidden_sizes=(256,)))
    assert models.MLP().apply(variables, x).shape == (3, 10)
    # 784*256 + 256 weights/biases in, 256*10 + 10 out.
    assert _count(variables) == 784 * 256 + 256 + 256 * 10 + 10 == 203_530


def test_convnet_shape_and_parameter_count():
    model = models.ConvNet()
    variables, x = _init(model)
    assert model.apply(variables, x).shape == (3, 10)
    conv1 = 3 * 3 * 1 * 32 + 32
    conv2 = 3 * 3 * 32 * 64 + 64
    dense = 7 * 7 * 64 * 64 + 64  # two 2x2 pools: 28 -> 14 -> 7
    out = 64 * 10 + 10
    assert _count(variables) == conv1 + conv2 + dense + out


def test_space_to_depth_folds_blocks_into_channels():
    x = jnp.arange(2 * 5 * 6 * 3, dtype=jnp.float32).reshape(2, 5, 6, 3)
    y = networks.space_to_depth(x, 2)
    assert y.shape == (2, 2, 3, 12)  # the odd last row is dropped
    # Position (i, j) holds the 2x2 block at rows 2i..2i+1, columns 2j..2j+1, row-major, channels inner.
    block = x[1, 2:4, 4:6, :].reshape(-1)
    assert jnp.array_equal(y[1, 1, 2], block)


def test_convnet_space_to_depth_replaces_the_first_pool():
    model = models.ConvNet(conv_widths=(32, 64), dense_widths=(128,), batch_norm=True, space_to_depth=True)
    variables, x = _init(model)
    assert model.apply(variables, x).shape == (3, 10)
    params = variables["params"]
    assert params["Conv_0"]["kernel"].shape == (3, 3, 4, 32)  # 2x2 pixels -> 4 input channels
    assert params["Dense_0"]["kernel"].shape == (7 * 7 * 64, 128)  # 28 -> 14 (fold) -> 7 (one pool)


def test_convnet_pool_before_norm_without_norm_is_the_same_function():
    # Max pooling commutes with a per-channel bias and a monotone activation: without BatchNorm the
    # two orders compute the same outputs from the same parameters.
    x = jax.random.normal(jax.random.key(3), (4, 28, 28, 1))
    a = models.ConvNet(conv_widths=(8, 16), dense_widths=(32,))
    b = models.ConvNet(conv_widths=(8, 16), dense_widths=(32,), pool_before_norm=True)
    variables = a.init(jax.random.key(0), x)
    assert jnp.allclose(a.apply(variables, x), b.apply(variables, x), atol=1e-5)


def test_convnet_pool_before_norm_takes_batch_statistics_of_pooled_maps():
    x = jax.random.normal(jax.random.key(4), (4, 28, 28, 1))
    model = models.ConvNet(conv_widths=(8, 16), dense_widths=(32,), batch_norm=True, pool_before_norm=True)
    variables = model.init(jax.random.key(0), x)
    (_, updated) = model.apply(variables, x, train=True, mutable=["batch_stats"])
    conv = jax.lax.conv_general_dilated(x, variables["params"]["Conv_0"]["kernel"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    pooled = conv.reshape(4, 14, 2, 14, 2, 8).max(axis=(2, 4))
    # Running mean starts at 0 and moves by (1 - momentum) = 0.1 towards the batch mean.
    expected = 0.1 * pooled.mean(axis=(0, 1, 2))
    assert jnp.allclose(updated["batch_stats"]["BatchNorm_0"]["mean"], expected, atol=1e-5)
    full = 0.1 * conv.mean(axis=(0, 1, 2))  # what the usual order would record
    assert not jnp.allclose(expected, full, atol=1e-3)


def test_resnet_space_to_depth_runs_every_stage_at_half_resolution():
    model = models.ResNet(stage_sizes=(1, 1), stage_widths=(8, 16), stem_width=8, space_to_depth=True)
    variables, x = _init(model)
    assert model.apply(variables, x).shape == (3, 10)
    assert variables["params"]["stem"]["kernel"].shape == (3, 3, 4, 8)
    # The stem sees 14x14 positions: its output (before BN) is [B, 14, 14, 8].
    _, inter = model.apply(variables, x, capture_intermediates=lambda m, _: m.name == "stem",
                           mutable=["intermediates"])
    assert inter["intermediates"]["stem"]["__call__"][0].shape == (3, 14, 14, 8)


def test_crop_border_keeps_the_centre():
    x = jnp.arange(2 * 28 * 28, dtype=jnp.float32).reshape(2, 28, 28, 1)
    y = networks.crop_border(x, 2)
    assert y.shape == (2, 24, 24, 1)
    assert y[1, 0, 0, 0] == x[1, 2, 2, 0] and y[1, -1, -1, 0] == x[1, 25, 25, 0]
    assert networks.crop_border(x, 0) is x
    with pytest.raises(ConfigError, match="crop_border=14 does not fit 28x28 images; use 0 to 13"):
        networks.crop_border(x, 14)


@pytest.mark.parametrize("model", [
    models.ConvNet(conv_widths=(8, 16), dense_widths=(16,), batch_norm=True, space_to_depth=True, crop_border=2),
    models.ResNet(stage_sizes=(1, 1), stage_widths=(8, 16), stem_width=8, crop_border=2),
], ids=["convnet", "resnet"])
def test_crop_border_makes_the_model_blind_to_the_outer_ring(model):
    variables, _ = _init(model)
    x = jax.random.uniform(jax.random.key(3), (2, 28, 28, 1))
    ring = jnp.ones((28, 28), bool).at[2:26, 2:26].set(False)[None, :, :, None]
    outer_changed = jnp.where(ring, 1.0 - x, x)
    inner_changed = x.at[:, 2, 2, :].set(1.0 - x[:, 2, 2, :])  # the corner pixel just inside the crop
    logits = model.apply(variables, x)
    assert jnp.array_equal(model.apply(variables, outer_changed), logits)
    assert not jnp.allclose(model.apply(variables, inner_changed), logits)


def test_crop_border_shrinks_the_convnet_feature_maps():
    model = models.ConvNet(conv_widths=(8, 16), dense_widths=(16,), batch_norm=True, space_to_depth=True, crop_border=2)
    variables, _ = _init(model)
    # 28 -> 24 (crop) -> 12 (fold) -> 6 (pool): the dense layer sees 6x6x16 instead of 7x7x16.
    assert variables["params"]["Dense_0"]["kernel"].shape == (6 * 6 * 16, 16)


def test_resnet_shape_parameter_count_and_batch_stats():
    model = models.ResNet(stage_sizes=(1, 1), stage_widths=(8, 16), stem_width=8)
    variables, x = _init(model)
    assert model.apply(variables, x, train=False).shape == (3, 10)
    bn = lambda c: 2 * c
    stem = 3 * 3 * 1 * 8 + bn(8)
    block1 = 3 * 3 * 8 * 8 + bn(8) + 3 * 3 * 8 * 8 + bn(8)  # same shape: identity shortcut
    block2 = 3 * 3 * 8 * 16 + bn(16) + 3 * 3 * 16 * 16 + bn(16) + 1 * 1 * 8 * 16 + bn(16)  # projection
    head = 16 * 10 + 10
    assert _count(variables) == stem + block1 + block2 + head
    assert "batch_stats" in variables
    # Training mode updates the running statistics.
    _, mutated = model.apply(variables, x * 0.5, train=True, mutable=["batch_stats"])
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(mutated["batch_stats"])
    assert any(not jnp.allclose(a, b) for a, b in zip(before, after))


def test_resnet_blocks_start_as_identity_and_preact_runs():
    # Basic blocks zero-init their last BN scale, so a fresh block passes its input through.
    variables, x = _init(models.ResNet(stage_sizes=(2,), stage_widths=(8,), stem_width=8))
    scales = [v["BatchNorm_1"]["scale"] for k, v in variables["params"].items() if k.startswith("BasicBlock")]
    assert scales and all(jnp.all(s == 0) for s in scales)
    pre = models.ResNet(stage_sizes=(1, 1), stage_widths=(8, 16), stem_width=8, block="preact")
    variables, x = _init(pre)
    assert pre.apply(variables, x).shape == (3, 10)


@pytest.mark.parametrize("activation", sorted(networks.ACTIVATIONS))
@pytest.mark.parametrize("pooling", sorted(networks.POOLS))
def test_activation_and_pooling_options(activation, pooling):
    model = models.ConvNet(conv_widths=(4,), dense_widths=(8,), activation=activation, pooling=pooling)
    variables, x = _init(model)
    out = model.apply(variables, x)
    assert out.shape == (3, 10) and bool(jnp.all(jnp.isfinite(out)))


def test_dropout_is_active_only_in_training():
    model = models.MLP(hidden_sizes=(64,), dropout_rate=0.5)
    variables, x = _init(model)
    assert jnp.allclose(model.apply(variables, x), model.apply(variables, x))
    a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not jnp.allclose(a, b)


def test_create_model_by_name_and_errors():
    cfg = ml_collections.ConfigDict(dict(name="mlp", hidden_sizes=(32, 16), activation="gelu", dropout_rate=0.1))
    model = models.create_model(cfg, num_classes=7)
    assert isinstance(model, models.MLP) and model.hidden_sizes == (32, 16) and model.num_classes == 7
    with pytest.raises(ConfigError, match="unknown model 'vgg'.*config.model.name"):
        models.create_model(ml_collections.ConfigDict(dict(name="vgg")), 10)
    with pytest.raises(ConfigError, match="unknown activation 'swish'"):
        models.create_model(ml_collections.ConfigDict(dict(name="mlp", activation="swish")), 10)
    with pytest.raises(ConfigError, match="does not take"):
        models.create_model(ml_collections.ConfigDict(dict(name="mlp", stage_sizes=(1,))), 10)
    with pytest.raises(ConfigError, match="positive integers"):
        models.create_model(ml_collections.ConfigDict(dict(name="mlp", hidden_sizes=(0,))), 10)
    with pytest.raises(ConfigError, match="unknown block"):
        models.create_model(ml_collections.ConfigDict(dict(name="resnet", block="bottle")), 10)
    with pytest.raises(ConfigError, match="crop_border must be a whole number of pixels >= 0, got -1"):
        models.create_model(ml_collections.ConfigDict(dict(name="convnet", crop_border=-1)), 10)


def test_prelu_values_and_one_slope_per_channel():
    layer = networks.PReLU()
    x = jnp.array([[-2.0, -1.0, 0.0, 3.0]])
    variables = layer.init(jax.random.key(0), x)
    assert variables["params"]["negative_slope"].shape == (4,)
    slopes = jnp.array([0.1, 0.2, 0.3, 0.4])
    out = layer.apply({"params": {"negative_slope": slopes}}, x)
    assert jnp.allclose(out, jnp.array([[-0.2, -0.2, 0.0, 3.0]]))
    # Every activation site of a model owns its slopes, one per channel of that site.
    model = models.ConvNet(conv_widths=(4, 6), dense_widths=(5,), activation="prelu")
    variables, _ = _init(model)
    shapes = sorted(v["negative_slope"].shape for k, v in variables["params"].items() if k.startswith("PReLU"))
    assert shapes == [(4,), (5,), (6,)]


@pytest.mark.parametrize("name", ["mlp", "convnet", "resnet"])
def test_prelu_slopes_are_learned_without_weight_decay_and_checkpointed(name, tmp_path):
    import numpy as np
    import optax

    from hwrjax.core import optim
    from hwrjax.training import checkpoint

    small = dict(mlp=dict(hidden_sizes=(16,)), convnet=dict(conv_widths=(4,), dense_widths=(8,)),
                 resnet=dict(stage_sizes=(1,), stage_widths=(4,), stem_width=4))[name]
    model = models.create_model(ml_collections.ConfigDict(dict(name=name, activation="prelu", **small)), 10)
    state = train_state.create_train_state(model, optax.sgd(0.1), jax.random.key(0))
    slope_paths = lambda params: {jax.tree_util.keystr(p): np.asarray(v) for p, v in
                                  jax.tree_util.tree_flatten_with_path(params)[0] if "negative_slope" in str(p)}
    before = slope_paths(state.params)
    assert before and all(np.all(v == 0.25) for v in before.values())
    # Like biases and normalization scales, the slopes are not weight-decayed.
    mask = slope_paths(optim.decay_mask(state.params))
    assert mask and not any(bool(m) for m in mask.values())
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(16, 28, 28, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
    step = jax.jit(steps.train_step)
    for i in range(3):
        state, _ = step(state, batch, jax.random.key(i))
    after = slope_paths(state.params)
    assert any(not np.allclose(after[k], before[k]) for k in before)
    # Saved with the other parameters, and restored both for inference and for resuming.
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, async_save=False)
    ckpt.save(3, state, {})
    ckpt.close()
    loaded, _ = checkpoint.load_variables(str(tmp_path), "latest")
    for k, v in slope_paths(loaded["params"]).items():
        np.testing.assert_array_equal(v, after[k])
    fresh = jax.jit(lambda k: train_state.create_train_state(model, optax.sgd(0.1), k))(jax.random.key(1))
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1, async_save=False)
    resumed, _ = ckpt.restore_latest(fresh)
    ckpt.close()
    for k, v in slope_paths(resumed.params).items():
        np.testing.assert_array_equal(v, after[k])
