"""Population BatchNorm statistics of a trained model, recomputed on clean training images.

During training a BatchNorm layer's running statistics follow the last few batches (momentum
0.9 spans ~10 of them) of *augmented* images, and a moving average of the weights averages
statistics that were measured under other weights. `recompute_batch_stats` replaces them with
the statistics the final weights produce on unaugmented training images: every layer's batch
mean and variance, in train mode (each layer normalised by its batch, as in training), averaged
over equal batches ("precise BatchNorm"). Only training images are read, so selection on
validation and the test report stay honest.

Works with any Linen module whose BatchNorm layers keep running averages of the form
`m * old + (1 - m) * batch` (flax.linen.BatchNorm, any momentum): the statistics are read
with the running averages started at zero, and (1 - m) is measured on the first batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from hwrjax.core.errors import ConfigError


def _float_images(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size", "batch_sharding"))
def _batch_running_stats(apply_fn: Callable, params: Any, start: Any, images: jax.Array, index: jax.Array,
                         batch_size: int, batch_sharding: Any = None) -> Any:
    """The running statistics after one train-mode forward pass of batch `index`, started at `start`."""
    batch = jax.lax.dynamic_slice_in_dim(images, index * batch_size, batch_size)
    if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    _, mutated = apply_fn({"params": params, "batch_stats": start}, _float_images(batch), train=True,
                          mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    return mutated["batch_stats"]


def recompute_batch_stats(apply_fn: Callable, params: Any, batch_stats: Any, images: jax.Array,
                          batch_size: int = 1000, batch_sharding: Any = None) -> Any:
    """BatchNorm statistics (the structure of `batch_stats`) of `params` on `images` [N, H, W, C].

    `images` are uint8 pixels or floats in [0, 1], as the model's training batches were; only
    the first N // batch_size * batch_size are used (equal batches). Deterministic: no
    augmentation, and dropout (if any) keyed by a fixed key. Returns `batch_stats` unchanged
    for a model without BatchNorm. `batch_sharding` (e.g. NamedSharding(mesh, P("data"))) spreads
    each batch over devices; the statistics are those of the whole batch either way.
    """
    if not jax.tree.leaves(batch_stats):
        return batch_stats
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"the batch size for BatchNorm statistics must be a positive integer, got {batch_size!r}")
    num_batches = int(images.shape[0]) // batch_size
    if num_batches == 0:
        raise ConfigError(f"BatchNorm statistics need at least one batch of {batch_size} images, got "
                          f"{images.shape[0]}; pass more images or a smaller batch size")
    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    ones = jax.tree.map(jnp.ones_like, batch_stats)
    run = functools.partial(_batch_running_stats, apply_fn, params, images=images, batch_size=batch_size,
                            batch_sharding=batch_sharding)
    # From zero the running average after one batch is (1 - m) * s; from one it is m + (1 - m) * s.
    # Their difference is the layer's momentum m, whatever the module set it to.
    first = run(zeros, index=jnp.int32(0))
    weight = jax.tree.map(lambda a, b: 1.0 - (b - a), first, run(ones, index=jnp.int32(0)))
    if any(float(jnp.min(w)) <= 1e-6 for w in jax.tree.leaves(weight)):
        raise ConfigError("a BatchNorm layer with momentum 1 never updates its statistics; "
                          "they cannot be recomputed")
    total = first
    for b in range(1, num_batches):
        total = jax.tree.map(jnp.add, total, run(zeros, index=jnp.int32(b)))
    return jax.tree.map(lambda t, w, old: (t / (w * num_batches)).astype(old.dtype), total, weight, batch_stats)
