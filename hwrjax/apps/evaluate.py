"""Evaluation people can read: reports of runs and ensembles on any split, pictures and run comparisons.

* `evaluate(workdirs, split)`: the classification report of one run or of the ensemble
  (mean probabilities) of several runs on one dataset; `split` is test, validation, train,
  a tfds split or a folder of labelled images.
* `calibrate(workdir)`: fits a run's temperature on its validation split and stores it.
* `write_training_report(...)`: the pictures the end of a training run writes.
* `summarize_run(workdir)`: one row of `hwrjax compare`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from hwrjax.apps import labelled as labelled_lib
from hwrjax.core import losses as losses_lib
from hwrjax.core.errors import CheckpointError, DataError, HwrjaxError
from hwrjax.inference import calibration as calibration_lib
from hwrjax.inference import metrics as metrics_lib
from hwrjax.inference.loader import LoadedModel, load_model
from hwrjax.inference.predict import TTA_AUGMENT, check_count, check_same_dataset, ensemble_both, fit_calibration
from hwrjax.training import runlock, storage
from hwrjax.training import checkpoint as checkpoint_lib

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


def calibrate(workdir: str, which: str | int = "best", batch_size: int | None = None) -> dict:
    """Fits the temperature of a run's checkpoint on the run's validation split and stores it in
    WORKDIR/calibration.json; returns the record (with "step" and "path")."""
    which = checkpoint_lib.parse_choice(which)
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
    from hwrjax.training import data as data_lib

    return data_lib.ensure_prepared(config)


def resolve_split(config: Any, split: str, builder: Any = None) -> tuple[str, int]:
    """Maps `split` (test, validation, train or a tfds split string) to (tfds split, example count).

    `test` is the run's `config.dataset.test_split` and `validation` / `train` the examples the
    run used for validation / training (see hwrjax.training.data); any other name is read by tfds.
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
    from hwrjax.training import data as data_lib

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


def workdir_list(workdirs: str | os.PathLike | Sequence[str]) -> list[str]:
    """`workdirs` (one or several) as a list of distinct paths; raises HwrjaxError for none or a repeat."""
    items = [workdirs] if isinstance(workdirs, (str, os.PathLike)) else list(workdirs)
    items = [os.fspath(w) for w in items]
    if not items:
        raise HwrjaxError("pass at least one --workdir")
    seen = set()
    for w in items:
        key = w if storage.is_url(w) else os.path.realpath(w)
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
    workdirs = workdir_list(workdirs)
    tta = check_count(tta, "tta", 0)
    which = checkpoint_lib.parse_choice(which)
    if batch_size is not None:
        batch_size = check_count(batch_size, "batch_size", 1)
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
        workdirs=[storage.absolute(w) for w in workdirs],
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
    path = storage.join(workdir, "metrics.jsonl")
    if not storage.exists(path):
        return rows
    for line in storage.read_text(path).splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _save_png(array: np.ndarray, path: str) -> None:
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(png, format="PNG")
    storage.write_atomic(path, png.getvalue())


def write_pictures(workdir: str, history_rows: Sequence[Mapping[str, Any]] | None = None,
                   predictions: SplitPredictions | None = None, report: Mapping[str, Any] | None = None, *,
                   stem: str | None = None, step: int = 0, tensorboard: bool = True,
                   picture_dir: str | None = None) -> dict[str, str]:
    """Writes the training curves and (given predictions) confusion matrix and mistakes as PNG and TensorBoard images.

    `report` is the `classification_report` of `predictions` (computed when omitted);
    PNGs go to `picture_dir` (default WORKDIR/report/), named `training_curves.png`,
    `<stem>_confusion_matrix.png` and `<stem>_mistakes.png`. Returns {picture name: path}.
    """
    from hwrjax.apps import plots

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

            tensorboard_dir = storage.join(workdir, TENSORBOARD_DIR)
            storage.register_tensorboard_scheme(tensorboard_dir)
            writer = SummaryWriter(tensorboard_dir)
        for name, fig in figures.items():
            array = plots.figure_to_array(fig)
            path = storage.join(picture_dir or storage.join(workdir, REPORT_DIR), f"{name}.png")
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


def _read_json(path: str) -> dict | None:
    try:
        obj = json.loads(storage.read_bytes(path))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
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
    config = _read_json(storage.join(workdir, "config.json")) or {}
    test = _read_json(storage.join(workdir, REPORT_DIR, "test_metrics.json")) or {}
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
