"""Evaluation people can read: predictions, TTA, ensembles, reports, plots and run comparisons.

* `predict_probs(model, images)`: class probabilities of a trained run (a workdir, a
  `LoadedModel` or a TrainState), jit-compiled once for fixed-size padded batches; read from
  the logits as its loss says (`hwrjax.losses.probabilities`: softmax, or normalized sigmoids
  for bce).
* Test-time augmentation with K views: view 0 is the image itself, views 1..K-1 apply one
  fixed mild affine transform each (`TTA_AUGMENT`, keyed by `fold_in(key(TTA_SEED), view)`)
  to every image alike, so an image's prediction never depends on its batch or position.
  K = 0 and K = 1 both mean no augmentation.
* `evaluate(workdirs, split)`: the classification report of one run or of the ensemble
  (mean probabilities) of several runs on one dataset.
* `write_training_report(...)`: the pictures the training loop writes at its end.
* `evaluate_main` / `compare_main`: the `hwrjax evaluate` and `hwrjax compare` commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from hwrjax import augment as augment_lib
from hwrjax import calibration as calibration_lib
from hwrjax import checkpoint as checkpoint_lib
from hwrjax import labelled as labelled_lib
from hwrjax import losses as losses_lib
from hwrjax import metrics as metrics_lib
from hwrjax import models as models_lib
from hwrjax import runlock
from hwrjax.errors import CheckpointError, DataError, HwrjaxError
from hwrjax.logs import write_json_atomic

IMAGE_SHAPE = (28, 28, 1)
# Mild ranges: a digit stays clearly itself under every view.
TTA_AUGMENT = augment_lib.AugmentParams(rotation_deg=8.0, scale=0.08, translate_px=1.5)
TTA_SEED = 0
SPLIT_ALIASES = ("test", "validation", "train")
# Confidence thresholds of the coverage table: the share of readings kept (confidence >= threshold)
# and their accuracy; 0 keeps everything.
COVERAGE_THRESHOLDS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999)
# Unreadable and skipped files of a labelled folder listed in the text output (the JSON lists all).
NUM_FILES_LISTED = 10
# Most confident mistakes shown in the picture (2 rows of 8).
NUM_MISTAKES_SHOWN = 16
REPORT_DIR = "report"
TENSORBOARD_DIR = "tensorboard"


# --------------------------------------------------------------------------------------
# Models and predictions


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A trained classifier ready for inference: `apply_fn(variables, images01, train=False) -> logits`.

    `loss` is the config.loss.name it was trained with, which says how its logits are read as
    probabilities (`hwrjax.losses.probabilities`: a softmax, or normalized sigmoids for bce);
    `temperature` divides the logits first for calibrated predictions (see hwrjax.calibration);
    `calibration` is the stored record it came from (None: T = 1, not fitted).
    """

    apply_fn: Callable[..., Any]
    variables: dict
    num_classes: int
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
    """Loads the best, latest or a given step's checkpoint of `workdir` for inference."""
    config = checkpoint_lib.load_config(workdir)
    variables, step = checkpoint_lib.load_variables(workdir, which)
    num_classes = _num_classes_of(workdir, config, variables)
    module = _shared_module(models_lib.create_model(config.model, num_classes, dtype=config.dtype))
    temperature, record = calibration_lib.load_temperature(workdir, int(step))
    return LoadedModel(apply_fn=module.apply,
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


def _check_count(value: Any, name: str, minimum: int) -> int:
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
    batch_size = _check_count(batch_size, "batch_size", 1)
    num_views = max(1, _check_count(tta, "tta", 0))
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
    batch_size = _check_count(batch_size, "batch_size", 1)
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


def with_temperature(model: str | LoadedModel | Any, temperature: float, record: dict | None = None) -> LoadedModel:
    """`model` as a LoadedModel whose calibrated predictions use `temperature`."""
    return dataclasses.replace(as_loaded_model(model), temperature=float(temperature), calibration=record)


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


def calibrate(workdir: str, which: str | int = "best", batch_size: int | None = None) -> dict:
    """Fits the temperature of a run's checkpoint on the run's validation split and stores it in
    WORKDIR/calibration.json; returns the record (with "step" and "path")."""
    which = _check_which(which)
    config = checkpoint_lib.load_config(workdir)
    if int(config.dataset.validation_size) <= 0:
        raise DataError(f"{workdir} was trained without a validation split (config.dataset.validation_size=0), "
                        "and calibration is fitted on it; its probabilities stay uncalibrated (T=1)")
    builder = _builder(config)
    tfds_split, _ = resolve_split(config, "validation", builder)
    # The run's lock: a training run still writing this workdir (and its own temperature) comes first.
    with runlock.acquire(workdir):
        model = load_model(workdir, which)
        images, labels = load_split(builder, tfds_split)
        batch = batch_size or int(config.get("eval_batch_size", 1000))
        record = fit_calibration(model, images, labels, batch_size=batch)
        path = calibration_lib.save_calibration(workdir, model.step, record)
    return dict(record, step=model.step, path=path)


# --------------------------------------------------------------------------------------
# Splits


def _builder(config: Any) -> Any:
    from hwrjax import data as data_lib

    return data_lib.ensure_prepared(config)


def resolve_split(config: Any, split: str, builder: Any = None) -> tuple[str, int]:
    """Maps `split` (test, validation, train or a tfds split string) to (tfds split, example count).

    `test` is the run's `config.dataset.test_split` and `validation` / `train` the examples the
    run used for validation / training (see hwrjax.data); any other name is read by tfds.
    """
    builder = builder or _builder(config)
    splits = builder.info.splits
    dataset = config.dataset.name
    if split == "test":
        tfds_split = config.dataset.test_split
    elif split in ("validation", "train"):
        num_train = splits["train"].num_examples
        val = int(config.dataset.validation_size)
        if split == "validation":
            if val <= 0:
                raise DataError("this run has no validation split (config.dataset.validation_size=0); "
                                "use --split=test or --split=train")
            tfds_split = f"train[{num_train - val}:]"
        else:
            limit = int(config.dataset.limit_train)
            end = min(num_train - val, limit) if limit > 0 else num_train - val
            tfds_split = f"train[:{end}]"
    else:
        tfds_split = split
    valid = (f"use test, validation, train, or a tfds split of {dataset} such as 'test[:1000]' or "
             f"'train[:10%]' ({dataset} has splits {', '.join(sorted(splits))})")
    try:
        count = int(splits[tfds_split].num_examples)
    except (ValueError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"unknown split {split!r} ({reason.rstrip('.')}); {valid}") from e
    if count <= 0:
        raise DataError(f"split {split!r} selects no examples; {valid}")
    return tfds_split, count


def load_split(builder: Any, tfds_split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28, 1] and int32 labels [N] of a tfds split, in the split's order."""
    from hwrjax import data as data_lib

    split = data_lib.load_split(builder, tfds_split)
    return split.images, split.labels


def _class_names(builder: Any) -> tuple[str, ...]:
    label = builder.info.features["label"]
    names = getattr(label, "names", None)
    return tuple(names) if names else tuple(str(i) for i in range(label.num_classes))


# --------------------------------------------------------------------------------------
# Evaluation


@dataclasses.dataclass(frozen=True)
class SplitPredictions:
    """Predictions on a split: uint8 images [N,28,28,1], int labels [N] and probabilities [N, C]."""

    images: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    class_names: Sequence[str] | None = None
    split: str = "test"


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The JSON report of `evaluate` plus the arrays it came from."""

    report: dict
    predictions: SplitPredictions


def _check_which(which: str | int) -> str | int:
    if which in ("best", "latest"):
        return which
    if isinstance(which, str) and which.isdigit():
        return int(which)
    if isinstance(which, (int, np.integer)) and not isinstance(which, bool) and which >= 0:
        return int(which)
    raise HwrjaxError(f"checkpoint must be 'best', 'latest' or a step number, got {which!r}")


def _workdir_list(workdirs: str | os.PathLike | Sequence[str]) -> list[str]:
    items = [workdirs] if isinstance(workdirs, (str, os.PathLike)) else list(workdirs)
    items = [os.fspath(w) for w in items]
    if not items:
        raise HwrjaxError("pass at least one --workdir")
    seen = set()
    for w in items:
        key = os.path.realpath(w)
        if key in seen:
            raise HwrjaxError(f"workdir {w} is given twice; an ensemble needs distinct runs")
        seen.add(key)
    return items


def is_labelled_folder(split: str) -> bool:
    """True when `split` names a folder of labelled images rather than a split of the run's dataset."""
    return split not in SPLIT_ALIASES and os.path.isdir(split)


def _calibration_summary(models: Sequence[LoadedModel], labels: np.ndarray, raw: np.ndarray,
                         probs: np.ndarray) -> dict:
    """The temperatures used and the uncalibrated figures beside the calibrated ones of the report."""
    before = metrics_lib.classification_report(labels, raw, num_mistakes=0)
    return {
        "temperatures": [m.temperature for m in models],
        "fitted": [m.calibration is not None for m in models],
        "uncalibrated_loss": before["loss"],
        "uncalibrated_ece": before["ece"],
        "coverage": metrics_lib.coverage_table(labels, probs, COVERAGE_THRESHOLDS),
    }


def _folder_split(split: str, num_classes: int) -> tuple[labelled_lib.LabelledSplit, int]:
    """A labelled folder read as the Recognizer reads digits; (split, files listed)."""
    scan = labelled_lib.scan_labelled_folder(split, num_classes=num_classes)
    for path, why in scan.skipped:
        logging.warning("Skipping %s: %s", path, why)
    read = labelled_lib.read_labelled_folder(scan)
    for path, error in read.unreadable:
        logging.warning("Cannot read %s: %s", path, error)
    if not read.paths:
        path, error = read.unreadable[0]
        raise DataError(f"none of the {len(scan)} images in {scan.folder} could be read (first: {path}: {error})")
    return read, len(scan)


def run_evaluation(workdirs: str | Sequence[str], split: str = "test", tta: int = 0, which: str | int = "best",
                   batch_size: int | None = None) -> Evaluation:
    """Like `evaluate`, but also returns the split and the (ensemble) probabilities."""
    start = time.time()
    workdirs = _workdir_list(workdirs)
    tta = _check_count(tta, "tta", 0)
    which = _check_which(which)
    if batch_size is not None:
        batch_size = _check_count(batch_size, "batch_size", 1)
    # Cheap checks first: configs, datasets, the split; then models; then data and inference.
    configs = [checkpoint_lib.load_config(w) for w in workdirs]
    for w, c in zip(workdirs[1:], configs[1:]):
        if c.dataset.name != configs[0].dataset.name:
            raise CheckpointError(f"ensemble members were trained on different datasets: {workdirs[0]} on "
                                  f"{configs[0].dataset.name!r}, {w} on {c.dataset.name!r}; "
                                  "pass workdirs of runs on one dataset")
        if split == "validation" and c.dataset.validation_size != configs[0].dataset.validation_size:
            raise CheckpointError(f"ensemble members carved different validation splits ({workdirs[0]}: "
                                  f"{configs[0].dataset.validation_size}, {w}: {c.dataset.validation_size}), so "
                                  "one member's validation examples are another's training data; use --split=test")
    config = configs[0]
    batch = batch_size or int(config.get("eval_batch_size", 1000))
    folder = None
    if is_labelled_folder(split):
        models = [load_model(w, which) for w in workdirs]
        check_same_dataset(models)
        folder, listed = _folder_split(split, models[0].num_classes)
        images, labels = folder.images, folder.labels
        class_names = tuple(str(c) for c in range(models[0].num_classes))
        dataset, tfds_split = "labelled folder", os.path.abspath(split)
    else:
        if os.sep in split or split.startswith((".", "~")):  # meant as a folder: tfds split names hold no "/"
            raise DataError(f"{split} is not a folder; pass a folder holding sub-folders 0..9 of images, or a split "
                            "(test, validation, train or a tfds split such as 'test[:1000]')")
        builder = _builder(config)
        tfds_split, expected = resolve_split(config, split, builder)
        models = [load_model(w, which) for w in workdirs]
        check_same_dataset(models)
        images, labels = load_split(builder, tfds_split)
        if len(labels) != expected:
            raise DataError(f"split {tfds_split!r} of {config.dataset.name} loaded {len(labels)} examples, "
                            f"expected {expected}; the prepared dataset may be damaged")
        class_names = _class_names(builder)
        if len(class_names) != models[0].num_classes:
            raise CheckpointError(f"{workdirs[0]} predicts {models[0].num_classes} classes but "
                                  f"{config.dataset.name} has {len(class_names)}")
        dataset = config.dataset.name
    logging.info("Evaluating %d model(s) on %s %s (%d examples, tta=%d).", len(models), dataset,
                 tfds_split, len(labels), tta)
    raw, probs = ensemble_both(models, images, batch_size=batch, tta=tta)
    report = metrics_lib.classification_report(labels, probs, class_names=class_names)
    report.update(
        dataset=dataset,
        split=tfds_split,
        requested_split=split,
        workdirs=[os.path.abspath(w) for w in workdirs],
        checkpoint=which,
        checkpoint_steps=[m.step for m in models],
        tta=tta,
        tta_views=max(1, tta),
        tta_augment=dataclasses.asdict(TTA_AUGMENT) if tta > 1 else None,
        ensemble_size=len(models),
        calibration=_calibration_summary(models, labels, raw, probs),
        # How each member's logits were read (distinct descriptions, members in order).
        probabilities="; ".join(dict.fromkeys(losses_lib.describe_probabilities(m.loss) for m in models)),
    )
    if folder is not None:
        for mistake in report["most_confident_mistakes"]:
            mistake["path"] = folder.paths[mistake["index"]]
        report.update(files_listed=listed, paths=list(folder.paths),
                      unreadable=[{"path": p, "error": e} for p, e in folder.unreadable],
                      skipped=[{"path": p, "reason": r} for p, r in folder.skipped])
    report["eval_time_s"] = time.time() - start
    return Evaluation(report, SplitPredictions(images, labels, probs, class_names, tfds_split))


def evaluate(workdirs: str | Sequence[str], split: str = "test", tta: int = 0, which: str | int = "best",
             batch_size: int | None = None) -> dict:
    """The classification report (JSON-ready) of one run or the ensemble of several on `split`."""
    return run_evaluation(workdirs, split=split, tta=tta, which=which, batch_size=batch_size).report


# --------------------------------------------------------------------------------------
# Files: JSON reports, PNGs, TensorBoard images


def report_stem(split: str, ensemble_size: int = 1, tta: int = 0, which: str | int = "best") -> str:
    """The file-name stem of a report, distinct for every split, ensemble size, TTA and checkpoint."""
    if is_labelled_folder(split):
        split = "folder_" + (os.path.basename(os.path.normpath(os.path.abspath(split))) or "root")
    # test[:200] -> test_0-200, train[59500:] -> train_59500-end, train[:10%] -> train_0-10pct
    stem = re.sub(r"\[([^\]:]*):([^\]:]*)\]", lambda m: f"_{m.group(1) or '0'}-{m.group(2) or 'end'}", split)
    stem = re.sub(r"[^\w.+-]+", "_", stem.replace("%", "pct")).strip("_") or "split"
    if ensemble_size > 1:
        stem += f"_ensemble{ensemble_size}"
    if tta > 1:
        stem += f"_tta{tta}"
    if which != "best":
        stem += "_latest" if which == "latest" else f"_step{which}"
    return stem


def read_history(workdir: str) -> list[dict]:
    """Rows of WORKDIR/metrics.jsonl (an unreadable line, e.g. one being written, is skipped)."""
    rows = []
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _save_png(array: np.ndarray, path: str) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    Image.fromarray(array, mode="RGB").save(tmp, format="PNG")
    os.replace(tmp, path)


def write_pictures(workdir: str, history_rows: Sequence[Mapping[str, Any]] | None = None,
                   predictions: SplitPredictions | None = None, report: Mapping[str, Any] | None = None, *,
                   stem: str | None = None, step: int = 0, tensorboard: bool = True,
                   picture_dir: str | None = None) -> dict[str, str]:
    """Writes the training curves and (given predictions) confusion matrix and mistakes as PNG and TensorBoard images.

    `report` is the `classification_report` of `predictions` (computed when omitted);
    PNGs go to `picture_dir` (default WORKDIR/report/), named `training_curves.png`,
    `<stem>_confusion_matrix.png` and `<stem>_mistakes.png`. Returns {picture name: path}.
    """
    from hwrjax import plots

    figures: dict[str, Any] = {}
    if history_rows:
        figures["training_curves"] = plots.training_curves_figure(list(history_rows))
    if predictions is not None:
        if report is None:
            report = metrics_lib.classification_report(predictions.labels, predictions.probs,
                                                       class_names=predictions.class_names)
        stem = stem or report_stem(predictions.split)
        names = predictions.class_names
        figures[f"{stem}_confusion_matrix"] = plots.confusion_matrix_figure(
            np.asarray(report["confusion_matrix"]), names)
        shown = np.asarray(report["misclassified"][:NUM_MISTAKES_SHOWN], np.int64)
        probs = np.asarray(predictions.probs)
        preds = probs.argmax(axis=1)
        figures[f"{stem}_mistakes"] = plots.mistakes_figure(
            np.asarray(predictions.images)[shown], np.asarray(predictions.labels)[shown], preds[shown],
            probs[shown], class_names=names)
    paths = {}
    writer = None
    try:
        if tensorboard and figures:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))
        for name, fig in figures.items():
            array = plots.figure_to_array(fig)
            path = os.path.join(picture_dir or os.path.join(workdir, REPORT_DIR), f"{name}.png")
            _save_png(array, path)
            paths[name] = path
            if writer is not None:
                writer.add_image(f"{REPORT_DIR}/{name}", array, int(step), dataformats="HWC")
    finally:
        if writer is not None:
            writer.close()
    return paths


def write_training_report(workdir: str, history_rows: Sequence[Mapping[str, Any]] | None = None,
                          test: SplitPredictions | None = None, *, step: int = 0,
                          tensorboard: bool = True) -> dict[str, str]:
    """Writes the end-of-training pictures to WORKDIR/report/ and TensorBoard; returns {name: path}.

    `history_rows` are metrics rows (None reads WORKDIR/metrics.jsonl). Given `test`
    (e.g. `SplitPredictions(split.images, split.labels, predict_probs(state, split.images),
    class_names, "test")`), also writes `test_confusion_matrix.png` and `test_mistakes.png`:
    the same files `hwrjax evaluate --workdir=WORKDIR` writes.
    """
    rows = read_history(workdir) if history_rows is None else list(history_rows)
    return write_pictures(workdir, rows, test, step=step, tensorboard=tensorboard)


# --------------------------------------------------------------------------------------
# Commands


class _ArgumentParser(argparse.ArgumentParser):
    """Reports usage errors as one HwrjaxError line instead of exiting."""

    def error(self, message: str):
        raise HwrjaxError(f"{self.prog}: {message} (see {self.prog} --help)")


def _parse_checkpoint(value: str) -> str | int:
    if value in ("best", "latest"):
        return value
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected best, latest or a step number, got {value!r}")


def _evaluate_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="hwrjax evaluate", description="Metrics, plots, TTA and ensembles of trained runs.")
    p.add_argument("--workdir", action="append", required=True,
                   help="workdir of a training run; repeat to evaluate the ensemble (mean probabilities)")
    p.add_argument("--split", default="test",
                   help="test (the run's test split), validation, train, a tfds split such as 'test[:1000]', or a "
                        "folder of your own labelled images (sub-folders 0..9, each holding images of that digit)")
    p.add_argument("--tta", type=int, default=0,
                   help="test-time augmentation: average K views (view 0 unchanged); 0 or 1 disables")
    p.add_argument("--checkpoint", type=_parse_checkpoint, default="best", help="best, latest or a step number")
    p.add_argument("--output", default=None,
                   help="JSON report path (default WORKDIR/report/<split>[_ensembleN][_ttaK]_metrics.json); "
                        "with a read-only workdir the pictures go beside it")
    p.add_argument("--batch_size", type=int, default=None,
                   help="inference batch size (default: the run's eval_batch_size)")
    p.add_argument("--no_tensorboard", action="store_true", help="do not write the pictures to TensorBoard")
    return p


class _DropLibraryChatter:
    """Drops INFO and WARNING records of orbax and tfds (e.g. that checkpoints open read-only)."""

    _NOISY = ("/orbax/", "/tensorflow_datasets/", "/etils/")

    def filter(self, record) -> bool:
        import logging as std_logging

        return record.levelno > std_logging.WARNING or not any(p in record.pathname for p in self._NOISY)


def _run_command(body: Callable[[], int]) -> int:
    """Runs a command body; a HwrjaxError becomes one line on stderr and exit code 2."""
    import logging as std_logging

    absl_logger, filt = std_logging.getLogger("absl"), _DropLibraryChatter()
    absl_logger.addFilter(filt)
    try:
        return body()
    except HwrjaxError as e:
        sys.stderr.write(f"hwrjax: error: {e}\n")
        return 2
    finally:
        absl_logger.removeFilter(filt)


def _writable_at(directory: str) -> str | None:
    """None if `directory` exists writable or can be created, else the folder in the way."""
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return None if os.path.isdir(probe) and os.access(probe, os.W_OK) else probe


def _check_writable(directory: str) -> None:
    """Raises unless `directory` exists writable or can be created (checked before any work)."""
    probe = _writable_at(directory)
    if probe is not None:
        raise HwrjaxError(f"cannot write to {directory} ({probe} is not a writable directory); "
                          "pass an --output you can write to")


def evaluate_main(argv: list[str]) -> int:
    """`hwrjax evaluate`: prints the report, writes it as JSON and the pictures as PNG and TensorBoard images."""
    parser = _evaluate_parser()

    def body() -> int:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        workdirs = _workdir_list(args.workdir)
        primary = workdirs[0]
        if not os.path.isdir(primary):
            raise CheckpointError(f"{primary} is not a directory; pass the --workdir of a training run")
        stem = report_stem(args.split, len(workdirs), args.tta, args.checkpoint)
        default_output = os.path.join(primary, REPORT_DIR, f"{stem}_metrics.json")
        output = args.output or default_output
        _check_writable(os.path.dirname(os.path.abspath(output)))
        picture_dir, tensorboard = os.path.join(primary, REPORT_DIR), not args.no_tensorboard
        if args.output and _writable_at(picture_dir) is not None:
            # A read-only workdir: everything goes beside --output, TensorBoard images are left out.
            picture_dir, tensorboard = os.path.dirname(os.path.abspath(output)), False
        _check_writable(picture_dir)

        result = run_evaluation(workdirs, split=args.split, tta=args.tta, which=args.checkpoint,
                                batch_size=args.batch_size)
        report = result.report
        saved = dict(report)
        if output == default_output and os.path.exists(output):
            # Evaluating the run's own test split adds detail to the training's test_metrics.json
            # and keeps what only training knows (wall time, parameter count, best validation).
            try:
                with open(output) as f:
                    previous = json.load(f)
            except (OSError, json.JSONDecodeError):
                previous = {}
            if isinstance(previous, dict):
                saved = {**{k: v for k, v in previous.items() if k not in report}, **report}
        write_json_atomic(output, saved)
        pictures = write_pictures(primary, read_history(primary), result.predictions, report, stem=stem,
                                  step=report["checkpoint_steps"][0], tensorboard=tensorboard,
                                  picture_dir=picture_dir)
        what = f"ensemble of {len(workdirs)}" if len(workdirs) > 1 else primary
        tta = f", TTA {args.tta} views" if args.tta > 1 else ""
        lines = [f"{report['dataset']} {report['split']}: {what} (checkpoint {args.checkpoint}, steps "
                 f"{report['checkpoint_steps']}{tta}; probabilities: {report['probabilities']})",
                 metrics_lib.format_report(report), "",
                 format_calibration(report, workdirs)]
        if "unreadable" in report:
            lines += ["", f"{report['num_examples']} of {report['files_listed']} image files read; "
                          f"{len(report['unreadable'])} unreadable, {len(report['skipped'])} other entries skipped"]
            for key, what, why in (("unreadable", "unreadable", "error"), ("skipped", "skipped", "reason")):
                entries = report[key]
                lines += [f"  {what}: {e['path']}: {e[why]}" for e in entries[:NUM_FILES_LISTED]]
                if len(entries) > NUM_FILES_LISTED:
                    lines.append(f"  ... and {len(entries) - NUM_FILES_LISTED} more {what} (all in the JSON report)")
        lines += ["", f"report: {output}"]
        lines += [f"{name}: {path}" for name, path in pictures.items()]
        sys.stdout.write("\n".join(lines) + "\n")
        return 0

    return _run_command(body)


def format_calibration(report: Mapping[str, Any], workdirs: Sequence[str]) -> str:
    """The calibration block of `hwrjax evaluate`: temperatures, ECE and NLL before and after, coverage."""
    c = report["calibration"]
    bins = report.get("num_ece_bins")
    lines = []
    for w, t, fitted, step in zip(workdirs, c["temperatures"], c["fitted"], report["checkpoint_steps"]):
        state = (f"temperature {t:.4g}" if fitted else
                 f"no temperature fitted for step {step}: probabilities uncalibrated (T=1); fit one with "
                 f"`hwrjax calibrate --workdir={w}`")
        lines.append(f"Calibration of {w}: {state}")
    for name, key in ((f"ECE ({bins} bins)", "ece"), ("loss (NLL)", "loss")):
        lines.append(f"  {name:<14}  {c['uncalibrated_' + key]:.4f} uncalibrated -> {report[key]:.4f} calibrated")
    lines += ["", "Accuracy of the readings kept (calibrated confidence >= min confidence; the rest are unsure)",
              metrics_lib.format_coverage(c["coverage"])]
    return "\n".join(lines)


def calibrate_main(argv: list[str]) -> int:
    """`hwrjax calibrate`: fits a run's temperature on its validation split and stores it with the run."""
    parser = _ArgumentParser(prog="hwrjax calibrate",
                             description="Fit the temperature that calibrates a run's probabilities (on its "
                                         "validation split) and store it in WORKDIR/calibration.json.")
    parser.add_argument("--workdir", required=True, help="workdir of a training run")
    parser.add_argument("--checkpoint", type=_parse_checkpoint, default="best", help="best, latest or a step number")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="inference batch size (default: the run's eval_batch_size)")

    def body() -> int:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        if not os.path.isdir(args.workdir):
            raise CheckpointError(f"{args.workdir} is not a directory; pass the --workdir of a training run")
        _check_writable(args.workdir)
        r = calibrate(args.workdir, args.checkpoint, args.batch_size)
        sys.stdout.write(
            f"temperature {r['temperature']:.4g} for step {r['step']} of {args.workdir}, fitted on {r['fitted_on']} "
            f"({r['num_examples']} examples, accuracy {r['accuracy']:.4%})\n"
            f"  NLL {r['nll_before']:.4f} -> {r['nll_after']:.4f}, ECE ({r['num_ece_bins']} bins) "
            f"{r['ece_before']:.4f} -> {r['ece_after']:.4f}\n"
            f"stored in {r['path']}\n")
        return 0

    return _run_command(body)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _shape(values: Any) -> str:
    if isinstance(values, (list, tuple)):
        return "(" + ",".join(str(v) for v in values) + ")"
    return str(values)


def describe_model(model_config: Mapping[str, Any]) -> str:
    """A short model description: 'resnet (2,2,2)x(16,32,64)', 'convnet (32,64)+(64)', 'mlp (256)'."""
    name = model_config.get("name")
    if name == "resnet":
        block = "" if model_config.get("block", "basic") == "basic" else f" {model_config.get('block')}"
        return f"resnet{block} {_shape(model_config.get('stage_sizes'))}x{_shape(model_config.get('stage_widths'))}"
    if name == "convnet":
        return f"convnet {_shape(model_config.get('conv_widths'))}+{_shape(model_config.get('dense_widths'))}"
    if name == "mlp":
        return f"mlp {_shape(model_config.get('hidden_sizes'))}"
    return str(name) if name else "-"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def summarize_run(workdir: str) -> dict:
    """One `compare_table` row from a workdir's config.json, report/test_metrics.json and metrics.jsonl."""
    config = _read_json(os.path.join(workdir, "config.json")) or {}
    test = _read_json(os.path.join(workdir, REPORT_DIR, "test_metrics.json")) or {}
    rows = read_history(workdir)
    epochs = [r["epoch"] for r in rows if isinstance(r.get("epoch"), int)]
    val = _finite(test.get("best_val_accuracy"))
    if val is None or val < 0:
        vals = [v for v in (_finite(r.get("val_accuracy")) for r in rows) if v is not None]
        val = max(vals) if vals else None
    test_acc = _finite(test.get("accuracy"))
    if test_acc is None:
        tests = [v for v in (_finite(r.get("test_accuracy")) for r in rows) if v is not None]
        test_acc = tests[-1] if tests else None
    params = test.get("num_params")
    return {
        "workdir": workdir,
        "model": describe_model(config["model"]) if isinstance(config.get("model"), dict) else None,
        "params": int(params) if isinstance(params, int) else None,
        "epochs": max(epochs) if epochs else None,
        "wall_time_s": _finite(test.get("wall_time_s")),
        "val_accuracy": val,
        "test_accuracy": test_acc,
    }


def compare_main(argv: list[str]) -> int:
    """`hwrjax compare DIR [DIR ...]`: prints a side-by-side table of training runs."""
    parser = _ArgumentParser(prog="hwrjax compare", description="A side-by-side table of training runs.")
    parser.add_argument("workdirs", nargs="+", metavar="DIR", help="workdirs of training runs")

    def body() -> int:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        for w in args.workdirs:
            markers = ("config.json", "metrics.jsonl", os.path.join(REPORT_DIR, "test_metrics.json"))
            if not os.path.isdir(w) or not any(os.path.exists(os.path.join(w, m)) for m in markers):
                raise CheckpointError(f"{w} is not a training workdir (no config.json, metrics.jsonl or "
                                      "report/test_metrics.json); pass directories given to launch.py --workdir")
        table = metrics_lib.compare_table([summarize_run(w) for w in args.workdirs])
        sys.stdout.write(table + "\n")
        return 0

    return _run_command(body)
