"""Calibrated probabilities (hwrjax.inference.calibration), "unsure" readings and labelled folders as a split.

The fitted temperature is checked on synthetic logits drawn at a known temperature; the
trained checks use (a copy of) the session's trained run: the fast recipe, label smoothing 0.1, on real MNIST.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import conftest
from hwrjax.apps import evaluate, labelled
from hwrjax.apps.recognize import Reading, Recognizer
from hwrjax.cli import evaluate as evaluate_cli
from hwrjax.cli.predict import predict_main
from hwrjax.core.errors import CheckpointError, DataError
from hwrjax.inference import calibration, loader, metrics, predict
from hwrjax.training import checkpoint, runlock


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("true_t", [0.4, 2.5])
def test_fit_recovers_a_known_temperature(true_t):
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(20000, 10)).astype(np.float32)
    p = _softmax(logits.astype(np.float64) / true_t)
    # Labels drawn from softmax(logits / T): T is then the maximum-likelihood temperature.
    labels = (p.cumsum(axis=1) > rng.random((len(p), 1))).argmax(axis=1).astype(np.int32)
    fitted = calibration.fit_temperature(logits, labels)
    assert abs(fitted - true_t) / true_t < 0.05
    assert calibration.fit_temperature(logits, labels) == fitted  # deterministic
    # The fit is the minimum of the NLL: nudging T either way costs likelihood.
    best = calibration.mean_nll(logits, labels, fitted)
    assert best < calibration.mean_nll(logits, labels, fitted * 1.1)
    assert best < calibration.mean_nll(logits, labels, fitted / 1.1)
    np.testing.assert_allclose(np.asarray(calibration.probabilities(logits, fitted)),
                               _softmax(logits.astype(np.float64) / fitted), atol=1e-5)


def test_fit_recovers_a_known_temperature_of_normalized_sigmoids():
    """bce runs are read as sigmoids normalized to sum to 1: the fit uses that family, not a softmax."""
    rng = np.random.default_rng(1)
    logits = rng.normal(-2.0, 3.0, size=(20000, 10)).astype(np.float32)
    true_t = 0.5
    s = 1.0 / (1.0 + np.exp(-logits.astype(np.float64) / true_t))
    p = s / s.sum(axis=1, keepdims=True)
    labels = (p.cumsum(axis=1) > rng.random((len(p), 1))).argmax(axis=1).astype(np.int32)
    fitted = calibration.fit_temperature(logits, labels, loss="bce")
    assert abs(fitted - true_t) / true_t < 0.05
    np.testing.assert_allclose(np.asarray(calibration.probabilities(logits, fitted, "bce")),
                               (lambda q: q / q.sum(1, keepdims=True))(1 / (1 + np.exp(-logits / fitted))), atol=1e-5)


def test_fit_rejects_bad_inputs():
    with pytest.raises(Exception, match="shape"):
        calibration.fit_temperature(np.zeros((3,)), np.zeros(3, np.int32))
    with pytest.raises(Exception, match="lie in"):
        calibration.fit_temperature(np.zeros((3, 4)), np.array([0, 1, 4]))
    with pytest.raises(Exception, match="NaN"):
        calibration.fit_temperature(np.full((2, 3), np.nan), np.array([0, 1]))


def test_ece_of_a_hand_computed_example():
    probs = np.array([[0.90, 0.05, 0.05],   # conf 0.90, right  } bin (0.867, 0.933]: acc 0.5, conf 0.9
                      [0.90, 0.05, 0.05],   # conf 0.90, wrong  }
                      [0.55, 0.45, 0.00],   # conf 0.55, right:  bin (0.533, 0.6]
                      [0.38, 0.31, 0.31]])  # conf 0.38, wrong:  bin (0.333, 0.4]
    labels = np.array([0, 1, 0, 2])
    by_hand = 2 / 4 * abs(0.5 - 0.9) + 1 / 4 * abs(1 - 0.55) + 1 / 4 * abs(0 - 0.38)
    assert metrics.expected_calibration_error(labels, probs, num_bins=15) == pytest.approx(by_hand, abs=1e-12)
    rows = metrics.coverage_table(labels, probs, [0.0, 0.5, 0.9])
    assert [r["num_kept"] for r in rows] == [4, 3, 2]
    assert [r["accuracy"] for r in rows] == [pytest.approx(2 / 4), pytest.approx(2 / 3), pytest.approx(1 / 2)]


def test_stored_temperatures_by_step(tmp_path):
    workdir = str(tmp_path)
    assert calibration.load_temperature(workdir, 5) == (1.0, None)
    calibration.save_calibration(workdir, 5, {"temperature": 0.5})
    calibration.save_calibration(workdir, 9, {"temperature": 2.0})
    assert calibration.load_temperature(workdir, 5)[0] == 0.5
    assert calibration.load_temperature(workdir, 9)[0] == 2.0
    assert calibration.load_temperature(workdir, 7) == (1.0, None)
    assert not [f for f in os.listdir(workdir) if ".tmp" in f]
    with pytest.raises(Exception, match="temperature"):
        calibration.save_calibration(workdir, 5, {"temperature": 0.0})
    with open(calibration.calibration_path(workdir), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="hwrjax calibrate"):
        calibration.load_temperature(workdir, 5)


def test_reading_is_unsure_below_the_threshold():
    probs = np.array([[0.05, 0.95], [0.7, 0.3]])
    assert Reading.from_probabilities(probs, 1.0, min_confidence=0.8).unsure
    assert not Reading.from_probabilities(probs, 1.0, min_confidence=0.7).unsure  # 0.7 is kept
    assert not Reading.from_probabilities(probs, 1.0).unsure
    reading = Reading.from_probabilities(probs, 1.0, min_confidence=0.99)
    assert reading.text == "10" and reading.unsure  # the digits are still given


# --------------------------------------------------------------------------------------
# A trained smoke model with label smoothing


@pytest.fixture(scope="module")
def smoke_run(trained_run, tmp_path_factory):
    """A copy of the session's trained run (tests/conftest.py: the fast recipe, label smoothing 0.1,
    calibrated at training's end) that these tests may write reports into: its workdir and config."""
    workdir = shutil.copytree(trained_run, str(tmp_path_factory.mktemp("calib") / "fast"))
    config = checkpoint.load_config(workdir)
    assert config.loss.label_smoothing > 0
    return workdir, config


@pytest.fixture(scope="module")
def validation(smoke_run):
    workdir, config = smoke_run
    builder = evaluate._builder(config)
    split, _ = evaluate.resolve_split(config, "validation", builder)
    return evaluate.load_split(builder, split)


def test_training_stores_the_temperature_of_its_best_checkpoint(smoke_run, validation):
    workdir, _ = smoke_run
    model = loader.load_model(workdir)
    record = calibration.read_calibration(workdir)[model.step]
    assert model.temperature == record["temperature"] and model.calibration == record
    # Label smoothing leaves the network underconfident: the fit sharpens it and lowers NLL and ECE.
    assert record["temperature"] < 1.0
    assert record["nll_after"] < record["nll_before"] and record["ece_after"] < record["ece_before"]
    images, labels = validation
    refit = calibration.fit_temperature(predict.predict_logits(model, images), labels)
    assert refit == pytest.approx(record["temperature"], rel=1e-4)
    with open(os.path.join(workdir, "report", "test_metrics.json")) as f:
        assert json.load(f)["temperature"] == record["temperature"]


def test_a_typical_digit_reads_near_certain(smoke_run, validation):
    workdir, _ = smoke_run
    images, labels = validation
    model = loader.load_model(workdir)
    raw, calibrated = predict.predict_both(model, images)
    right = np.flatnonzero(raw.argmax(1) == labels)
    # A typical digit the model reads right: the median confidence among them.
    typical = int(right[np.argsort(raw.max(1)[right])[len(right) // 2]])
    # Uncalibrated, label smoothing holds it well below certainty (the target is 0.91) ...
    assert raw[typical].max() < 0.96
    # ... calibrated, it reads near 100%, through the Recognizer as through evaluate.
    rec = Recognizer.from_workdir(workdir)
    assert rec.calibrated and rec.temperature == model.temperature
    reading = rec.read(images[typical, ..., 0], mode="digit")
    assert reading.digits == [int(labels[typical])]
    assert reading.probability > 0.99
    assert reading.probability == pytest.approx(float(calibrated[typical].max()), abs=1e-5)
    np.testing.assert_array_equal(raw.argmax(1), calibrated.argmax(1))  # accuracy is unchanged


def test_evaluate_reports_calibration_before_and_after(smoke_run, tmp_path):
    workdir, _ = smoke_run
    report = evaluate.evaluate(workdir, split="validation")
    c = report["calibration"]
    assert c["fitted"] == [True] and c["temperatures"][0] < 1.0
    assert report["ece"] < c["uncalibrated_ece"] and report["loss"] < c["uncalibrated_loss"]
    coverage = {r["min_confidence"]: r for r in c["coverage"]}
    assert coverage[0.0]["kept"] == 1.0 and coverage[0.0]["accuracy"] == pytest.approx(report["accuracy"])
    # Without a stored temperature the same run reads at T = 1, and says so.
    bare = shutil.copytree(workdir, str(tmp_path / "bare"))
    os.remove(calibration.calibration_path(bare))
    plain = evaluate.evaluate(bare, split="validation")
    assert plain["calibration"]["fitted"] == [False] and plain["calibration"]["temperatures"] == [1.0]
    assert plain["ece"] == pytest.approx(c["uncalibrated_ece"], abs=1e-6)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert evaluate_cli.evaluate_main([f"--workdir={bare}", "--split=validation", "--no_tensorboard"]) == 0
    assert "uncalibrated (T=1)" in out.getvalue() and "hwrjax calibrate" in out.getvalue()
    # `hwrjax calibrate` fits it for a run that lacks it: the same temperature training stored; not while
    # a run holds the workdir.
    with runlock.acquire(bare), contextlib.redirect_stderr(io.StringIO()) as err:
        assert evaluate_cli.calibrate_main([f"--workdir={bare}"]) == 2
    assert "in use by another run" in err.getvalue() and not os.path.exists(calibration.calibration_path(bare))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert evaluate_cli.calibrate_main([f"--workdir={bare}"]) == 0
    assert calibration.load_temperature(bare, plain["checkpoint_steps"][0])[0] == pytest.approx(
        c["temperatures"][0], rel=1e-4)


def test_exported_function_is_calibrated(smoke_run, validation):
    from hwrjax.apps import export

    workdir, _ = smoke_run
    images = validation[0][:16]
    model = loader.load_model(workdir)
    fn = export.inference_function(model)
    np.testing.assert_allclose(np.asarray(fn(images.astype(np.float32) / 255.0)), predict.predict_probs(model, images),
                               atol=1e-5)


def test_predict_min_confidence_marks_unsure(smoke_run, validation, tmp_path):
    workdir, _ = smoke_run
    images, labels = validation
    for i in range(6):
        Image.fromarray(images[i, ..., 0]).save(tmp_path / f"d{i}.png")
    rec = Recognizer.from_workdir(workdir)
    expected = {str(tmp_path / f"d{i}.png"): rec.read(str(tmp_path / f"d{i}.png"), mode="digit").probability
                for i in range(6)}
    threshold = float(np.median(list(expected.values())))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = predict_main([str(tmp_path), f"--workdir={workdir}", "--mode=digit", "--format=json",
                           f"--min-confidence={threshold}"])
    assert rc == 0
    rows = {r["path"]: r for r in json.loads(out.getvalue())}
    assert set(rows) == set(expected)
    for path, p in expected.items():
        assert rows[path]["unsure"] == (p < threshold) and len(rows[path]["text"]) == 1
    assert any(r["unsure"] for r in rows.values()) and not all(r["unsure"] for r in rows.values())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        predict_main([str(tmp_path), f"--workdir={workdir}", "--mode=digit", "--min-confidence=1"])
    table = out.getvalue().splitlines()
    assert all(line.split()[1].endswith("?") for line in table[1:7])  # every reading marked unsure
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert predict_main([str(tmp_path), f"--workdir={workdir}", "--min-confidence=1.5"]) == 2
    assert "--min-confidence" in err.getvalue() and err.getvalue().count("\n") == 1


# --------------------------------------------------------------------------------------
# Labelled folders


def _labelled_folder(root, images, labels) -> str:
    """MNIST images as PNG files in root/<label>/, plus entries that must be skipped."""
    folder = root / "mine"
    for i, (image, label) in enumerate(zip(images, labels)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        # Dark ink on white paper at 3x size: a scan, not MNIST form.
        big = Image.fromarray(255 - image[..., 0]).resize((84, 84), Image.Resampling.BILINEAR)
        big.save(folder / str(label) / f"{i:03d}.png")
    (folder / "README.txt").write_text("not an image")
    (folder / "seven").mkdir()
    (folder / "3" / "notes.txt").write_text("not an image")
    os.mkfifo(folder / "3" / "pipe.png")
    (folder / "4" / "broken.png").write_bytes(b"not a png")
    return str(folder)


def test_labelled_folder_evaluate_and_predict_match_an_independent_count(smoke_run, validation, tmp_path):
    workdir, _ = smoke_run
    images, labels = validation
    n = 40
    folder = _labelled_folder(tmp_path, images[:n], labels[:n])
    # The independent count: each file read on its own through the Recognizer, label from its folder.
    rec = Recognizer.from_workdir(workdir)
    truth, guess = [], []
    for label in range(10):
        d = os.path.join(folder, str(label))
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if name.endswith(".png") and name[0].isdigit():
                truth.append(label)
                guess.append(rec.read(os.path.join(d, name), mode="digit").digits[0])
    assert len(truth) == n
    right = sum(t == g for t, g in zip(truth, guess))
    confusion = np.zeros((10, 10), int)
    for t, g in zip(truth, guess):
        confusion[t, g] += 1

    report = evaluate.evaluate(workdir, split=folder)
    assert report["num_examples"] == n and report["files_listed"] == n + 1  # broken.png is listed, unreadable
    assert round(report["accuracy"] * n) == right
    np.testing.assert_array_equal(np.asarray(report["confusion_matrix"]), confusion)
    assert [u["path"] for u in report["unreadable"]] == [os.path.join(folder, "4", "broken.png")]
    skipped = {os.path.relpath(s["path"], folder) for s in report["skipped"]}
    assert skipped == {"README.txt", "seven", os.path.join("3", "notes.txt"), os.path.join("3", "pipe.png")}
    assert [r["support"] for r in report["per_class"]] == np.bincount(truth, minlength=10).tolist()

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert predict_main([folder, f"--workdir={workdir}", "--labelled", "--format=json"]) == 0
    result = json.loads(out.getvalue())
    summary, rows = result["summary"], result["rows"]
    assert summary["correct"] == right and summary["read"] == n and summary["unreadable"] == 1
    assert sum(r["correct"] is True for r in rows) == right
    assert all(r["label"] == int(os.path.basename(os.path.dirname(r["path"]))) for r in rows)
    assert len(summary["skipped"]) == 4
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        predict_main([folder, f"--workdir={workdir}", "--labelled"])
    assert f"{right} right" in out.getvalue().splitlines()[-1]


def test_labelled_folder_bounds(tmp_path):
    folder = tmp_path / "digits"
    (folder / "1").mkdir(parents=True)
    for i in range(5):
        Image.new("L", (20, 20), 255).save(folder / "1" / f"{i}.png")
    assert len(labelled.scan_labelled_folder(str(folder))) == 5
    with pytest.raises(DataError, match="more than 4 files"):
        labelled.scan_labelled_folder(str(folder), max_files=4)
    with pytest.raises(DataError, match="over the 10-byte limit"):
        labelled.scan_labelled_folder(str(folder), max_file_bytes=10)
    with pytest.raises(DataError, match="not a folder"):
        labelled.scan_labelled_folder(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="is not a folder"):
        evaluate.run_evaluation(conftest.make_workdir(str(tmp_path / "run")), split=str(tmp_path / "missing"))
    (tmp_path / "empty" / "2").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        labelled.scan_labelled_folder(str(tmp_path / "empty"))
