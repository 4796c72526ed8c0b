"""hwrjax.apps.evaluate on real MNIST slices: reports, ensembles, TTA, pictures, compare, errors."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from PIL import Image

import conftest
from hwrjax.apps import evaluate
from hwrjax.cli import evaluate as evaluate_cli
from hwrjax.core import train_state
from hwrjax.core.errors import CheckpointError, DataError
from hwrjax.inference import loader, metrics, predict
from hwrjax.training import checkpoint, data

SPLIT = "test[:200]"
N = 200


def _cli(main, *argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _one_line_error(rc: int, err: str) -> str:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hwrjax: error: "), err
    return lines[0]


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        img = np.asarray(im.convert("RGB"))
    assert img.std() > 10.0 and len(np.unique(img.reshape(-1, 3), axis=0)) >= 8, f"{path} looks blank"
    return img


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Untrained runs a and b (seeds 0, 1), one on fashion_mnist, one without checkpoint."""
    conftest.skip_or_fail_without_mnist()
    root = tmp_path_factory.mktemp("runs")
    config = conftest.small_resnet_config()
    config.dataset.test_split = SPLIT  # `--split=test` means this
    a = conftest.make_workdir(str(root / "a"), config, seed=0)
    b = conftest.make_workdir(str(root / "b"), config, seed=1)
    fashion_config = conftest.small_resnet_config()
    fashion_config.dataset.name = "fashion_mnist"
    fashion = conftest.make_workdir(str(root / "fashion"), fashion_config, seed=2)
    empty = root / "empty"
    empty.mkdir()
    shutil.copy(os.path.join(a, "config.json"), empty / "config.json")
    # What training leaves in run a: metrics rows and the test report.
    with open(os.path.join(a, "metrics.jsonl"), "w") as f:
        for step in range(8, 65, 8):
            f.write(json.dumps({"step": step, "train_loss": 2.3 - step / 50, "train_accuracy": step / 80,
                                "learning_rate": 0.1}) + "\n")
            if step % 32 == 0:
                f.write(json.dumps({"step": step, "val_loss": 2.0 - step / 60, "val_accuracy": step / 70,
                                    "epoch": step // 32}) + "\n")
        f.write('{"step": 64, "test_acc')  # a line cut short by a crash is skipped
    os.makedirs(os.path.join(a, "report"))
    with open(os.path.join(a, "report", "test_metrics.json"), "w") as f:
        json.dump({"accuracy": 0.5, "loss": 1.0, "num_examples": N, "wall_time_s": 12.5, "num_params": 1234,
                   "best_val_accuracy": 0.875, "step": 64}, f)
    return {"a": a, "b": b, "fashion": fashion, "empty": str(empty), "config": config}


@pytest.fixture(scope="module")
def test_slice(runs):
    builder = data.ensure_prepared(runs["config"])
    return evaluate.load_split(builder, SPLIT)


@pytest.fixture(scope="module")
def single(runs):
    rc, out, err = _cli(evaluate_cli.evaluate_main, f"--workdir={runs['a']}", f"--split={SPLIT}")
    assert rc == 0, err
    path = os.path.join(runs["a"], "report", "test_0-200_metrics.json")
    with open(path) as f:
        return {"out": out, "report": json.load(f), "path": path}


def test_report_json_fields_and_counts(single, runs, test_slice):
    images, labels = test_slice
    report = single["report"]
    assert report["num_examples"] == N == len(labels)
    assert report["split"] == SPLIT and report["requested_split"] == SPLIT and report["dataset"] == "mnist"
    assert report["workdirs"] == [os.path.abspath(runs["a"])] and report["checkpoint_steps"] == [0]
    assert report["tta"] == 0 and report["tta_views"] == 1 and report["ensemble_size"] == 1
    assert report["probabilities"] == "softmax" and "probabilities: softmax" in single["out"]
    assert np.asarray(report["confusion_matrix"]).sum() == N and len(report["per_class"]) == 10
    for key in ("accuracy", "loss", "top2_accuracy", "macro_f1", "ece", "misclassified", "most_confident_mistakes"):
        assert key in report
    probs = predict.predict_probs(runs["a"], images)
    assert probs.shape == (N, 10) and probs.dtype == np.float32
    assert report["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))
    assert report["loss"] == pytest.approx(metrics.classification_report(labels, probs)["loss"], abs=1e-6)
    assert f"Classification report ({N} examples)" in single["out"] and single["path"] in single["out"]


def test_report_of_a_bce_run_says_its_sigmoids_are_normalized(runs, test_slice, tmp_path):
    config = conftest.small_resnet_config()
    config.dataset.test_split = SPLIT
    config.loss.name = "bce"
    bce = conftest.make_workdir(str(tmp_path / "bce"), config, seed=4)
    images, labels = test_slice
    rc, out, err = _cli(evaluate_cli.evaluate_main, f"--workdir={bce}", "--no_tensorboard")
    assert rc == 0, err
    with open(os.path.join(bce, "report", "test_metrics.json")) as f:
        report = json.load(f)
    assert report["probabilities"] == "sigmoid per class, normalized to sum to 1"
    assert "probabilities: sigmoid per class, normalized to sum to 1" in out
    probs = predict.predict_probs(bce, images)
    assert report["loss"] == pytest.approx(metrics.classification_report(labels, probs)["loss"], abs=1e-6)
    # An ensemble of a softmax and a sigmoid member names both readings.
    mixed = evaluate.evaluate([runs["a"], bce], split=SPLIT)
    assert mixed["probabilities"] == "softmax; sigmoid per class, normalized to sum to 1"


def test_test_alias_is_the_runs_test_split_and_keeps_training_fields(runs):
    rc, _, err = _cli(evaluate_cli.evaluate_main, "--workdir", runs["a"], "--no_tensorboard")
    assert rc == 0, err
    with open(os.path.join(runs["a"], "report", "test_metrics.json")) as f:
        report = json.load(f)
    assert report["requested_split"] == "test" and report["split"] == SPLIT and report["num_examples"] == N
    assert "per_class" in report and report["accuracy"] != 0.5
    assert (report["wall_time_s"], report["num_params"], report["best_val_accuracy"]) == (12.5, 1234, 0.875)
    config = runs["config"]
    assert evaluate.resolve_split(config, "validation") == ("train[59500:]", 500)
    assert evaluate.resolve_split(config, "train") == ("train[:2048]", 2048)


def test_ensemble_averages_member_probabilities(runs, test_slice):
    images, labels = test_slice
    pa, pb = predict.predict_probs(runs["a"], images), predict.predict_probs(runs["b"], images)
    assert not np.allclose(pa, pb, atol=1e-3)  # different seeds, different models
    mean = (pa.astype(np.float64) + pb) / 2
    np.testing.assert_allclose(predict.ensemble_probs([runs["a"], runs["b"]], images), mean, atol=1e-6)
    report = evaluate.evaluate([runs["a"], runs["b"]], split=SPLIT)
    expected = metrics.classification_report(labels, mean)
    assert report["ensemble_size"] == 2 and report["checkpoint_steps"] == [0, 0]
    assert report["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert report["confusion_matrix"] == expected["confusion_matrix"]


def test_tta_is_deterministic_and_one_view_is_no_tta(runs, test_slice):
    images, _ = test_slice
    model = loader.load_model(runs["a"])
    plain = predict.predict_probs(model, images)
    np.testing.assert_array_equal(predict.predict_probs(model, images, tta=1), plain)
    tta = predict.predict_probs(model, images, tta=4)
    np.testing.assert_array_equal(predict.predict_probs(model, images, tta=4), tta)
    assert not np.allclose(tta, plain, atol=1e-4)
    np.testing.assert_allclose(tta.sum(1), 1.0, atol=1e-5)
    # An image's views do not depend on the other images of its batch or its position.
    np.testing.assert_allclose(predict.predict_probs(model, images[::-1], tta=4)[::-1], tta, atol=1e-5)


def test_ensemble_tta_report_gets_its_own_file(single, runs):
    before = open(single["path"]).read()
    rc, out, err = _cli(evaluate_cli.evaluate_main, "--workdir", runs["a"], "--workdir", runs["b"],
                        f"--split={SPLIT}", "--tta=3", "--no_tensorboard")
    assert rc == 0, err
    with open(os.path.join(runs["a"], "report", "test_0-200_ensemble2_tta3_metrics.json")) as f:
        report = json.load(f)
    assert (report["ensemble_size"], report["tta"], report["tta_views"]) == (2, 3, 3)
    assert report["tta_augment"]["rotation_deg"] > 0
    assert open(single["path"]).read() == before
    assert "ensemble of 2" in out


def test_pictures_and_tensorboard_images(single, runs):
    report_dir = os.path.join(runs["a"], "report")
    curves = _png(os.path.join(report_dir, "training_curves.png"))
    assert curves.shape == (400, 1200, 3)
    heatmap = _png(os.path.join(report_dir, "test_0-200_confusion_matrix.png"))
    mistakes = _png(os.path.join(report_dir, "test_0-200_mistakes.png"))
    assert mistakes.shape == (2 * 170, 8 * 150, 3)  # the 16 most confident mistakes, 8 per row

    import tensorflow as tf

    def decode(png: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(png)) as im:
            return np.asarray(im.convert("RGB"))

    images = {}
    tb = os.path.join(runs["a"], "tensorboard")
    for name in os.listdir(tb):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(tb, name)):
            for value in event.summary.value:
                if value.HasField("image"):
                    images[value.tag] = decode(value.image.encoded_image_string)
    np.testing.assert_array_equal(images["report/test_0-200_confusion_matrix"], heatmap)
    np.testing.assert_array_equal(images["report/training_curves"], curves)
    assert "report/test_0-200_mistakes" in images


def test_write_training_report_from_a_train_state(runs, test_slice, tmp_path):
    images, labels = test_slice
    loaded = loader.load_model(runs["a"])
    # What train.py has at the end of training: a TrainState.
    state = train_state.TrainState.create(apply_fn=loaded.apply_fn, params=loaded.variables["params"],
                                          tx=optax.sgd(0.1), batch_stats=loaded.variables["batch_stats"])
    probs = predict.predict_probs(state, images, batch_size=runs["config"].eval_batch_size)
    np.testing.assert_array_equal(probs, predict.predict_probs(loaded, images))
    shutil.copy(os.path.join(runs["a"], "metrics.jsonl"), tmp_path / "metrics.jsonl")
    test = evaluate.SplitPredictions(images, labels, probs, ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"))
    paths = evaluate.write_training_report(str(tmp_path), None, test, step=64)
    assert sorted(paths) == ["test_confusion_matrix", "test_mistakes", "training_curves"]
    for path in paths.values():
        assert os.path.dirname(path) == str(tmp_path / "report")
        _png(path)
    assert os.listdir(tmp_path / "tensorboard")
    only_curves = evaluate.write_training_report(str(tmp_path / "other"), [{"step": 1, "train_loss": 2.0},
                                                                          {"step": 2, "train_loss": 1.0}],
                                                 tensorboard=False)
    assert list(only_curves) == ["training_curves"]


def test_compare_prints_every_workdir(runs):
    rc, out, err = _cli(evaluate_cli.compare_main, runs["a"], runs["b"])
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["workdir", "model", "params", "epochs", "wall_time_s", "val_accuracy",
                                "test_accuracy"]
    row_a = next(line for line in lines if line.startswith(runs["a"] + " "))
    row_b = next(line for line in lines if line.startswith(runs["b"] + " "))
    assert "resnet (1,1)x(8,16)" in row_a and "resnet (1,1)x(8,16)" in row_b
    assert row_a.split()[-5:-1] == ["1,234", "2", "12.5", "0.8750"]
    assert row_b.split()[-5:] == ["-", "-", "-", "-", "-"]


def test_subprocess_evaluate(runs, tmp_path):
    output = tmp_path / "out" / "report.json"
    proc = subprocess.run([sys.executable, "-m", "hwrjax.cli", "evaluate", f"--workdir={runs['a']}",
                           "--split=test[:50]", f"--output={output}", "--no_tensorboard"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Classification report (50 examples)" in proc.stdout
    assert json.loads(output.read_text())["num_examples"] == 50


def test_errors_are_one_line(runs, tmp_path):
    # The split is checked before any model is loaded: this workdir has no checkpoint.
    line = _one_line_error(*_cli(evaluate_cli.evaluate_main, "--workdir", runs["empty"], "--split=bogus")[::2])
    assert "unknown split 'bogus'" in line and all(s in line for s in ("test", "validation", "train"))
    line = _one_line_error(*_cli(evaluate_cli.evaluate_main, "--workdir", runs["empty"], f"--split={SPLIT}")[::2])
    assert "no checkpoint" in line
    line = _one_line_error(*_cli(evaluate_cli.evaluate_main, "--workdir", runs["a"], "--split=test[:20000]")[::2])
    assert "unknown split" in line and "10000" in line
    line = _one_line_error(*_cli(evaluate_cli.evaluate_main, "--workdir", runs["a"], "--workdir", runs["fashion"],
                                 f"--split={SPLIT}")[::2])
    assert "different datasets" in line and "fashion_mnist" in line
    with pytest.raises(CheckpointError, match="different datasets"):
        predict.ensemble_probs([runs["a"], runs["fashion"]], np.zeros((2, 28, 28, 1), np.uint8))
    line = _one_line_error(*_cli(evaluate_cli.evaluate_main, "--workdir", str(tmp_path / "missing"))[::2])
    assert "not a directory" in line
    assert "--workdir" in _one_line_error(*_cli(evaluate_cli.evaluate_main)[::2])
    assert "--tta" in _one_line_error(*_cli(evaluate_cli.evaluate_main, "--workdir", runs["a"], "--tta=x")[::2])
    line = _one_line_error(*_cli(evaluate_cli.compare_main, runs["a"], str(tmp_path))[::2])
    assert "is not a training workdir" in line and str(tmp_path) in line
    with pytest.raises(DataError, match="uint8"):
        predict.predict_probs(runs["a"], np.zeros((2, 28, 28, 1), np.float64))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        predict.predict_probs(runs["a"], np.full((2, 28, 28, 1), 2.0, np.float32))


def test_checkpoint_that_does_not_match_config(runs, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(runs["a"], edited)
    config = json.loads((edited / "config.json").read_text())
    config["model"]["stem_width"] = 4
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        loader.load_model(str(edited))


def test_report_stems_are_distinct():
    stems = {evaluate.report_stem(*args) for args in [("test",), ("test[:200]",), ("test[200:]",), ("test", 3),
                                                       ("test", 3, 8), ("test", 1, 8), ("test", 1, 1, "latest"),
                                                       ("test", 1, 0, 500), ("train[:10%]",)]}
    assert len(stems) == 9 and evaluate.report_stem("test", 1, 1) == "test"
    assert evaluate.report_stem("test", 3, 8) == "test_ensemble3_tta8"


# ---------------------------------------------------------------- a trained run against an independent oracle


def _oracle(workdir: str, images: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, losses and confusion matrix from the run's model applied directly to pixels / 255 with
    the averaged weights and statistics read from the checkpoint files (tests/conftest.py), at T = 1
    and at the run's stored calibration temperature."""
    logits = conftest.oracle_logits(workdir, images)
    probs = conftest.softmax(logits)
    calibrated = conftest.softmax(logits / conftest.oracle_temperature(workdir))
    preds = probs.argmax(-1)
    top2 = np.sort(probs, -1)[:, -2:]
    confusion = np.zeros((10, 10), np.int64)
    np.add.at(confusion, (labels, preds), 1)
    rows = np.arange(len(labels))
    return {"probs": probs, "calibrated_probs": calibrated, "accuracy": float(np.mean(preds == labels)),
            "confusion": confusion, "loss": float(-np.mean(np.log(probs[rows, labels]))),
            "calibrated_loss": float(-np.mean(np.log(calibrated[rows, labels]))),
            "mean_log_prob": float(np.mean(np.log(probs))),  # over all classes: the label smoothing term
            # Examples whose top two classes are too close to call at float32 rounding.
            "near_ties": int(np.sum(top2[:, 1] - top2[:, 0] < 1e-4))}


def _check_accuracy(report: dict, oracle: dict) -> None:
    n = conftest.TRAINED_SPLIT_SIZE
    assert report["num_examples"] == n
    assert abs(report["accuracy"] - oracle["accuracy"]) <= oracle["near_ties"] / n, (report["accuracy"], oracle)
    assert report["accuracy"] >= conftest.ACCURACY_FLOOR


def test_evaluate_of_a_trained_run_matches_an_independent_oracle(trained_workdir, mnist_test_slice):
    images, labels = mnist_test_slice
    oracle = _oracle(trained_workdir, images, labels)
    # The report written at the end of training (the best checkpoint's average): its loss is the
    # training loss, cross-entropy against labels smoothed as optax does ((1 - a) * one_hot + a / classes).
    with open(os.path.join(trained_workdir, "report", "test_metrics.json")) as f:
        report = json.load(f)
    _check_accuracy(report, oracle)
    a = conftest.trained_config().loss.label_smoothing
    assert report["loss"] == pytest.approx((1 - a) * oracle["loss"] - a * oracle["mean_log_prob"], rel=1e-4)

    rc, out, err = _cli(evaluate_cli.evaluate_main, f"--workdir={trained_workdir}", "--no_tensorboard")
    assert rc == 0, err
    with open(os.path.join(trained_workdir, "report", "test_metrics.json")) as f:
        report = json.load(f)
    assert report["split"] == conftest.TRAINED_SPLIT
    _check_accuracy(report, oracle)
    # evaluate's loss is the plain cross-entropy of the calibrated probabilities, and it lists the
    # uncalibrated one beside it.
    assert report["loss"] == pytest.approx(oracle["calibrated_loss"], rel=1e-4)
    assert report["calibration"]["uncalibrated_loss"] == pytest.approx(oracle["loss"], rel=1e-4)
    assert report["calibration"]["temperatures"] == [pytest.approx(conftest.oracle_temperature(trained_workdir))]
    confusion = np.asarray(report["confusion_matrix"])
    assert np.abs(confusion - oracle["confusion"]).sum() <= 2 * oracle["near_ties"], confusion
    assert [c["support"] for c in report["per_class"]] == np.bincount(labels, minlength=10).tolist()
    # The Python API gives the oracle's probabilities, whatever the batch size (here not dividing N).
    for batch_size in (1000, 384):
        probs = predict.predict_probs(trained_workdir, images, batch_size=batch_size)
        np.testing.assert_allclose(probs, oracle["calibrated_probs"], atol=1e-5)
    np.testing.assert_allclose(predict.predict_probs(trained_workdir, images, calibrated=False), oracle["probs"],
                               atol=1e-5)


def test_evaluate_reads_the_moving_average_not_the_raw_weights(trained_workdir, mnist_test_slice):
    images, labels = mnist_test_slice
    raw, _ = checkpoint.load_variables(trained_workdir, "best", average=False)
    loaded = loader.load_model(trained_workdir)
    # The run's raw weights and its average really differ, so reading the wrong ones shows.
    assert any(not np.allclose(a, b, atol=1e-4) for a, b in zip(jax.tree.leaves(raw),
                                                                 jax.tree.leaves(loaded.variables)))
    averaged, step = conftest.averaged_weights(trained_workdir)
    assert loaded.step == step
    for got, want in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(averaged)):
        np.testing.assert_array_equal(np.asarray(got), want)
