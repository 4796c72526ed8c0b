"""hwrjax: a JAX functional training library for handwritten digit recognition.

Use the pure, jit-compiled steps with your own Flax module and optax optimizer::

    import hwrjax, optax
    state = hwrjax.create_train_state(my_module, optax.adam(1e-3), jax.random.key(0))
    state, metrics = hwrjax.train_step(state, {"image": x, "label": y}, jax.random.key(1))
    sums = hwrjax.eval_step(state, {"image": x, "label": y})

`import hwrjax` loads the core and the models only (jax, flax, optax); the names of higher layers
(`train_and_evaluate`, `load_config`, `load_variables`, `Recognizer`) load theirs (TensorFlow
datasets, Orbax, ml_collections, ...) on first use. The layers are described in docs/ARCHITECTURE.md.
"""

import importlib as _importlib

import jax as _jax

from hwrjax.core import errors, losses, optim
from hwrjax.core import steps as _steps
from hwrjax.core.augment import AugmentParams, augment_batch
from hwrjax.core.batch_stats import recompute_batch_stats
from hwrjax.core.errors import CheckpointError, ConfigError, DataError, HwrjaxError
from hwrjax.core.losses import cross_entropy, get_loss, huber, mean_squared_error, multiclass_hinge
from hwrjax.core.optim import make_optimizer, make_schedule
from hwrjax.core.rng import RunKeys
from hwrjax.core.steps import summarize_eval
from hwrjax.core.train_state import TrainState, averaged, create_train_state, init_ema, update_ema
from hwrjax.models import MLP, ConvNet, ResNet, create_model

# jit-compiled pure steps; `loss_fn` (a per-example loss) is static.
train_step = _jax.jit(_steps.train_step, static_argnames=("loss_fn",))
eval_step = _jax.jit(_steps.eval_step, static_argnames=("loss_fn",))

# Names of higher layers, imported on first use: name -> module.
_LAZY = {
    "train_and_evaluate": "hwrjax.apps.train",
    "load_config": "hwrjax.training.checkpoint",
    "load_variables": "hwrjax.training.checkpoint",
    "Recognizer": "hwrjax.apps.recognize",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hwrjax' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "AugmentParams", "CheckpointError", "ConfigError", "ConvNet", "DataError", "HwrjaxError", "MLP", "Recognizer",
    "ResNet", "RunKeys", "TrainState", "augment_batch", "averaged", "create_model", "create_train_state",
    "cross_entropy", "errors", "eval_step", "get_loss", "huber", "init_ema", "load_config", "load_variables",
    "losses", "make_optimizer", "make_schedule", "mean_squared_error", "models", "multiclass_hinge", "optim",
    "recompute_batch_stats", "summarize_eval", "train_and_evaluate", "train_step", "update_ema",
]
