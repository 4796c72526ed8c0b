"""Config checks, done before any expensive work: ranges, names, the workdir, changes against a saved run."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterator

import ml_collections

from hwrjax import models as models_lib
from hwrjax.core import augment as augment_lib
from hwrjax.core import losses as losses_lib
from hwrjax.core import optim as optim_lib
from hwrjax.core.errors import ConfigError
from hwrjax.training import parallel, storage


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
    """Creates `workdir` (a local folder or a URL) and proves it is writable, or raises ConfigError."""
    try:
        storage.makedirs(workdir)
        probe = storage.join(workdir, f".write_test_{os.getpid()}")
        storage.write_atomic(probe, "ok")
        storage.remove(probe)
    except OSError as e:
        reason = e.strerror or (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"workdir {workdir} cannot be written ({reason}); pass a --workdir you can write to") \
            from None


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


def config_as_dict(config: ml_collections.ConfigDict) -> dict:
    """`config` as plain dicts and lists, as config.json holds it."""
    return json.loads(config.to_json())
