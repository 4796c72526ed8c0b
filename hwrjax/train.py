"""Pure train/eval steps and the training loop.

`train_step(state, batch, rng)` and `eval_step(state, batch)` work with any Linen module
whose `__call__` takes `train: bool` and any optax GradientTransformation.
`train_and_evaluate(config, workdir)` runs a whole recipe: data on device, batches
gathered by index inside the jitted step, periodic validation and checkpoints, resume,
and a final test report.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from hwrjax import augment as augment_lib
from hwrjax import batch_stats as batch_stats_lib
from hwrjax import checkpoint as checkpoint_lib
from hwrjax import data as data_lib
from hwrjax import losses as losses_lib
from hwrjax import models as models_lib
from hwrjax import optim as optim_lib
from hwrjax import parallel
from hwrjax import rng as rng_lib
from hwrjax import runlock
from hwrjax.errors import CheckpointError, ConfigError, Diverged, Preempted, WorkdirBusy
from hwrjax.logs import MetricLogger


class TrainState(train_state.TrainState):
    """flax TrainState plus BatchNorm statistics (an empty dict for models without them) and
    the moving average of the weights (`ema`: {} when none is kept, see `init_ema`)."""

    batch_stats: Any = flax.struct.field(default_factory=dict)
    ema: Any = flax.struct.field(default_factory=dict)


def create_train_state(model: Any, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape: tuple[int, ...] = (1, 28, 28, 1)) -> TrainState:
    """Initializes `model` on zeros of `input_shape` and wraps it with optimizer `tx`."""
    variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(input_shape, jnp.float32), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}))


def _weights(state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def init_ema(state: TrainState) -> TrainState:
    """Starts an exponential moving average of the params and BatchNorm statistics at their current values.

    The average gets its own copies of the arrays, so a step that donates the state's buffers
    does not find one buffer in two places.
    """
    return state.replace(ema=jax.tree.map(jnp.copy, _weights(state)))


def ema_decay_at(decay: float, step: jnp.ndarray) -> jnp.ndarray:
    """The decay applied after optimizer step `step` (1 for the first): min(decay, (1+t)/(10+t)).

    The ramp keeps the first updates from being swamped by the initial weights, so a short run
    (or a low step count) averages its recent weights instead of its random start.
    """
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def update_ema(state: TrainState, decay: float) -> TrainState:
    """Moves `state.ema` towards the current params and BatchNorm statistics by 1 - ema_decay_at(decay, step).

    Call it after each optimizer step on a state made by `init_ema`. The average never feeds back
    into training: the params follow exactly the trajectory they follow without it.
    """
    d = ema_decay_at(decay, state.step)
    return state.replace(ema=jax.tree.map(lambda e, p: e + (1.0 - d).astype(e.dtype) * (p - e), state.ema,
                                          _weights(state)))


def averaged(state: TrainState) -> TrainState:
    """`state` with its moving average in place of params and BatchNorm statistics (unchanged
    when it keeps none): the weights a run with config.ema_decay > 0 validates, selects and delivers."""
    if not state.ema:
        return state
    return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])


def with_delivered_batch_stats(state: TrainState, batch_stats: Any) -> TrainState:
    """`state` with `batch_stats` where a checkpoint of it is read for inference: in its moving
    average when it keeps one (see `averaged`), else in place of its own statistics."""
    if state.ema:
        return state.replace(ema=dict(state.ema, batch_stats=batch_stats))
    return state.replace(batch_stats=batch_stats)


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


# --------------------------------------------------------------------------------------
# Device-resident data, the batch and step programs, and the look-ahead input pipeline of the training loop.


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


class InputPipeline:
    """Hands the training loop the batch of each step, with the next one already on its way.

    `batch(step)` dispatches the batch program for step + 1 before returning batch `step`, so
    the caller's train step is queued behind it and the two programs (which share no buffers)
    run side by side: on a 2-core CPU the gather and augmentation then hide under the step
    instead of adding to it (the speed recipe's input share went from ~16% to ~4%). Batch
    `step` is the same with or without the look-ahead, hence the same after a resume.
    """

    def __init__(self, batch_fn: Callable, images: jnp.ndarray, labels: jnp.ndarray, order_key: jax.Array,
                 num_train: int, steps_per_epoch: int, total_steps: int):
        self._batch_fn, self._images, self._labels = batch_fn, images, labels
        self._order_key, self._num_train = order_key, num_train
        self._steps_per_epoch, self._total_steps = steps_per_epoch, total_steps
        self._orders: dict[int, jax.Array] = {}
        self._ahead: tuple[int, dict] | None = None

    def _order(self, step: int) -> jax.Array:
        epoch = step // self._steps_per_epoch
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = epoch_order(self._order_key, epoch, self._num_train)
        return self._orders[epoch]

    def _make(self, step: int) -> dict:
        return self._batch_fn(self._images, self._labels, self._order(step), np.int32(step))

    def pending(self) -> dict | None:
        """The batch prepared ahead (or None): what a caller blocks on to wait for all input work."""
        return None if self._ahead is None else self._ahead[1]

    def batch(self, step: int) -> dict:
        if self._ahead is not None and self._ahead[0] == step:
            current = self._ahead[1]
        else:
            current = self._make(step)
        self._ahead = (step + 1, self._make(step + 1)) if step + 1 < self._total_steps else None
        return current


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


class EvalSet:
    """A split padded to a multiple of the eval batch, on device, with a mask of real examples."""

    def __init__(self, split: data_lib.Split, batch_size: int, mesh: jax.sharding.Mesh):
        n = len(split)
        self.num_examples = n
        self.batch_size = batch_size
        self.num_batches = max(1, math.ceil(n / batch_size))
        padded = self.num_batches * batch_size
        images = np.zeros((padded,) + split.images.shape[1:], np.uint8)
        images[:n] = split.images
        labels = np.zeros((padded,), np.int32)
        labels[:n] = split.labels
        mask = np.zeros((padded,), np.float32)
        mask[:n] = 1.0
        replicated = NamedSharding(mesh, P())
        self.images = parallel.put_replicated(images, replicated)
        self.labels = parallel.put_replicated(labels, replicated)
        self.mask = parallel.put_replicated(mask, replicated)


def make_evaluate(loss_fn: Callable, mesh: jax.sharding.Mesh) -> Callable[[TrainState, EvalSet], dict]:
    """Builds evaluate(state, eval_set) -> {'loss', 'accuracy', 'num_examples'} over the whole split."""
    batch_sharding = NamedSharding(mesh, P("data"))

    @functools.partial(jax.jit, static_argnames=("batch_size",))
    def batch_sums(state, images, labels, mask, index, batch_size):
        take = lambda a: jax.lax.with_sharding_constraint(
            jax.lax.dynamic_slice_in_dim(a, index * batch_size, batch_size), batch_sharding)
        batch = {"image": to_float_images(take(images)), "label": take(labels), "mask": take(mask)}
        return eval_step(state, batch, loss_fn=loss_fn)

    def evaluate(state: TrainState, eval_set: EvalSet) -> dict:
        total = None
        for b in range(eval_set.num_batches):
            sums = batch_sums(state, eval_set.images, eval_set.labels, eval_set.mask, b,
                              batch_size=eval_set.batch_size)
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        return summarize_eval(jax.device_get(total))

    return evaluate


# --------------------------------------------------------------------------------------
# Config checks, done before any expensive work.


def _numbers(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every number in a config, elements of tuples included."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            yield from _numbers(value, name + ".")
        elif isinstance(value, (list, tuple)):
            yield from ((f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, (int, float)))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, value


# Ranges of fields not checked where they are used: name -> (low, high, low inclusive, high inclusive).
FIELD_RANGES = {"optimizer.momentum": (0.0, 1.0, True, False), "optimizer.b1": (0.0, 1.0, True, False),
                "optimizer.b2": (0.0, 1.0, True, False), "optimizer.rms_decay": (0.0, 1.0, True, False),
                "optimizer.eps": (0.0, math.inf, True, False), "schedule.final_lr_fraction": (0.0, 1.0, True, True),
                "dataset.validation_size": (0, math.inf, True, False),
                "early_stopping.min_delta": (0.0, 1.0, True, False), "seed": (0, 2**32 - 1, True, True)}


def _check_numbers(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for a NaN or infinite number anywhere in `config`, or a value outside FIELD_RANGES."""
    for name, value in _numbers(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config.{name} is {value}; set it to a finite number")
    for name, (low, high, low_in, high_in) in FIELD_RANGES.items():
        node = config
        for part in name.split("."):
            node = node.get(part) if isinstance(node, (dict, ml_collections.ConfigDict)) else None
        if node is None:
            continue
        inside = (low <= node if low_in else low < node) and (node <= high if high_in else node < high)
        if isinstance(node, bool) or not isinstance(node, (int, float)) or not inside:
            span = f"{'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
            raise ConfigError(f"config.{name} must be in {span}, got {node!r}")
    if not isinstance(config.seed, int):
        raise ConfigError(f"config.seed must be a whole number, got {config.seed!r}")


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError (one line naming the fix) for sizes, rates and names that cannot work."""
    _check_numbers(config)
    for field in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps"):
        value = config[field]
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"config.{field} must be a positive integer, got {value!r}")
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % num_devices:
            raise ConfigError(f"config.{field}={config[field]} does not divide over {num_devices} devices; "
                              f"use a multiple of {num_devices}")
    if config.checkpoint.every_steps < 0 or config.checkpoint.keep <= 0:
        raise ConfigError("config.checkpoint.every_steps must be >= 0 and config.checkpoint.keep > 0")
    if config.early_stopping.patience_epochs < 0:
        raise ConfigError("config.early_stopping.patience_epochs must be >= 0")
    if config.dataset.limit_train < 0:
        raise ConfigError("config.dataset.limit_train must be >= 0")
    examples = config.batch_stats_examples
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
        raise ConfigError(f"config.batch_stats_examples must be a whole number >= 0 (0 keeps the running "
                          f"statistics), got {examples!r}")
    if 0 < examples < config.eval_batch_size:
        raise ConfigError(f"config.batch_stats_examples={examples} is less than one batch of "
                          f"config.eval_batch_size={config.eval_batch_size}; use 0 or at least {config.eval_batch_size}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"config.ema_decay must be in [0, 1) (0 keeps no moving average), got {config.ema_decay!r}")
    if config.parallel not in parallel.MODES:
        raise ConfigError(f"unknown config.parallel {config.parallel!r}; use one of {list(parallel.MODES)}")
    # Building these checks every name (model, loss, optimizer, schedule, augment ranges).
    models_lib.create_model(config.model, num_classes=10, dtype=config.dtype)
    losses_lib.get_loss(config.loss)
    optim_lib.make_optimizer(config, optim_lib.make_schedule(config, 100, config.num_epochs))
    augment_lib.AugmentParams.from_config(config.augment)


def check_workdir(workdir: str) -> None:
    """Creates `workdir` and proves it is writable, or raises ConfigError."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"workdir {workdir} cannot be written ({e.strerror}); pass a --workdir you can write to")


# Config fields added after runs were made, with the value that behaves as runs without the field
# did: a saved config lacking one of them is the same run as a current config holding that value.
ADDED_FIELDS = {"model.space_to_depth": False, "model.pool_before_norm": False, "model.crop_border": 0,
                "ema_decay": 0.0, "batch_stats_examples": 0,
                "augment.stroke_thicken_px": 0.0, "augment.stroke_thin_px": 0.0, "augment.aspect": 0.0,
                "augment.stretch_prob": 0.0, "augment.resolution_prob": 0.0, "augment.resolution_min_px": 8.0,
                "augment.resolution_max_px": 16.0, "augment.binarize_prob": 0.0, "augment.quantize_prob": 0.0}


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Lists 'field: saved -> current' for every field that differs between two config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        name = f"{prefix}{key}"
        if a == "<absent>" and name in ADDED_FIELDS and b == ADDED_FIELDS[name]:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, name + "."))
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def _config_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


# --------------------------------------------------------------------------------------
# Preemption: SIGTERM / Ctrl-C save a checkpoint and stop cleanly.


# Test hook: HWRJAX_TEST_SIGNAL_AT_STEP="STEP:SIGNAL" (e.g. "40:SIGKILL") makes the training loop send
# SIGNAL to its own process right after step STEP (and that step's validation and checkpoint calls),
# so tests interrupt a run at a chosen step instead of racing the clock. Unset, it costs nothing.
SIGNAL_AT_STEP_ENV = "HWRJAX_TEST_SIGNAL_AT_STEP"


def signal_at_step_hook() -> tuple[int, signal.Signals] | None:
    """(step, signal) from $HWRJAX_TEST_SIGNAL_AT_STEP, or None when it is unset or empty."""
    value = os.environ.get(SIGNAL_AT_STEP_ENV, "")
    if not value:
        return None
    step, _, name = value.partition(":")
    try:
        return int(step), signal.Signals[name]
    except (ValueError, KeyError):
        raise ConfigError(f"{SIGNAL_AT_STEP_ENV}={value!r} is not STEP:SIGNAL (e.g. 40:SIGTERM); "
                          "fix or unset it") from None


class _StopSignal:
    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # Not the main thread: leave signals alone.
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # A second Ctrl-C stops at once.
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# --------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False) -> dict:
    """Trains the recipe in `config`, resuming from `workdir` if it holds a run; returns the test metrics.

    One run at a time per workdir: the run holds the workdir's lock (hwrjax.runlock) from
    before its config check to its end, and a second launch raises WorkdirBusy. Raises
    Diverged when the loss or gradient norm stops being finite (nothing non-finite is saved).
    """
    start_time = time.time()
    mesh = parallel.make_mesh()
    validate_config(config, mesh.devices.size)
    signal_at_step_hook()  # a malformed test hook is refused before any work
    check_workdir(workdir)
    lock = None
    busy = None
    try:
        if jax.process_index() == 0:  # the other processes of a run are part of the same run
            lock = runlock.acquire(workdir)
    except WorkdirBusy as e:
        busy = e
    if parallel.any_process(busy is not None):
        raise busy or WorkdirBusy(f"{workdir} is in use by another run (process 0 was refused its lock)")
    try:
        return _train_and_evaluate(config, workdir, allow_config_change, mesh, start_time)
    finally:
        if lock is not None:
            lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool,
                        mesh: jax.sharding.Mesh, start_time: float) -> dict:
    num_devices = mesh.devices.size
    is_main = jax.process_index() == 0

    config_path = os.path.join(workdir, "config.json")
    current = _config_dict(config)
    rewrite_config = not os.path.exists(config_path)
    if not rewrite_config:
        saved = checkpoint_lib.read_config_json(config_path)
        diffs = config_differences(saved, current)
        if diffs and not allow_config_change:
            raise ConfigError(f"{workdir} holds a run with a different config ({'; '.join(diffs)}); "
                              "use a new --workdir, or pass --allow_config_change to continue anyway")
        if diffs:
            # config.json then says how the run goes on; the change is in the log.
            logging.warning("Continuing %s with a changed config: %s", workdir, "; ".join(diffs))
            rewrite_config = True
    parallel.check_same_config_across_processes(config.to_json())

    splits = data_lib.load_splits(config)
    if len(splits.train) < config.batch_size:
        raise ConfigError(f"config.batch_size={config.batch_size} is larger than the {len(splits.train)} "
                          "training examples; lower it")
    steps_per_epoch = len(splits.train) // config.batch_size
    total_steps = steps_per_epoch * config.num_epochs

    keys = rng_lib.RunKeys.from_seed(config.seed)
    use_pmap = config.parallel == "pmap"
    model = models_lib.create_model(config.model, splits.num_classes, dtype=config.dtype,
                                    bn_axis_name=PMAP_AXIS if use_pmap else None)
    loss_fn = losses_lib.get_loss(config.loss)
    schedule = optim_lib.make_schedule(config, steps_per_epoch, config.num_epochs)
    tx = optim_lib.make_optimizer(config, schedule)
    aug = augment_lib.AugmentParams.from_config(config.augment)

    replicated = NamedSharding(mesh, P())
    ema_decay = float(config.ema_decay)

    def init(k):
        state_ = create_train_state(model, tx, k, (1,) + data_lib.IMAGE_SHAPE)
        return init_ema(state_) if ema_decay else state_

    state = jax.jit(init, out_shardings=replicated)(keys.init)

    ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    meta = {"best_val_accuracy": -1.0, "best_step": -1, "epochs_without_improvement": 0, "stopped_early": False,
            "wall_time_s": 0.0}
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, saved_meta = restored
        meta.update(saved_meta)
        logging.info("Resuming from step %d of %d in %s.", int(state.step), total_steps, workdir)
    step = int(jax.device_get(state.step))

    # Written only now, under the lock, once the workdir's checkpoints are known to fit this config:
    # a launch that fails earlier leaves a workdir's config.json (or its absence) as it was.
    if is_main and rewrite_config:
        with open(config_path + ".tmp", "w") as f:
            f.write(config.to_json(indent=2))
        os.replace(config_path + ".tmp", config_path)

    train_images = parallel.put_replicated(splits.train.images, replicated)
    train_labels = parallel.put_replicated(splits.train.labels, replicated)
    val_set = EvalSet(splits.validation, config.eval_batch_size, mesh) if splits.validation else None
    test_set = EvalSet(splits.test, config.eval_batch_size, mesh)
    if use_pmap:
        local = jax.local_devices()
        pmapped = make_fused_pmap_step(loss_fn, aug, keys, len(splits.train), config.batch_size, ema_decay)
        images_p = parallel.replicate_for_pmap(splits.train.images, local)
        labels_p = parallel.replicate_for_pmap(splits.train.labels, local)
        order_cache: dict = {}

        def run_step(s, step_):
            epoch = step_ // steps_per_epoch
            if order_cache.get("epoch") != epoch:  # the order changes once per epoch
                order = epoch_order(keys.order, epoch, len(splits.train))
                order_cache.update(epoch=epoch, value=parallel.replicate_for_pmap(order, local))
            return pmapped(s, images_p, labels_p, order_cache["value"])

        to_run_state = lambda s: parallel.replicate_for_pmap(s, local)
        from_run_state = lambda s: jax.device_put(jax.tree.map(lambda x: x[0], s), replicated)
        fetch_metrics = lambda ms: [jax.tree.map(lambda x: x[0], m) for m in jax.device_get(ms)]
    else:
        step_fn = make_step_fn(loss_fn, keys, ema_decay)
        pipeline = InputPipeline(make_batch_fn(aug, keys, len(splits.train), config.batch_size, mesh),
                                 train_images, train_labels, keys.order, len(splits.train), steps_per_epoch,
                                 total_steps)

        def run_step(s, step_):
            return step_fn(s, pipeline.batch(step_))

        to_run_state = from_run_state = lambda s: s
        fetch_metrics = jax.device_get
    evaluate = make_evaluate(loss_fn, mesh)
    stats_images = (parallel.put_replicated(splits.train.images[:config.batch_stats_examples], replicated)
                    if config.batch_stats_examples else None)

    def delivered(state_: TrainState) -> TrainState:
        """The weights a run validates, selects, reports and delivers: the moving average when one
        is kept, with BatchNorm statistics recomputed on clean training images when asked."""
        state_ = averaged(state_)
        if not config.batch_stats_examples or not state_.batch_stats:
            return state_
        return state_.replace(batch_stats=batch_stats_lib.recompute_batch_stats(
            state_.apply_fn, state_.params, state_.batch_stats, stats_images, config.eval_batch_size,
            batch_sharding=NamedSharding(mesh, P("data"))))

    logger = MetricLogger(workdir, enabled=is_main, total_steps=total_steps,
                          progress=config.progress and sys.stderr.isatty(), resume_step=step)
    logging.info("Training %s (%d parameters) on %d device(s) in %d process(es): %d steps of batch %d.",
                 config.model.name, sum(x.size for x in jax.tree.leaves(state.params)), num_devices,
                 jax.process_count(), total_steps, config.batch_size)

    def diverged(at_step: int, what: str) -> Diverged:
        last = ckpt.latest_step()
        again = f"resume from step {last}, the last saved" if last is not None else "start again"
        return Diverged(f"training diverged at step {at_step} ({what}); nothing non-finite was saved; rerun with a "
                        f"lower --config.optimizer.learning_rate and --allow_config_change to {again}")

    def check_finite(fetched: list[dict], last_step: int) -> None:
        """Raises Diverged at the first of the steps ending at `last_step` whose loss or grad norm is not finite."""
        for i, m in enumerate(fetched):
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise diverged(last_step - len(fetched) + 1 + i, f"loss {loss}, gradient norm {grad_norm}")

    def save(step_: int, run_state_: TrainState) -> None:
        if pending:  # every step up to a saved one is checked: non-finite weights are never saved
            check_finite(fetch_metrics(pending), step_)
        try:
            ckpt.save(step_, from_run_state(run_state_),
                      dict(meta, wall_time_s=meta["wall_time_s"] + time.time() - session_start))
        except Diverged as e:
            raise diverged(step_, str(e).split("; ")[0]) from None

    session_start = time.time()
    finished = meta["stopped_early"] or step >= total_steps
    if finished:
        logging.info("The run in %s already finished at step %d; reporting its test metrics.", workdir, step)
    pending: list[dict] = []
    signal_at = signal_at_step_hook()
    last_log_time, last_log_step = time.time(), step
    state = to_run_state(state)
    try:
        with _StopSignal() as stop, logger:
            while step < total_steps and not meta["stopped_early"]:
                state, metrics = run_step(state, step)
                step += 1
                pending.append(metrics)
                if step % config.log_every_steps == 0 or step % steps_per_epoch == 0:
                    fetched = fetch_metrics(pending)
                    check_finite(fetched, step)
                    pending = []
                    now = time.time()
                    row = {f"train_{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                    rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
                    row.update(learning_rate=float(schedule(step - 1)), steps_per_sec=rate,
                               images_per_sec=rate * config.batch_size,
                               time_left_s=(total_steps - step) / max(rate, 1e-9))
                    logger.write(step, row)
                    last_log_time, last_log_step = now, step
                epoch_end = step % steps_per_epoch == 0
                if epoch_end and val_set is not None:
                    chosen = delivered(from_run_state(state))
                    val = evaluate(chosen, val_set)
                    logger.write(step, {"val_loss": val["loss"], "val_accuracy": val["accuracy"],
                                        "epoch": step // steps_per_epoch})
                    improved = val["accuracy"] > meta["best_val_accuracy"] + config.early_stopping.min_delta
                    if improved:
                        meta.update(best_val_accuracy=val["accuracy"], best_step=step, epochs_without_improvement=0)
                        try:
                            ckpt.save_best(step, with_delivered_batch_stats(from_run_state(state), chosen.batch_stats),
                                           dict(meta))
                        except Diverged:
                            raise diverged(step, "non-finite weights") from None
                    else:
                        meta["epochs_without_improvement"] += 1
                    patience = config.early_stopping.patience_epochs
                    if patience and meta["epochs_without_improvement"] >= patience:
                        meta["stopped_early"] = True
                        logging.info("Early stop at epoch %d: no validation gain for %d epochs.",
                                     step // steps_per_epoch, patience)
                every = config.checkpoint.every_steps
                if epoch_end or (every and step % every == 0) or meta["stopped_early"]:
                    save(step, state)
                if signal_at is not None and step == signal_at[0]:
                    signal.raise_signal(signal_at[1])
                if stop.received is not None:
                    save(step, state)
                    ckpt.wait()
                    raise Preempted(f"stopped by signal {stop.received} at step {step}; checkpoint saved in "
                                    f"{workdir}; rerun the same command to resume")
            if step >= total_steps or meta["stopped_early"]:
                save(step, state)
    finally:
        ckpt.close()
    state = from_run_state(state)

    # The final report uses the best validation checkpoint when there is one (selection
    # never looks at test), else the last state; with ema_decay > 0, their moving averages (and
    # with batch_stats_examples > 0, the statistics recomputed for them, which `best` holds).
    report_step = step
    if val_set is None or meta["best_step"] < 0 or meta["best_step"] == step:
        report_state = delivered(state)  # recomputed statistics only when the last state is reported
    else:
        report_step = int(meta["best_step"])
        variables, _ = checkpoint_lib.load_variables(workdir, "best")
        # Every process loaded the same checkpoint: place it on all devices of the run, including
        # those of other processes (a plain device_put cannot reach them).
        to_run = lambda tree: jax.tree.map(lambda x: parallel.put_replicated(np.asarray(x), replicated), tree)
        report_state = state.replace(params=to_run(variables["params"]), batch_stats=to_run(variables["batch_stats"]),
                                     ema={})
    test = evaluate(report_state, test_set)
    wall = meta["wall_time_s"] + (0.0 if finished else time.time() - session_start)
    test.update(step=step, checkpoint_step=report_step,
                split=config.dataset.test_split, dataset=config.dataset.name,
                probabilities=losses_lib.describe_probabilities(config.loss.name), wall_time_s=wall,
                total_time_s=time.time() - start_time,
                best_val_accuracy=meta["best_val_accuracy"], num_params=int(sum(
                    x.size for x in jax.tree.leaves(state.params))))
    if is_main:
        from hwrjax import calibration as calibration_lib
        from hwrjax import evaluate as evaluate_lib

        delivered_model = evaluate_lib.as_loaded_model(report_state, config.loss.name)
        if val_set is not None:
            # The temperature that calibrates the reported model's probabilities, fitted on validation and
            # stored with the run for every command that loads this checkpoint (hwrjax.calibration).
            record = evaluate_lib.fit_calibration(delivered_model, splits.validation.images, splits.validation.labels,
                                                  batch_size=config.eval_batch_size)
            calibration_lib.save_calibration(workdir, report_step, record)
            delivered_model = evaluate_lib.with_temperature(delivered_model, record["temperature"], record)
            test["temperature"] = record["temperature"]
        logger.write_report("test_metrics.json", test)
        logger.write(step, {"test_accuracy": test["accuracy"], "test_loss": test["loss"]})
        logger.close()
        if config.report_plots:
            probs = evaluate_lib.predict_probs(delivered_model, splits.test.images, batch_size=config.eval_batch_size)
            evaluate_lib.write_training_report(workdir, None, evaluate_lib.SplitPredictions(
                splits.test.images, splits.test.labels, probs, splits.class_names, "test"), step=step)
    logging.info("Test accuracy %.4f (loss %.4f) on %d examples.", test["accuracy"], test["loss"],
                 test["num_examples"])
    return test
