"""Pure train/eval steps and the jitted programs built from them.

`train_step(state, batch, rng)` and `eval_step(state, batch)` work with any Linen module whose
`__call__` takes `train: bool` and any optax GradientTransformation. `make_batch_fn`,
`make_step_fn` and `make_fused_*` build the compiled programs of the training loop: the batch
of step `s` gathered by index from device-resident data and augmented with fold_in(key, s),
then the step with dropout keyed by fold_in(key, state.step).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from hwrjax.core import augment as augment_lib
from hwrjax.core import losses as losses_lib
from hwrjax.core import rng as rng_lib
from hwrjax.core.train_state import TrainState, update_ema


def _variables(state: TrainState, params: Any) -> dict:
    variables = {"params": params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


def train_step(state: TrainState, batch: dict, rng: jax.Array,
               loss_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray] = losses_lib.cross_entropy,
               axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One optimizer step on batch {'image': float [B,H,W,C], 'label': int [B]}; rng keys dropout.

    Under jit the batch may be sharded over devices and everything is global already. Under
    pmap pass `axis_name`: gradients and metrics are averaged over it (and a model built with
    `bn_axis_name` averages its BatchNorm statistics over it too).
    """

    def compute_loss(params):
        outputs = state.apply_fn(_variables(state, params), batch["image"], train=True,
                                 mutable=["batch_stats"], rngs={"dropout": rng})
        logits, mutated = outputs
        loss = jnp.mean(loss_fn(logits, batch["label"]))
        return loss, (logits, mutated.get("batch_stats", state.batch_stats))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        loss, accuracy = jax.lax.pmean((loss, accuracy), axis_name)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}
    return new_state, metrics


def eval_step(state: TrainState, batch: dict,
              loss_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray] = losses_lib.cross_entropy) -> dict:
    """Sums of loss and correct predictions over the examples of `batch` whose 'mask' is 1."""
    logits = state.apply_fn(_variables(state, state.params), batch["image"], train=False)
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32)).astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(loss_fn(logits, batch["label"]) * mask),
        "correct": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
    }


def predict_logits(state_or_variables: Any, apply_fn: Callable, images: jnp.ndarray) -> jnp.ndarray:
    """Logits of images [B,H,W,C] in [0,1] in inference mode."""
    return apply_fn(state_or_variables, images, train=False)


def summarize_eval(sums: dict) -> dict:
    """Turns eval_step sums into mean loss, accuracy and the example count."""
    count = float(sums["count"])
    return {"loss": float(sums["loss_sum"]) / max(count, 1.0),
            "accuracy": float(sums["correct"]) / max(count, 1.0),
            "num_examples": int(round(count))}


def to_float_images(images: jnp.ndarray) -> jnp.ndarray:
    """uint8 pixels -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def epoch_order(order_key: jax.Array, epoch: int, num_train: int) -> jax.Array:
    """The permutation of the training set used in `epoch`: keyed by fold_in(order_key, epoch)."""
    return _permutation(jax.random.fold_in(order_key, epoch), num_train)


@functools.partial(jax.jit, static_argnums=(1,))
def _permutation(key: jax.Array, n: int) -> jax.Array:
    return jax.random.permutation(key, n)


def make_batch_fn(aug: augment_lib.AugmentParams, keys: rng_lib.RunKeys, num_train: int, batch_size: int,
                  mesh: jax.sharding.Mesh) -> Callable:
    """Builds jit(images, labels, order, step) -> the augmented batch of training step `step`.

    `order` is `epoch_order(keys.order, epoch, num_train)` for the step's epoch; batch i of the
    epoch is order[i*B:(i+1)*B], augmented with fold_in(keys.augment, step). Everything is a
    function of (seed, step), so a restored state continues with exactly the batches of the
    uninterrupted run; and every batch comes from this one program, whether it was prepared
    ahead (`InputPipeline`) or on demand.
    """
    steps_per_epoch = num_train // batch_size
    batch_sharding = NamedSharding(mesh, P("data"))

    # The key is an argument, not a constant baked into the program: every seed then runs the
    # same compiled program, which the persistent compilation cache can hand to the next run.
    def batch_of(images: jnp.ndarray, labels: jnp.ndarray, order: jnp.ndarray, step: jnp.ndarray,
                 augment_key: jax.Array) -> dict:
        idx = jax.lax.dynamic_slice_in_dim(order, (step % steps_per_epoch) * batch_size, batch_size)
        idx = jax.lax.with_sharding_constraint(idx, batch_sharding)
        batch_images = augment_lib.augment_batch(to_float_images(images[idx]),
                                                 jax.random.fold_in(augment_key, step), aug)
        return {"image": jax.lax.with_sharding_constraint(batch_images, batch_sharding),
                "label": jax.lax.with_sharding_constraint(labels[idx], batch_sharding)}

    compiled = jax.jit(batch_of)
    return lambda images, labels, order, step: compiled(images, labels, order, step, keys.augment)


def make_step_fn(loss_fn: Callable, keys: rng_lib.RunKeys, ema_decay: float = 0.0) -> Callable:
    """Builds jit(state, batch) -> (state, metrics): `train_step` with dropout keyed by
    fold_in(keys.dropout, state.step), then `update_ema` when ema_decay > 0; the state's
    buffers are donated."""

    def step_fn(state: TrainState, batch: dict, dropout_key: jax.Array):
        state, metrics = train_step(state, batch, jax.random.fold_in(dropout_key, state.step), loss_fn=loss_fn)
        return (update_ema(state, ema_decay) if ema_decay else state), metrics

    compiled = jax.jit(step_fn, donate_argnums=(0,))
    return lambda state, batch: compiled(state, batch, keys.dropout)


def make_fused_train_step(loss_fn: Callable, aug: augment_lib.AugmentParams, keys: rng_lib.RunKeys,
                          num_train: int, batch_size: int, mesh: jax.sharding.Mesh,
                          ema_decay: float = 0.0) -> Callable:
    """(state, images, labels, order) -> (state, metrics) for batch number `state.step`, without
    preparing ahead: the batch program, then the step program."""
    batch_fn = make_batch_fn(aug, keys, num_train, batch_size, mesh)
    step_fn = make_step_fn(loss_fn, keys, ema_decay)
    return lambda state, images, labels, order: step_fn(state, batch_fn(images, labels, order, state.step))


PMAP_AXIS = "batch"


def make_fused_pmap_step(loss_fn: Callable, aug: augment_lib.AugmentParams, keys: rng_lib.RunKeys,
                         num_train: int, batch_size: int, ema_decay: float = 0.0) -> Callable:
    """The same step as `make_fused_train_step` under jax.pmap: each device takes its slice of
    the global batch (and the matching augmentation keys) and gradients are averaged."""
    steps_per_epoch = num_train // batch_size
    per_device = batch_size // jax.device_count()

    def fused(state: TrainState, images: jnp.ndarray, labels: jnp.ndarray, order: jnp.ndarray,
              augment_key: jax.Array, dropout_key: jax.Array):
        step = state.step
        offset = jax.lax.axis_index(PMAP_AXIS) * per_device
        idx = jax.lax.dynamic_slice_in_dim(order, (step % steps_per_epoch) * batch_size + offset, per_device)
        batch_images = augment_lib.augment_batch(to_float_images(images[idx]),
                                                 jax.random.fold_in(augment_key, step), aug, index_offset=offset)
        rng = jax.random.fold_in(jax.random.fold_in(dropout_key, step), jax.lax.axis_index(PMAP_AXIS))
        state, metrics = train_step(state, {"image": batch_images, "label": labels[idx]}, rng, loss_fn=loss_fn,
                                    axis_name=PMAP_AXIS)
        return (update_ema(state, ema_decay) if ema_decay else state), metrics

    # Keys are broadcast arguments (in_axes None) for the same reason as in make_fused_train_step.
    compiled = jax.pmap(fused, axis_name=PMAP_AXIS, in_axes=(0, 0, 0, 0, None, None), donate_argnums=(0,))
    return lambda state, images, labels, order: compiled(state, images, labels, order, keys.augment, keys.dropout)
