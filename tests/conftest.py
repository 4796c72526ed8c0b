"""Shared fixtures: a workdir holding an (untrained) checkpoint, without needing any dataset."""

import atexit
import json
import os
import shutil
import tempfile

# One persistent compilation cache for this test session, inherited by every launch.py and
# `hwrjax` subprocess: the many smoke runs of one recipe compile their steps once. It starts
# empty, so no run outside the session is reused, and it is removed at the end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="hwrjax-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# Likewise one decoded-dataset cache for the session (hwrjax.data), empty at the start.
if "HWRJAX_DATA_CACHE_DIR" not in os.environ:
    _DATA_CACHE = tempfile.mkdtemp(prefix="hwrjax-test-data-cache-")
    os.environ["HWRJAX_DATA_CACHE_DIR"] = _DATA_CACHE
    atexit.register(shutil.rmtree, _DATA_CACHE, ignore_errors=True)

import jax  # noqa: E402
import pytest

from configs import default  # noqa: E402
from hwrjax import checkpoint, models, optim, train  # noqa: E402


def make_workdir(path: str, config=None, seed: int = 0) -> str:
    """Writes config.json and a best + latest checkpoint of a freshly initialized model to `path`."""
    config = config or small_resnet_config()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    model = models.create_model(config.model, num_classes=10, dtype=config.dtype)
    tx = optim.make_optimizer(config, optim.make_schedule(config, 10, config.num_epochs))
    # One compiled init instead of dozens of op-by-op dispatches.
    state = jax.jit(lambda k: train.create_train_state(model, tx, k))(jax.random.key(seed))
    ckpt = checkpoint.Checkpointer(path, keep=2, async_save=False)
    meta = {"best_val_accuracy": 0.1, "best_step": 0, "epochs_without_improvement": 0,
            "stopped_early": False, "wall_time_s": 0.0}
    ckpt.save(0, state, meta)
    ckpt.save_best(0, state, meta)
    ckpt.close()
    return path


def small_resnet_config():
    """The ResNet smoke-sized config used by fixtures."""
    c = default.get_config()
    default.smoke(c)
    c.model.stage_sizes = (1, 1)
    c.model.stage_widths = (8, 16)
    c.model.stem_width = 8
    return c


@pytest.fixture(scope="session")
def _untrained_template(tmp_path_factory):
    return make_workdir(str(tmp_path_factory.mktemp("template") / "run"))


@pytest.fixture
def untrained_workdir(tmp_path, _untrained_template):
    """A workdir of its own with config.json and an untrained small ResNet checkpoint (no data needed)."""
    import shutil

    return shutil.copytree(_untrained_template, str(tmp_path / "run"))


def mnist_available() -> bool:
    """True when the real MNIST is prepared in $TFDS_DATA_DIR."""
    d = os.environ.get("TFDS_DATA_DIR")
    return bool(d) and os.path.isdir(os.path.join(d, "mnist"))


@pytest.fixture
def require_mnist():
    """Skips (or in CI, fails) a test that needs the real MNIST when it is not prepared."""
    if not mnist_available():
        if os.environ.get("CI"):
            pytest.fail("CI needs TFDS_DATA_DIR pointing at a tfds data dir holding mnist")
        pytest.skip("set TFDS_DATA_DIR to a tfds data dir holding mnist")
