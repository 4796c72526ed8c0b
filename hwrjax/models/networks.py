"""Digit classifiers in flax.linen: MLP, ConvNet and ResNet, chosen by name.

Every model maps images [B, H, W, C] with values in [0, 1] to logits [B, num_classes]
and takes `train: bool` so BatchNorm and dropout know the mode.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hwrjax.core.errors import ConfigError
from hwrjax.models import layers

class PReLU(nn.Module):
    """max(x, 0) + slope * min(x, 0) with a learned slope per channel (last axis), He et al. 2015."""

    slope_init: float = 0.25

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        slope = self.param("negative_slope", nn.initializers.constant(self.slope_init), (x.shape[-1],),
                           jnp.float32)
        return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


def prelu(x: jnp.ndarray) -> jnp.ndarray:
    """A new PReLU layer applied to x; call it inside a module's compact method (it owns the slopes)."""
    return PReLU()(x)


ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "relu": nn.relu,
    "leaky_relu": functools.partial(nn.leaky_relu, negative_slope=0.01),
    "prelu": prelu,
    "elu": nn.elu,
    "gelu": nn.gelu,
}

POOLS = {"max": layers.max_pool, "avg": layers.avg_pool}


def get_activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Returns the activation function called `name`."""
    if name not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activation {name!r}; set config.model.activation to one of {sorted(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]


def _check_pool(name: str) -> None:
    if name not in POOLS:
        raise ConfigError(f"unknown pooling {name!r}; set config.model.pooling to one of {sorted(POOLS)}")


class MLP(nn.Module):
    """Flattened image -> dense hidden layers -> logits."""

    num_classes: int = 10
    hidden_sizes: Sequence[int] = (256,)
    activation: str = "relu"
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        act = get_activation(self.activation)
        x = x.reshape((x.shape[0], -1)).astype(self.dtype)
        for width in self.hidden_sizes:
            x = act(nn.Dense(width, dtype=self.dtype)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def space_to_depth(x: jnp.ndarray, block: int) -> jnp.ndarray:
    """[B, H, W, C] -> [B, H/b, W/b, b*b*C]: each b x b block of pixels becomes one position's channels
    (a remainder row or column is dropped, as a VALID pooling would)."""
    blocks = layers.blocks(x, block, block)  # [B, H/b, b, W/b, b, C]
    b, ho, _, wo, _, c = blocks.shape
    return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(b, ho, wo, block * block * c)


def crop_border(x: jnp.ndarray, border: int) -> jnp.ndarray:
    """[B, H, W, C] -> [B, H - 2*border, W - 2*border, C]: the centre, without `border` pixels on each side."""
    if border < 0 or 2 * border >= min(x.shape[1], x.shape[2]):
        raise ConfigError(f"config.model.crop_border={border} does not fit {x.shape[1]}x{x.shape[2]} images; "
                          f"use 0 to {(min(x.shape[1], x.shape[2]) - 1) // 2}")
    if not border:
        return x
    # Slices, not indexing: with a symbolic batch size (export) indexing lowers to a gather that
    # the TFLite converter cannot translate.
    x = jax.lax.slice_in_dim(x, border, x.shape[1] - border, axis=1)
    return jax.lax.slice_in_dim(x, border, x.shape[2] - border, axis=2)


class ConvNet(nn.Module):
    """Conv-pool stages, then dense layers (Conv32-Pool-Conv64-Pool-Dense64-Dense10 by default)."""

    num_classes: int = 10
    conv_widths: Sequence[int] = (32, 64)
    dense_widths: Sequence[int] = (64,)
    kernel_size: int = 3
    activation: str = "relu"
    pooling: str = "max"
    dropout_rate: float = 0.0
    batch_norm: bool = False
    # Fold each 2x2 block of pixels into 4 channels before the first conv (28x28x1 -> 14x14x4), in
    # place of the first pooling: the first conv then runs on a quarter of the positions.
    space_to_depth: bool = False
    # Conv-Pool-BN-Act instead of Conv-BN-Act-Pool: normalisation and activation (and their
    # gradients) run on a quarter of the positions. With max pooling and a monotone activation the
    # two orders differ only in where BatchNorm takes its statistics.
    pool_before_norm: bool = False
    # Pixels cut from each edge before the first layer. MNIST centres each digit in a 20x20 box on the
    # 28x28 canvas: the outer 2-pixel ring holds 0.24% of the ink, and cutting it leaves 0.73x the positions.
    crop_border: int = 0
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None  # pmap axis over which BatchNorm averages statistics

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        act = get_activation(self.activation)
        _check_pool(self.pooling)
        pool = POOLS[self.pooling]
        x = crop_border(x.astype(self.dtype), self.crop_border)
        if self.space_to_depth:
            x = space_to_depth(x, 2)
        k = (self.kernel_size, self.kernel_size)
        for i, width in enumerate(self.conv_widths):
            x = layers.Conv(width, k, padding="SAME", use_bias=not self.batch_norm, dtype=self.dtype)(x)
            pooled = not (i == 0 and self.space_to_depth)
            if pooled and self.pool_before_norm:
                x = pool(x, (2, 2), strides=(2, 2))
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                                 axis_name=self.bn_axis_name)(x)
            x = act(x)
            if pooled and not self.pool_before_norm:
                x = pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        for width in self.dense_widths:
            x = act(nn.Dense(width, dtype=self.dtype)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class BasicBlock(nn.Module):
    """Post-activation residual block: act(BN(conv(act(BN(conv x)))) + shortcut(x))."""

    width: int
    stride: int
    act: Callable[[jnp.ndarray], jnp.ndarray]
    norm: Callable[..., nn.Module]
    conv: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        s = (self.stride, self.stride)
        y = self.act(self.norm()(self.conv(self.width, (3, 3), s)(x)))
        # Zero-init of the last BN scale makes each block start as the identity.
        y = self.norm(scale_init=nn.initializers.zeros)(self.conv(self.width, (3, 3))(y))
        if x.shape[-1] != self.width or self.stride != 1:
            x = self.norm()(self.conv(self.width, (1, 1), s, name="projection")(x))
        return self.act(y + x)


class PreActBlock(nn.Module):
    """Pre-activation residual block: conv(act(BN(conv(act(BN x))))) + shortcut(x)."""

    width: int
    stride: int
    act: Callable[[jnp.ndarray], jnp.ndarray]
    norm: Callable[..., nn.Module]
    conv: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        s = (self.stride, self.stride)
        pre = self.act(self.norm()(x))
        y = self.conv(self.width, (3, 3), s)(pre)
        y = self.conv(self.width, (3, 3))(self.act(self.norm()(y)))
        if x.shape[-1] != self.width or self.stride != 1:
            x = self.conv(self.width, (1, 1), s, name="projection")(pre)
        return y + x


BLOCKS = {"basic": BasicBlock, "preact": PreActBlock}


class ResNet(nn.Module):
    """Stem conv, stages of residual blocks (y = F(x) + x), global average pool, dense."""

    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2)
    stage_widths: Sequence[int] = (32, 64, 128)
    stem_width: int = 32
    block: str = "basic"
    activation: str = "relu"
    pooling: str = "avg"
    dropout_rate: float = 0.0
    # Fold 2x2 pixel blocks into channels before the stem (28x28x1 -> 14x14x4): every stage then
    # runs at half the resolution, on a quarter of the positions.
    space_to_depth: bool = False
    crop_border: int = 0  # pixels cut from each edge first, as in ConvNet
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None  # pmap axis over which BatchNorm averages statistics

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.block not in BLOCKS:
            raise ConfigError(f"unknown block {self.block!r}; set config.model.block to one of {sorted(BLOCKS)}")
        if len(self.stage_sizes) != len(self.stage_widths):
            raise ConfigError("config.model.stage_sizes and config.model.stage_widths must have the same length")
        _check_pool(self.pooling)
        act = get_activation(self.activation)
        conv = functools.partial(layers.Conv, use_bias=False, padding="SAME", dtype=self.dtype,
                                 kernel_init=nn.initializers.kaiming_normal())
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                                 epsilon=1e-5, dtype=self.dtype, axis_name=self.bn_axis_name)
        block_cls = BLOCKS[self.block]
        x = crop_border(x.astype(self.dtype), self.crop_border)
        if self.space_to_depth:
            x = space_to_depth(x, 2)
        x = conv(self.stem_width, (3, 3), name="stem")(x)
        if self.block == "basic":
            x = act(norm(name="stem_bn")(x))
        for i, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            for j in range(size):
                stride = 2 if i > 0 and j == 0 else 1
                x = block_cls(width, stride, act=act, norm=norm, conv=conv)(x)
        if self.block == "preact":
            x = act(norm(name="final_bn")(x))
        # Global pooling over the spatial axes; `pooling` picks mean or max.
        x = jnp.mean(x, axis=(1, 2)) if self.pooling == "avg" else jnp.max(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "convnet": ConvNet, "resnet": ResNet}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def create_model(model_config: Any, num_classes: int, dtype: str = "float32",
                 bn_axis_name: str | None = None) -> nn.Module:
    """Builds the model named by `model_config.name` with the config's other fields as arguments.

    `bn_axis_name` names the pmap axis over which BatchNorm statistics are averaged (pmap only;
    under jit the statistics of a sharded batch are global already).
    """
    fields = dict(model_config)
    name = fields.pop("name", None)
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; set config.model.name to one of {sorted(MODELS)}")
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; set config.dtype to one of {sorted(_DTYPES)}")
    cls = MODELS[name]
    allowed = set(cls.__dataclass_fields__) - {"parent", "name", "num_classes", "dtype", "bn_axis_name"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ConfigError(f"config.model has fields {unknown} that model {name!r} does not take; "
                          f"it takes {sorted(allowed)}")
    for key, value in fields.items():
        if isinstance(value, (list, tuple)):
            fields[key] = tuple(value)
            if any((not isinstance(v, int)) or v <= 0 for v in value):
                raise ConfigError(f"config.model.{key} must hold positive integers, got {value}")
        elif key == "dropout_rate" and not 0.0 <= value < 1.0:
            raise ConfigError(f"config.model.dropout_rate must be in [0, 1), got {value}")
        elif key in ("stem_width", "kernel_size") and value <= 0:
            raise ConfigError(f"config.model.{key} must be positive, got {value}")
        elif key == "crop_border" and (not isinstance(value, int) or value < 0):
            raise ConfigError(f"config.model.crop_border must be a whole number of pixels >= 0, got {value!r}")
    if "bn_axis_name" in cls.__dataclass_fields__:
        fields["bn_axis_name"] = bn_axis_name
    model = cls(num_classes=num_classes, dtype=_DTYPES[dtype], **fields)
    if "activation" in fields:
        get_activation(fields["activation"])
    if "pooling" in fields:
        _check_pool(fields["pooling"])
    if "block" in fields and fields["block"] not in BLOCKS:
        raise ConfigError(f"unknown block {fields['block']!r}; set config.model.block to one of {sorted(BLOCKS)}")
    return model
