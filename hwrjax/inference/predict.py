"""Predictions of trained models: probabilities, test-time augmentation and ensembles.

* `predict_probs(model, images)`: class probabilities of a trained run (a workdir, a
  `LoadedModel` or a TrainState), jit-compiled once for fixed-size padded batches; read from
  the logits as its loss says (`hwrjax.core.losses.probabilities`: softmax, or normalized
  sigmoids for bce), at the model's fitted temperature unless asked otherwise.
* Test-time augmentation with K views: view 0 is the image itself, views 1..K-1 apply one
  fixed mild affine transform each (`TTA_AUGMENT`, keyed by `fold_in(key(TTA_SEED), view)`)
  to every image alike, so an image's prediction never depends on its batch or position.
  K = 0 and K = 1 both mean no augmentation.
* `ensemble_probs(models, images)`: the mean of the members' probabilities.
* `fit_calibration(model, images, labels)`: the temperature of a model fitted on a held-out split.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from hwrjax.core import augment as augment_lib
from hwrjax.core.errors import CheckpointError, DataError, HwrjaxError
from hwrjax.inference import calibration as calibration_lib
from hwrjax.inference import metrics as metrics_lib
from hwrjax.inference.loader import IMAGE_SHAPE, LoadedModel, as_loaded_model


# Mild ranges: a digit stays clearly itself under every view.
TTA_AUGMENT = augment_lib.AugmentParams(rotation_deg=8.0, scale=0.08, translate_px=1.5)
TTA_SEED = 0


def _as_unit_float(images: jnp.ndarray) -> jnp.ndarray:
    """uint8 pixels -> [0, 1]; float images are taken as already in [0, 1]."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _batch_logits(apply_fn: Callable, variables: dict, images: jnp.ndarray) -> jnp.ndarray:
    return apply_fn(variables, _as_unit_float(images), train=False).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("apply_fn", "augment", "loss"))
def _batch_probs(apply_fn: Callable, variables: dict, images: jnp.ndarray, num_views: jnp.ndarray,
                 augment: augment_lib.AugmentParams | None, temperature: jnp.ndarray, loss: str) -> jnp.ndarray:
    """Mean probabilities, at T = 1 and at `temperature` ([2, B, C]), over view 0 (identity) and
    views 1..num_views-1 (one fixed transform each).

    With `augment=None` only view 0 is computed (a smaller program to compile).
    """
    x = _as_unit_float(images)
    temperatures = jnp.stack([jnp.float32(calibration_lib.UNCALIBRATED), temperature.astype(jnp.float32)])

    def probs(view_images):
        logits = apply_fn(variables, view_images, train=False)
        return calibration_lib.probabilities(logits[None], temperatures[:, None, None], loss)

    if augment is None:
        return probs(x)
    base = jax.random.key(TTA_SEED)

    def add_view(view, total):
        key = jax.random.fold_in(base, view)
        # The key is not batched, so every image gets the same transform in this view.
        moved = jax.vmap(lambda im: augment_lib.augment_batch(im[None], key, augment)[0])(x)
        return total + probs(moved)

    total = jax.lax.fori_loop(1, num_views, add_view, probs(x))
    return total / num_views.astype(jnp.float32)


def _check_images(images: Any) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"images must have shape [N, 28, 28, 1] or [N, 28, 28], got {np.shape(images)}")
    if arr.dtype == np.float32:
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise DataError("float32 images must hold values in [0, 1] (MNIST form); pass uint8 pixels otherwise")
    elif arr.dtype != np.uint8:
        raise DataError(f"images must be uint8 pixels in [0, 255] or float32 in [0, 1], got dtype {arr.dtype}")
    return arr


def check_count(value: Any, name: str, minimum: int) -> int:
    """`value` as an int; raises HwrjaxError naming `name` unless it is a whole number >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise HwrjaxError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _padded_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of one shape (one compile); small inputs use a power-of-two batch; the last is zero-padded."""
    n = images.shape[0]
    batch = min(batch_size, 1 << (n - 1).bit_length())
    for start in range(0, n, batch):
        chunk = images[start:start + batch]
        if chunk.shape[0] < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - chunk.shape[0],) + IMAGE_SHAPE, chunk.dtype)])
        yield chunk


def predict_both(model: str | LoadedModel | Any, images: np.ndarray, batch_size: int = 1000,
                 tta: int = 0, loss: str = "cross_entropy") -> tuple[np.ndarray, np.ndarray]:
    """(uncalibrated, calibrated) probabilities [N, C] (float32) from one pass over the images.

    Images are uint8 [N, 28, 28(, 1)] in [0, 255] or float32 in [0, 1]; K-view TTA if tta > 1
    (each view calibrated, then averaged). Calibrated means at the model's `temperature`. `loss` is
    the config.loss.name a TrainState was trained with (see `as_loaded_model`).
    """
    loaded = as_loaded_model(model, loss)
    images = _check_images(images)
    batch_size = check_count(batch_size, "batch_size", 1)
    num_views = max(1, check_count(tta, "tta", 0))
    n = images.shape[0]
    if n == 0:
        empty = np.zeros((0, loaded.num_classes), np.float32)
        return empty, empty
    variables = jax.device_put(loaded.variables)
    views = jnp.asarray(num_views, jnp.int32)
    temperature = jnp.asarray(loaded.temperature, jnp.float32)
    out = [_batch_probs(loaded.apply_fn, variables, chunk, views, TTA_AUGMENT if num_views > 1 else None, temperature,
                        loaded.loss)
           for chunk in _padded_batches(images, batch_size)]
    both = np.concatenate([np.asarray(p) for p in out], axis=1)[:, :n]
    return both[0], both[1]


def predict_probs(model: str | LoadedModel | Any, images: np.ndarray, batch_size: int = 1000,
                  tta: int = 0, calibrated: bool = True, loss: str = "cross_entropy") -> np.ndarray:
    """Probabilities [N, C] (float32) of images [N, 28, 28(, 1)] (uint8, or float32 in [0, 1]), with
    K-view TTA if tta > 1; at the model's fitted temperature unless `calibrated` is False. `loss` is
    the config.loss.name a TrainState was trained with (see `as_loaded_model`)."""
    raw, scaled = predict_both(model, images, batch_size=batch_size, tta=tta, loss=loss)
    return scaled if calibrated else raw


def predict_logits(model: str | LoadedModel | Any, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Logits [N, C] (float32) of images [N, 28, 28(, 1)] (uint8, or float32 in [0, 1]), no TTA."""
    loaded = as_loaded_model(model)
    images = _check_images(images)
    batch_size = check_count(batch_size, "batch_size", 1)
    n = images.shape[0]
    if n == 0:
        return np.zeros((0, loaded.num_classes), np.float32)
    variables = jax.device_put(loaded.variables)
    out = [_batch_logits(loaded.apply_fn, variables, chunk) for chunk in _padded_batches(images, batch_size)]
    return np.concatenate([np.asarray(z) for z in out])[:n]


def check_same_dataset(models: Sequence[LoadedModel]) -> None:
    """Raises CheckpointError unless all models were trained on one dataset with one class count."""
    first = models[0]
    for other in models[1:]:
        a = first.config.dataset.name if first.config is not None else None
        b = other.config.dataset.name if other.config is not None else None
        if a != b:
            raise CheckpointError(f"ensemble members were trained on different datasets: {first.workdir} on "
                                  f"{a!r}, {other.workdir} on {b!r}; pass workdirs of runs on one dataset")
        if first.num_classes != other.num_classes:
            raise CheckpointError(f"ensemble members predict different numbers of classes: {first.workdir} "
                                  f"{first.num_classes}, {other.workdir} {other.num_classes}")


def ensemble_both(models: Sequence[str | LoadedModel | Any], images: np.ndarray, batch_size: int = 1000,
                  tta: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The means of the members' `predict_both` (uncalibrated, calibrated); members must share a dataset.

    Each member is calibrated with its own temperature before the mean.
    """
    loaded = [as_loaded_model(m) for m in models]
    if not loaded:
        raise HwrjaxError("an ensemble needs at least one model")
    check_same_dataset(loaded)
    pairs = [predict_both(m, images, batch_size=batch_size, tta=tta) for m in loaded]
    mean = lambda ps: np.mean(np.stack(ps).astype(np.float64), axis=0).astype(np.float32)
    return mean([raw for raw, _ in pairs]), mean([scaled for _, scaled in pairs])


def ensemble_probs(models: Sequence[str | LoadedModel | Any], images: np.ndarray, batch_size: int = 1000,
                   tta: int = 0, calibrated: bool = True) -> np.ndarray:
    """The mean of the members' `predict_probs` [N, C] (float32); members must share a dataset."""
    raw, scaled = ensemble_both(models, images, batch_size=batch_size, tta=tta)
    return scaled if calibrated else raw


def fit_calibration(model: str | LoadedModel | Any, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000,
                    split: str = "validation") -> dict:
    """Fits the temperature of `model` on a held-out split; returns the record stored with the run:
    temperature, the split, and NLL and ECE before and after."""
    model = as_loaded_model(model)
    labels, loss = np.asarray(labels), model.loss
    logits = predict_logits(model, images, batch_size=batch_size)
    temperature = calibration_lib.fit_temperature(logits, labels, loss)
    before = metrics_lib.classification_report(labels, np.asarray(calibration_lib.probabilities(logits, loss=loss)),
                                               num_mistakes=0)
    after = metrics_lib.classification_report(
        labels, np.asarray(calibration_lib.probabilities(logits, temperature, loss)), num_mistakes=0)
    return {"temperature": temperature, "fitted_on": split, "num_examples": int(len(labels)),
            "accuracy": after["accuracy"], "nll_before": before["loss"], "nll_after": after["loss"],
            "ece_before": before["ece"], "ece_after": after["ece"], "num_ece_bins": after["num_ece_bins"]}
