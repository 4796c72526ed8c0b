"""A trained model must read known digits *correctly* through every reading path.

The session's trained run (tests/conftest.py: a BatchNorm convnet with a moving average) reads
MNIST test digits it is sure of: as MNIST-form arrays (exactly the oracle's probabilities), as
photos of dark ink on paper and of light ink on a dark board (preprocessing must decide the
polarity), as written numbers, through `hwrjax predict` on files and through the HTTP service.
The expected answers are the digits' labels, not another reading by the same code.
"""

from __future__ import annotations

import json
import os

import httpx
import numpy as np
import pytest
from PIL import Image

import conftest
from hwrjax.apps.recognize import Recognizer
from hwrjax.cli.predict import predict_main
from tests.support import synth
from test_recognize import png_bytes

PER_CLASS = 3
# Reading photos goes through segmentation, cropping and re-centring, which shift a few of these
# digits; losing more than this share means a reading path is broken (each broken path tried
# read well under half of them).
MIN_PHOTO_ACCURACY = 0.8


@pytest.fixture(scope="module")
def digits(trained_run, mnist_test_slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PER_CLASS MNIST test digits of each class (uint8 [N, 28, 28]) that the oracle reads correctly
    with a top-two probability gap above 0.5, their labels, and the oracle's probabilities."""
    images, labels = mnist_test_slice
    probs = conftest.oracle_probs(trained_run, images)  # calibrated, as the readings are
    top2 = np.sort(probs, -1)[:, -2:]
    sure = (probs.argmax(-1) == labels) & (top2[:, 1] - top2[:, 0] > 0.5)
    chosen = np.concatenate([np.flatnonzero(sure & (labels == c))[:PER_CLASS] for c in range(10)])
    assert len(chosen) == 10 * PER_CLASS
    return images[chosen, ..., 0], labels[chosen], probs[chosen]


@pytest.fixture(scope="module")
def recognizer(trained_run) -> Recognizer:
    return Recognizer.from_workdir(trained_run)


def dark_on_light(digit: np.ndarray, seed: int) -> np.ndarray:
    """A photo of the digit in dark ink on lit, noisy paper."""
    return synth.render_photo(digit, np.random.default_rng(seed), scale=4)


def light_on_dark(digit: np.ndarray, seed: int) -> np.ndarray:
    """The same photo turned into light chalk on a dark board."""
    return 255 - dark_on_light(digit, seed)


def _accuracy(texts: list[str], labels: np.ndarray) -> float:
    return float(np.mean([t == str(y) for t, y in zip(texts, labels)]))


def test_mnist_form_arrays_get_the_oracles_probabilities(recognizer, digits):
    images, labels, probs = digits
    readings = recognizer.recognize(list(images), mode="digit")
    assert [r.text for r in readings] == [str(y) for y in labels]
    np.testing.assert_allclose(np.array([r.probs[0] for r in readings]), probs, atol=1e-5)


@pytest.mark.parametrize("render", [dark_on_light, light_on_dark])
def test_photos_of_either_polarity_are_read_correctly(recognizer, digits, render):
    images, labels, _ = digits
    photos = [render(d, i) for i, d in enumerate(images)]
    for mode in ("digit", "number"):
        readings = recognizer.recognize(photos, mode=mode)
        assert all(r.error is None for r in readings), [r.error for r in readings if r.error]
        texts = [r.text for r in readings]
        assert _accuracy(texts, labels) >= MIN_PHOTO_ACCURACY, (mode, texts, labels.tolist())


def test_written_numbers_are_read_correctly(recognizer, digits):
    images, labels, _ = digits
    rng = np.random.default_rng(0)
    numbers = [rng.choice(len(labels), 3, replace=False) for _ in range(10)]
    photos = [synth.render_number(list(images[n]), np.random.default_rng(i), scale=4, gap=(5.0, 7.0),
                                  touch_prob=0.0) for i, n in enumerate(numbers)]
    texts = [r.text for r in recognizer.recognize(photos, mode="number")]
    want = ["".join(str(labels[i]) for i in n) for n in numbers]
    assert all(len(t) == 3 for t in texts), texts
    digit_accuracy = np.mean([a == b for t, w in zip(texts, want) for a, b in zip(t, w)])
    assert digit_accuracy >= MIN_PHOTO_ACCURACY, (texts, want)


def test_predict_command_reads_image_files(trained_run, digits, tmp_path, capsys):
    images, labels, _ = digits
    for i, (d, y) in enumerate(zip(images, labels)):
        Image.fromarray(dark_on_light(d, 100 + i)).save(tmp_path / f"{i:02d}_label{y}.png")
    assert predict_main([f"--workdir={trained_run}", "--format=json", "--mode=digit", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == len(labels)
    by_file = {os.path.basename(r["path"]): r["text"] for r in rows}
    texts = [by_file[f"{i:02d}_label{y}.png"] for i, y in enumerate(labels)]
    assert _accuracy(texts, labels) >= MIN_PHOTO_ACCURACY, (texts, labels.tolist())


def test_the_service_reads_known_digits(recognizer, digits):
    from hwrjax.apps.serve import create_app, serve_in_thread

    images, labels, _ = digits
    with serve_in_thread(create_app(recognizer)) as url, httpx.Client(base_url=url, timeout=60) as client:
        texts = []
        for i, d in enumerate(images):
            r = client.post("/api/recognize?mode=digit", content=png_bytes(dark_on_light(d, 200 + i)),
                            headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            texts.append(r.json()["text"])
        # An MNIST-form PNG (white on black, 28x28) is the digit itself.
        r = client.post("/api/recognize?mode=digit", content=png_bytes(images[0]))
        assert r.status_code == 200 and r.json()["text"] == str(labels[0])
    assert _accuracy(texts, labels) >= MIN_PHOTO_ACCURACY, (texts, labels.tolist())
