"""Every reader of a model (predictions, TTA, ensembles, export, the recognizer) turns logits into
probabilities as the model's loss says: a softmax, or for bce sigmoids normalized to sum to 1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import conftest
from hwrjax import models
from hwrjax.apps import export
from hwrjax.apps.recognize import Recognizer
from hwrjax.core import train_state
from hwrjax.inference import loader, predict


def _sigmoids_normalized(logits):
    s = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    return s / s.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def bce_run(tmp_path_factory):
    config = conftest.small_resnet_config()
    config.loss.name = "bce"
    return conftest.make_workdir(str(tmp_path_factory.mktemp("bce") / "run"), config, seed=3)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)


def _logits(loaded, images):
    return loaded.apply_fn(loaded.variables, jnp.asarray(images, jnp.float32) / 255.0, train=False)


def test_predictions_of_a_bce_run_are_its_normalized_sigmoids(bce_run, images):
    loaded = loader.load_model(bce_run)
    assert loaded.loss == "bce"
    want = _sigmoids_normalized(_logits(loaded, images))
    got = predict.predict_probs(bce_run, images)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got, jax.nn.softmax(_logits(loaded, images)), atol=1e-4)
    # TTA and ensembles average these distributions, so their rows still sum to 1.
    np.testing.assert_allclose(predict.predict_probs(bce_run, images, tta=3).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(predict.ensemble_probs([bce_run], images), got, atol=1e-6)


def test_a_train_state_is_read_with_the_loss_it_was_trained_with(images):
    model = models.MLP(hidden_sizes=(8,))
    state = train_state.create_train_state(model, optax.sgd(0.1), jax.random.key(0))
    logits = model.apply({"params": state.params}, jnp.asarray(images, jnp.float32) / 255.0)
    np.testing.assert_allclose(predict.predict_probs(state, images, loss="bce"), _sigmoids_normalized(logits),
                               atol=1e-6)
    np.testing.assert_allclose(predict.predict_probs(state, images), jax.nn.softmax(logits), atol=1e-6)


def test_export_and_recognizer_read_a_bce_run_the_same_way(bce_run, images):
    loaded = loader.load_model(bce_run)
    want = _sigmoids_normalized(_logits(loaded, images))
    x = jnp.asarray(images, jnp.float32) / 255.0
    np.testing.assert_allclose(export.inference_function(bce_run)(x), want, atol=1e-6)
    rec = Recognizer.from_workdir(bce_run)
    assert rec.loss == "bce"
    np.testing.assert_allclose(rec.classify(np.asarray(x[..., 0])), want, atol=1e-6)
    with pytest.raises(Exception, match="unknown loss 'focal'"):
        Recognizer(rec.model, loaded.variables, loss="focal")



def test_calibration_scales_the_logits_before_the_losss_reading():
    from hwrjax.inference import calibration

    z = jax.random.normal(jax.random.key(5), (64, 4)) * 3
    labels = np.asarray(jnp.argmax(z + jax.random.normal(jax.random.key(6), z.shape) * 2, -1))
    np.testing.assert_allclose(calibration.probabilities(z, 2.0, "bce"), _sigmoids_normalized(z / 2.0), atol=1e-6)
    np.testing.assert_allclose(jnp.exp(calibration.log_probabilities(z, 2.0, "bce")),
                               _sigmoids_normalized(z / 2.0), atol=1e-6)
    t = calibration.fit_temperature(z, labels, "bce")
    assert calibration.mean_nll(z, labels, t, "bce") < calibration.mean_nll(z, labels, 1.0, "bce")
    # The fit is of the bce reading, not the softmax one.
    assert t != pytest.approx(calibration.fit_temperature(z, labels), rel=1e-3)
