"""The one model loader (hwrjax.inference.loader.load_model): best vs latest vs a step, the moving average,
the stored temperature, the module built from config.json, and one-line errors; the Recognizer loads
through it. No dataset needed: the workdir holds untrained weights saved at two steps."""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_workdir, small_resnet_config

from hwrjax.apps.recognize import Recognizer
from hwrjax.core import losses
from hwrjax.core.errors import CheckpointError
from hwrjax.inference import calibration, loader, predict
from hwrjax.training import checkpoint

LATEST_TEMPERATURE = 0.7


def _scaled(tree, factor: float):
    return jax.tree.map(lambda x: x * factor, tree)


def _state(seed: int, config):
    from hwrjax import models
    from hwrjax.core import optim, train_state

    model = models.create_model(config.model, num_classes=10, dtype=config.dtype)
    tx = optim.make_optimizer(config, optim.make_schedule(config, 10, config.num_epochs))
    state = jax.jit(lambda k: train_state.create_train_state(model, tx, k))(jax.random.key(seed))
    # A moving average unlike the raw weights, so it shows which one a loader delivers.
    ema = {"params": _scaled(state.params, 0.5), "batch_stats": _scaled(state.batch_stats, 2.0)}
    return state.replace(ema=ema)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A bce run: best at step 1 (seed 1), latest at step 4 (seed 4), both with a moving average;
    a fitted temperature only for step 4."""
    config = small_resnet_config()
    config.loss.name = "bce"
    path = make_workdir(str(tmp_path_factory.mktemp("loader") / "run"), config)
    shutil.rmtree(os.path.join(path, "checkpoints"))
    shutil.rmtree(os.path.join(path, "best"))
    meta = {"best_val_accuracy": 0.1, "best_step": 1, "epochs_without_improvement": 0, "stopped_early": False,
            "wall_time_s": 0.0}
    states = {}
    ckpt = checkpoint.Checkpointer(path, keep=3, async_save=False)
    try:
        for step in (1, 4):
            states[step] = _state(step, config).replace(step=jnp.asarray(step, jnp.int32))
            ckpt.save(step, states[step], meta)
        ckpt.save_best(1, states[1], meta)
    finally:
        ckpt.close()
    calibration.save_calibration(path, 4, {"temperature": LATEST_TEMPERATURE})
    return path, {s: jax.tree.map(np.asarray, st) for s, st in states.items()}


def _same(a, b) -> bool:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))


@pytest.mark.parametrize("which, step", [("best", 1), ("latest", 4), (1, 1), ("4", 4)])
def test_choice_picks_its_checkpoint_with_the_averaged_weights(two_steps, which, step):
    path, states = two_steps
    m = loader.load_model(path, which)
    assert m.step == step and m.workdir == path and m.num_classes == 10
    assert _same(m.variables["params"], states[step].ema["params"])
    assert _same(m.variables["batch_stats"], states[step].ema["batch_stats"])
    assert not _same(m.variables["params"], states[step].params)
    # The module is built from config.json (its dtype too) and is what apply_fn applies.
    assert m.config.dtype == "float32" and jnp.dtype(m.module.dtype) == jnp.float32 and m.apply_fn == m.module.apply
    # The loss says how logits read as probabilities (bce: normalized sigmoids, not a softmax).
    assert m.loss == "bce"
    if step == 4:
        assert m.temperature == LATEST_TEMPERATURE and m.calibration["temperature"] == LATEST_TEMPERATURE
    else:
        assert m.temperature == calibration.UNCALIBRATED and m.calibration is None


def test_probabilities_follow_the_loss_and_the_temperature(two_steps):
    path, states = two_steps
    m = loader.load_model(path, "latest")
    x = np.random.default_rng(0).uniform(0, 1, (3, 28, 28, 1)).astype(np.float32)
    logits = m.module.apply({"params": states[4].ema["params"], "batch_stats": states[4].ema["batch_stats"]}, x,
                            train=False)
    want = np.asarray(losses.probabilities(jnp.asarray(logits) / LATEST_TEMPERATURE, "bce"))
    got = predict.predict_probs(m, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The Recognizer loads through the same loader: same step, temperature, probability rule and weights.
    rec = Recognizer.from_workdir(path, "latest")
    assert (rec.step, rec.temperature, rec.loss, rec.name) == (4, LATEST_TEMPERATURE, "bce", "resnet")
    np.testing.assert_allclose(rec.classify(x[..., 0]), want, rtol=1e-5, atol=1e-6)
    assert Recognizer.from_workdir(path).step == 1 and not Recognizer.from_workdir(path).calibrated


def test_a_config_without_dtype_loads_as_float32(two_steps, tmp_path):
    path = shutil.copytree(two_steps[0], str(tmp_path / "old"))
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    del saved["dtype"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(saved, f)
    m = loader.load_model(path)
    assert m.config.dtype == "float32" and jnp.dtype(m.module.dtype) == jnp.float32


def _one_line_error(path, which="best") -> str:
    with pytest.raises(CheckpointError) as e:
        loader.load_model(path, which)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_bad_inputs_are_one_line_errors(two_steps, tmp_path):
    path, _ = two_steps
    assert "does not exist" in _one_line_error(str(tmp_path / "nowhere"))
    (tmp_path / "a_file").write_text("x")
    assert "is not a directory" in _one_line_error(str(tmp_path / "a_file"))
    (tmp_path / "empty").mkdir()
    assert "config.json" in _one_line_error(str(tmp_path / "empty"))
    for bad in ("newest", "-1", "1.5", "", True, -3, None):
        assert "'best', 'latest' or a step number" in _one_line_error(path, bad)
    assert "no checkpoint at step 7" in _one_line_error(path, 7)
    bare = str(tmp_path / "bare")
    os.makedirs(bare)
    shutil.copy(os.path.join(path, "config.json"), bare)
    assert "has no checkpoint" in _one_line_error(bare)


def test_damaged_checkpoint_and_edited_config_are_one_line_errors(two_steps, tmp_path):
    path = shutil.copytree(two_steps[0], str(tmp_path / "run"))
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    saved["model"]["stem_width"] = 16
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(saved, f)
    assert "does not match its config.json" in _one_line_error(path)
    shutil.copy(os.path.join(two_steps[0], "config.json"), path)
    files = glob.glob(os.path.join(path, "best", "1", "model", "**", "d", "*"), recursive=True)
    data_file = max(files, key=os.path.getsize)
    data = bytearray(open(data_file, "rb").read())
    data[len(data) // 2] ^= 0x10
    with open(data_file, "wb") as f:
        f.write(bytes(data))
    assert "damaged" in _one_line_error(path, "best")
    assert loader.load_model(path, "latest").step == 4  # the other checkpoint is untouched
