"""Calibrated probabilities: a temperature fitted on validation and stored with the run.

A network trained with label smoothing never states more than about 1 - smoothing, however
clear the digit; one trained without it is often too sure of its mistakes. Temperature
scaling divides the logits by one scalar T, fitted to minimise the negative log-likelihood
of the run's validation split, before the softmax: argmax and accuracy are unchanged, only
the stated confidence moves (T < 1 sharpens, T > 1 softens).

* `probabilities(logits, temperature, loss)`: the probabilities every reading reports (jax):
  `hwrjax.core.losses.probabilities` of logits / T (a softmax, or for bce normalized sigmoids).
* `fit_temperature(logits, labels)`: the T of least validation NLL (bounded 1-D search on
  log T, deterministic).
* `WORKDIR/calibration.json` holds one fitted temperature per checkpoint step
  (`save_calibration` writes it atomically, `load_temperature` reads the one of a step);
  a checkpoint without one reads with T = 1 and says so.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hwrjax.core import losses
from hwrjax.core.errors import CheckpointError, HwrjaxError
from hwrjax.training import storage

CALIBRATION_FILE = "calibration.json"
# The search range of T: wide enough for any trained classifier seen here (label smoothing
# 0.1 gives T ~ 0.3-0.5), narrow enough that a degenerate split cannot push T to 0 or infinity.
MIN_TEMPERATURE = 0.02
MAX_TEMPERATURE = 50.0
# The search stops when log T is known to within this (T to about 0.001%).
_LOG_T_TOLERANCE = 1e-5
UNCALIBRATED = 1.0


def probabilities(logits: jax.Array, temperature: jax.Array | float = UNCALIBRATED,
                  loss: str = "cross_entropy") -> jax.Array:
    """Class probabilities [..., C] (float32) of logits at `temperature` of a model trained with `loss`:
    softmax(logits / T), or for bce sigmoid(logits / T) normalized to sum to 1."""
    return losses.probabilities(_scaled(logits, temperature), loss)


def log_probabilities(logits: jax.Array, temperature: jax.Array | float = UNCALIBRATED,
                      loss: str = "cross_entropy") -> jax.Array:
    """Log of `probabilities(logits, temperature, loss)`, computed stably."""
    return losses.log_probabilities(_scaled(logits, temperature), loss)


def _scaled(logits: jax.Array, temperature: jax.Array | float) -> jax.Array:
    return jnp.asarray(logits).astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)


@functools.partial(jax.jit, static_argnames=("loss",))
def _mean_nll(logits: jax.Array, labels: jax.Array, log_t: jax.Array, loss: str) -> jax.Array:
    logp = log_probabilities(logits, jnp.exp(log_t), loss)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def _check_logits(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, np.float32)
    y = np.asarray(labels)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2:
        raise HwrjaxError(f"calibration needs logits of shape [N >= 1, C >= 2], got {z.shape}")
    if y.shape != (z.shape[0],) or y.dtype.kind not in "iu":
        raise HwrjaxError(f"calibration needs one integer label per row of logits, got labels of shape {y.shape} "
                          f"and dtype {y.dtype}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise HwrjaxError(f"labels must lie in [0, {z.shape[1]}), got {int(y.min())}..{int(y.max())}")
    if not np.isfinite(z).all():
        raise HwrjaxError("the model's logits contain NaN or infinite values; it cannot be calibrated")
    return z, y.astype(np.int32)


def mean_nll(logits: Any, labels: Any, temperature: float = UNCALIBRATED, loss: str = "cross_entropy") -> float:
    """Mean negative log-likelihood of `labels` under `probabilities(logits, temperature, loss)`."""
    z, y = _check_logits(logits, labels)
    return float(_mean_nll(jnp.asarray(z), jnp.asarray(y), jnp.float32(math.log(temperature)), loss))


def fit_temperature(logits: Any, labels: Any, loss: str = "cross_entropy") -> float:
    """The temperature in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising the mean NLL of `labels`.

    A bounded scalar search (Brent's method) on log T; the same inputs give the same T.
    """
    from scipy import optimize

    z, y = _check_logits(logits, labels)
    z, y = jnp.asarray(z), jnp.asarray(y)
    objective = lambda log_t: float(_mean_nll(z, y, jnp.float32(log_t), loss))
    result = optimize.minimize_scalar(objective, bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)),
                                      method="bounded", options={"xatol": _LOG_T_TOLERANCE})
    return float(math.exp(float(result.x)))


# --------------------------------------------------------------------------------------
# The stored temperatures of a run.


def calibration_path(workdir: str) -> str:
    """Where a run keeps its fitted temperatures: WORKDIR/calibration.json."""
    return storage.join(workdir, CALIBRATION_FILE)


def read_calibration(workdir: str) -> dict[int, dict]:
    """{checkpoint step: record} of WORKDIR/calibration.json ({} when there is none).

    Raises CheckpointError for a file that exists but is not such a table.
    """
    path = calibration_path(workdir)
    if not storage.exists(path):
        return {}
    try:
        table = json.loads(storage.read_bytes(path))
        records = table["checkpoints"]
        out = {int(step): dict(record) for step, record in records.items()}
        for step, record in out.items():
            t = record["temperature"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
                raise ValueError(f"step {step} has temperature {t!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e}); delete it and run "
                              f"`hwrjax calibrate --workdir={workdir}` to fit it again") from None
    return out


def load_temperature(workdir: str, step: int) -> tuple[float, dict | None]:
    """(temperature, record) stored for checkpoint `step` of `workdir`; (1.0, None) when none was fitted."""
    record = read_calibration(workdir).get(int(step))
    if record is None:
        return UNCALIBRATED, None
    return float(record["temperature"]), record


def save_calibration(workdir: str, step: int, record: Mapping[str, Any]) -> str:
    """Stores `record` (holding "temperature") for checkpoint `step`, keeping other steps'; returns the path.

    Written atomically (a temporary file renamed over the old one), so a reader never sees half a file.
    """
    t = record.get("temperature")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
        raise HwrjaxError(f"a stored temperature must be a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                          f"got {t!r}")
    table = read_calibration(workdir)
    table[int(step)] = dict(record)
    path = calibration_path(workdir)
    storage.write_json_atomic(path, {"checkpoints": {str(s): table[s] for s in sorted(table)}})
    return path
