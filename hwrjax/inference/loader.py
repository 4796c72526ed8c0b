"""The one way to load a trained model: `load_model(workdir, which)` -> a `LoadedModel`.

A `LoadedModel` holds the Linen module built for inference (config.json's model and dtype), its
`apply`, its variables on the host (the moving average of the weights when the run kept one), the
class count read from the checkpoint (every shape checked against config.json), the loss it was
trained with (which says how its logits are read as probabilities) and its stored temperature.
Every command and application loads through it (evaluate, calibrate, predict and the Recognizer,
serve, export, finetune). `as_loaded_model` also takes a TrainState (its moving average when it
keeps one).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hwrjax import models as models_lib
from hwrjax.core import losses as losses_lib
from hwrjax.core.errors import CheckpointError
from hwrjax.inference import calibration as calibration_lib
from hwrjax.training import checkpoint as checkpoint_lib


IMAGE_SHAPE = (28, 28, 1)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A trained classifier ready for inference: `apply_fn(variables, images01, train=False) -> logits`.

    `loss` is the config.loss.name it was trained with, which says how its logits are read as
    probabilities (`hwrjax.core.losses.probabilities`: a softmax, or normalized sigmoids for bce);
    `temperature` divides the logits first for calibrated predictions (see hwrjax.inference.calibration);
    `calibration` is the stored record it came from (None: T = 1, not fitted).
    """

    apply_fn: Callable[..., Any]
    variables: dict
    num_classes: int
    module: Any = None  # the Linen module whose `apply` is apply_fn (None when made from a TrainState)
    workdir: str | None = None
    config: Any = None
    step: int | None = None
    temperature: float = calibration_lib.UNCALIBRATED
    calibration: dict | None = None
    loss: str = "cross_entropy"


# Equal Linen modules share one instance, so their bound `apply` compares equal and the
# jit cache (keyed by the static apply_fn) is shared by runs of the same architecture.
_MODULES: dict[Any, Any] = {}


def _shared_module(module: Any) -> Any:
    return _MODULES.setdefault(module, module)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(np.shape(x)) for path, x in leaves}


def _abstract_shapes(config: Any, num_classes: int) -> dict[str, tuple[int, ...]]:
    model = models_lib.create_model(config.model, num_classes, dtype=config.dtype)
    init = lambda k: model.init({"params": k, "dropout": k}, jnp.zeros((1,) + IMAGE_SHAPE), train=False)
    return _shapes(jax.eval_shape(init, jax.random.key(0)))


def _num_classes_of(workdir: str, config: Any, variables: dict) -> int:
    """Reads the class count from the checkpoint and checks every shape against config.json."""
    one, two = _abstract_shapes(config, 1), _abstract_shapes(config, 2)
    loaded = _shapes({k: v for k, v in variables.items() if v})
    head = [k for k in one if one[k] != two.get(k)]
    if set(loaded) != set(one) or not head or any(k not in loaded for k in head):
        extra = sorted(set(loaded) ^ set(one))[:1]
        raise CheckpointError(f"the checkpoint in {workdir} does not match its config.json (parameter "
                              f"{extra[0] if extra else '?'} differs); was config.json edited after training?")
    num_classes = loaded[head[0]][-1]
    for key, shape in one.items():
        want = shape[:-1] + (num_classes,) if key in head else shape
        if loaded[key] != want:
            raise CheckpointError(f"the checkpoint in {workdir} does not match its config.json ({key}: "
                                  f"checkpoint {loaded[key]}, config {want}); was config.json edited after training?")
    return int(num_classes)


def _on_host(tree: Any) -> Any:
    """Local numpy copies (replicated arrays of a multi-process run included)."""

    def local(x):
        if isinstance(x, jax.Array):
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(local, tree)


def _inference_variables(params: Any, batch_stats: Any) -> dict:
    variables = {"params": _on_host(params)}
    if batch_stats:
        variables["batch_stats"] = _on_host(batch_stats)
    return variables


def load_model(workdir: str, which: str | int = "best") -> LoadedModel:
    """Loads the best, latest or a given step's checkpoint of `workdir` for inference (`which`: "best",
    "latest", a step number or its digits); every problem is one CheckpointError line."""
    which = checkpoint_lib.parse_choice(which)
    config = checkpoint_lib.load_config(workdir)
    variables, step = checkpoint_lib.load_variables(workdir, which)
    config.dtype = config.get("dtype", "float32")  # configs older than the dtype field trained in float32
    try:
        num_classes = _num_classes_of(workdir, config, variables)
        module = _shared_module(models_lib.create_model(config.model, num_classes, dtype=config.dtype))
    except (KeyError, AttributeError, TypeError, IndexError) as e:  # a config.json edited by hand
        raise CheckpointError(f"the checkpoint in {workdir} does not match its config.json ({e}); "
                              "pass the workdir the checkpoint was trained in") from None
    temperature, record = calibration_lib.load_temperature(workdir, int(step))
    return LoadedModel(apply_fn=module.apply, module=module,
                       variables=_inference_variables(variables["params"], variables.get("batch_stats")),
                       num_classes=num_classes, workdir=workdir, config=config, step=int(step),
                       temperature=temperature, calibration=record, loss=str(config.loss.name))


def as_loaded_model(model: str | LoadedModel | Any, loss: str = "cross_entropy") -> LoadedModel:
    """A LoadedModel from a workdir (best checkpoint), a LoadedModel, or a TrainState-like object
    (its moving average of the weights when it keeps one, as a checkpoint of it would give).

    `loss` is the config.loss.name a TrainState was trained with (a workdir's and a LoadedModel's
    own are used for them).
    """
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(os.fspath(model))
    if all(hasattr(model, a) for a in ("apply_fn", "params")):
        ema = getattr(model, "ema", None)
        params, batch_stats = ((ema["params"], ema["batch_stats"]) if ema
                               else (model.params, getattr(model, "batch_stats", None)))
        variables = _inference_variables(params, batch_stats)
        out = jax.eval_shape(lambda v: model.apply_fn(v, jnp.zeros((1,) + IMAGE_SHAPE), train=False), variables)
        losses_lib.probabilities(jnp.zeros((1, 1)), loss)  # an unknown loss fails here, before any work
        return LoadedModel(apply_fn=model.apply_fn, variables=variables, num_classes=int(out.shape[-1]), loss=loss)
    raise TypeError(f"expected a workdir, a LoadedModel or a TrainState, got {type(model).__name__}")


def with_temperature(model: str | LoadedModel | Any, temperature: float, record: dict | None = None) -> LoadedModel:
    """`model` as a LoadedModel whose calibrated predictions use `temperature`."""
    return dataclasses.replace(as_loaded_model(model), temperature=float(temperature), calibration=record)
