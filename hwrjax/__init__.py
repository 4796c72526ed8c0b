"""hwrjax: a JAX functional training library for handwritten digit recognition.

Use the pure, jit-compiled steps with your own Flax module and optax optimizer::

    import hwrjax, optax
    state = hwrjax.create_train_state(my_module, optax.adam(1e-3), jax.random.key(0))
    state, metrics = hwrjax.train_step(state, {"image": x, "label": y}, jax.random.key(1))
    sums = hwrjax.eval_step(state, {"image": x, "label": y})
"""

import functools as _functools

import jax as _jax

from hwrjax import train as _train
from hwrjax.augment import AugmentParams, augment_batch
from hwrjax.batch_stats import recompute_batch_stats
from hwrjax.checkpoint import load_config, load_variables
from hwrjax.errors import CheckpointError, ConfigError, DataError, HwrjaxError
from hwrjax.losses import cross_entropy, get_loss, huber, mean_squared_error, multiclass_hinge
from hwrjax.models import MLP, ConvNet, ResNet, create_model
from hwrjax.optim import make_optimizer, make_schedule
from hwrjax.rng import RunKeys
from hwrjax.train import (TrainState, averaged, create_train_state, init_ema, summarize_eval, train_and_evaluate,
                          update_ema)

# jit-compiled pure steps; `loss_fn` (a per-example loss) is static.
train_step = _jax.jit(_train.train_step, static_argnames=("loss_fn",))
eval_step = _jax.jit(_train.eval_step, static_argnames=("loss_fn",))

__version__ = "0.1.0"

__all__ = [
    "AugmentParams", "CheckpointError", "ConfigError", "ConvNet", "DataError", "HwrjaxError", "MLP", "ResNet",
    "RunKeys", "TrainState", "augment_batch", "averaged", "create_model", "create_train_state", "cross_entropy",
    "eval_step", "get_loss", "huber", "init_ema", "load_config", "load_variables", "make_optimizer", "make_schedule",
    "mean_squared_error", "multiclass_hinge", "recompute_batch_stats", "summarize_eval", "train_and_evaluate",
    "train_step", "update_ema",
]
