"""Tests for hwrjax.inference.metrics against hand-computed values."""

import json
import math

import numpy as np
import pytest

from hwrjax.inference import metrics

# Crafted predictions: N = 8 examples, C = 4 classes.
# Class 2 occurs (twice) but is never predicted; class 3 never occurs but is predicted once.
# No confidence sits on a 5-bin edge (0.2, 0.4, 0.6, 0.8).
#
#  i  label  probs                         pred  conf  p(label)  correct  label in top 2
#  0    0    [0.70, 0.20, 0.10, 0.00]        0   0.70    0.70       yes     yes
#  1    0    [0.65, 0.25, 0.10, 0.00]        0   0.65    0.65       yes     yes
#  2    0    [0.30, 0.55, 0.10, 0.05]        1   0.55    0.30       no      yes (2nd)
#  3    1    [0.10, 0.85, 0.05, 0.00]        1   0.85    0.85       yes     yes
#  4    1    [0.10, 0.20, 0.00, 0.70]        3   0.70    0.20       no      yes (2nd)
#  5    2    [0.85, 0.10, 0.05, 0.00]        0   0.85    0.05       no      no  (3rd)
#  6    2    [0.10, 0.55, 0.35, 0.00]        1   0.55    0.35       no      yes (2nd)
#  7    1    [0.05, 0.90, 0.05, 0.00]        1   0.90    0.90       yes     yes
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 1])
PROBS = np.array(
    [
        [0.70, 0.20, 0.10, 0.00],
        [0.65, 0.25, 0.10, 0.00],
        [0.30, 0.55, 0.10, 0.05],
        [0.10, 0.85, 0.05, 0.00],
        [0.10, 0.20, 0.00, 0.70],
        [0.85, 0.10, 0.05, 0.00],
        [0.10, 0.55, 0.35, 0.00],
        [0.05, 0.90, 0.05, 0.00],
    ]
)

# Confusion matrix (rows true, cols predicted):
#   true 0: preds 0, 0, 1     -> [2, 1, 0, 0]
#   true 1: preds 1, 3, 1     -> [0, 2, 0, 1]
#   true 2: preds 0, 1        -> [1, 1, 0, 0]
#   true 3: (none)            -> [0, 0, 0, 0]
EXPECTED_CM = [[2, 1, 0, 0], [0, 2, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0]]
# support = row sums = [3, 3, 2, 0]; predicted = column sums = [3, 4, 0, 1]; tp = [2, 2, 0, 0]
# precision = tp / predicted = [2/3, 2/4, 0 (never predicted), 0/1]
# recall    = tp / support   = [2/3, 2/3, 0/2, 0 (never occurs)]
# f1        = 2PR/(P+R)      = [2/3, 2*(1/2)*(2/3)/(1/2+2/3) = 4/7, 0, 0]
EXPECTED_PRECISION = [2 / 3, 1 / 2, 0.0, 0.0]
EXPECTED_RECALL = [2 / 3, 2 / 3, 0.0, 0.0]
EXPECTED_F1 = [2 / 3, 4 / 7, 0.0, 0.0]
# Macro averages over all 4 classes:
#   P = (2/3 + 1/2) / 4 = 7/24;  R = (2/3 + 2/3) / 4 = 1/3;  F1 = (2/3 + 4/7) / 4 = 13/42
# accuracy = 4/8 (i = 0, 1, 3, 7); top-2 = 7/8 (all but i = 5)
# loss = -mean(log p(label))
EXPECTED_LOSS = -sum(math.log(p) for p in [0.70, 0.65, 0.30, 0.85, 0.20, 0.05, 0.35, 0.90]) / 8
# Wrong: i = 2 (0.55), 4 (0.70), 5 (0.85), 6 (0.55) -> by descending confidence, ties by index:
EXPECTED_MISCLASSIFIED = [5, 4, 2, 6]
# ECE with 5 bins (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]:
#   (.4,.6]: i 2, 6        n=2 acc 0    conf 0.55               gap 0.55
#   (.6,.8]: i 0, 1, 4     n=3 acc 2/3  conf 2.05/3             gap 0.05/3
#   (.8,1]:  i 3, 5, 7     n=3 acc 2/3  conf 2.60/3             gap 0.60/3
#   ECE = 2/8*0.55 + 3/8*0.05/3 + 3/8*0.60/3 = 0.1375 + 0.00625 + 0.075 = 0.21875
EXPECTED_ECE_5 = 0.21875


def test_report_hand_computed() -> None:
    r = metrics.classification_report(LABELS, PROBS, num_ece_bins=5)
    assert r["num_examples"] == 8
    assert r["accuracy"] == pytest.approx(0.5)
    assert r["top2_accuracy"] == pytest.approx(7 / 8)
    assert r["loss"] == pytest.approx(EXPECTED_LOSS)
    assert r["confusion_matrix"] == EXPECTED_CM
    assert [c["precision"] for c in r["per_class"]] == pytest.approx(EXPECTED_PRECISION)
    assert [c["recall"] for c in r["per_class"]] == pytest.approx(EXPECTED_RECALL)
    assert [c["f1"] for c in r["per_class"]] == pytest.approx(EXPECTED_F1)
    assert [c["support"] for c in r["per_class"]] == [3, 3, 2, 0]
    assert [c["predicted"] for c in r["per_class"]] == [3, 4, 0, 1]
    assert [c["class"] for c in r["per_class"]] == [0, 1, 2, 3]
    assert [c["name"] for c in r["per_class"]] == ["0", "1", "2", "3"]
    assert r["macro_precision"] == pytest.approx(7 / 24)
    assert r["macro_recall"] == pytest.approx(1 / 3)
    assert r["macro_f1"] == pytest.approx(13 / 42)
    assert r["ece"] == pytest.approx(EXPECTED_ECE_5)
    assert r["misclassified"] == EXPECTED_MISCLASSIFIED
    top = r["most_confident_mistakes"]
    assert [m["index"] for m in top] == EXPECTED_MISCLASSIFIED
    assert top[0] == {
        "index": 5,
        "label": 2,
        "predicted": 0,
        "probability": pytest.approx(0.85),
        "label_probability": pytest.approx(0.05),
    }
    # Everything must survive a JSON round trip unchanged.
    assert json.loads(json.dumps(r)) == r


def test_report_float32_and_class_names_and_mistake_count() -> None:
    names = ["zero", "one", "two", "three"]
    r = metrics.classification_report(
        LABELS, PROBS.astype(np.float32), class_names=names, num_mistakes=2
    )
    assert [c["name"] for c in r["per_class"]] == names
    assert [m["index"] for m in r["most_confident_mistakes"]] == [5, 4]
    assert r["misclassified"] == EXPECTED_MISCLASSIFIED  # the full list is not truncated
    assert r["accuracy"] == pytest.approx(0.5)


def test_class_absent_and_never_predicted_counts_in_macro() -> None:
    # 3 classes; class 2 neither occurs nor is predicted.
    # preds = [0, 1, 1]: class 0 P=1/1 R=1/2 F1=2/3; class 1 P=1/2 R=1/1 F1=2/3; class 2 all 0.
    # Macro over all 3 classes: P = 1.5/3 = 0.5, R = 0.5, F1 = (4/3)/3 = 4/9.
    labels = np.array([0, 0, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3]])
    r = metrics.classification_report(labels, probs)
    assert r["per_class"][2] == {
        "class": 2, "name": "2", "precision": 0.0, "recall": 0.0, "f1": 0.0,
        "support": 0, "predicted": 0,
    }
    assert r["macro_precision"] == pytest.approx(0.5)
    assert r["macro_recall"] == pytest.approx(0.5)
    assert r["macro_f1"] == pytest.approx(4 / 9)


def test_confusion_matrix_helper() -> None:
    preds = PROBS.argmax(axis=1)
    cm = metrics.confusion_matrix(LABELS, preds, 4)
    assert cm.dtype == np.int64
    assert cm.tolist() == EXPECTED_CM
    assert metrics.confusion_matrix([1], [1], 3).tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="preds"):
        metrics.confusion_matrix([0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match="same shape"):
        metrics.confusion_matrix([0, 1], [0], 3)


def test_ece_crafted_cases() -> None:
    assert metrics.expected_calibration_error(LABELS, PROBS, 5) == pytest.approx(EXPECTED_ECE_5)
    # One bin: |accuracy - mean confidence| = |0.5 - 5.75/8| = 0.21875.
    assert metrics.expected_calibration_error(LABELS, PROBS, 1) == pytest.approx(0.21875)
    # Perfectly calibrated: 10 predictions at confidence 0.7, 7 of them right -> ECE 0.
    probs = np.tile([0.7, 0.3], (10, 1))
    labels = np.array([0] * 7 + [1] * 3)
    assert metrics.expected_calibration_error(labels, probs, 10) == pytest.approx(0.0, abs=1e-12)
    # Over-confident: 4 predictions at 0.9 with 2 right (gap 0.4) and 4 at 0.6 with 4 right
    # (gap 0.4, under-confident): ECE = 4/8*0.4 + 4/8*0.4 = 0.4 with 10 bins.
    probs = np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 4)
    labels = np.array([0, 0, 1, 1, 0, 0, 0, 0])
    assert metrics.expected_calibration_error(labels, probs, 10) == pytest.approx(0.4)
    # ... but with one bin the gaps cancel: |6/8 - 0.75| = 0.
    assert metrics.expected_calibration_error(labels, probs, 1) == pytest.approx(0.0, abs=1e-12)


def test_calibration_bins() -> None:
    bins = metrics.calibration_bins(LABELS, PROBS, 5)
    assert [b["count"] for b in bins] == [0, 0, 2, 3, 3]
    assert bins[0]["accuracy"] is None and bins[0]["confidence"] is None
    assert bins[3]["accuracy"] == pytest.approx(2 / 3)
    assert bins[3]["confidence"] == pytest.approx(2.05 / 3)
    assert bins[4]["lower"] == pytest.approx(0.8) and bins[4]["upper"] == pytest.approx(1.0)


def test_top_k_accuracy() -> None:
    assert metrics.top_k_accuracy(LABELS, PROBS, 1) == pytest.approx(0.5)
    assert metrics.top_k_accuracy(LABELS, PROBS, 2) == pytest.approx(7 / 8)
    # i = 5 has p(label) = 0.05, third behind 0.85 and 0.10.
    assert metrics.top_k_accuracy(LABELS, PROBS, 3) == pytest.approx(1.0)
    assert metrics.top_k_accuracy(LABELS, PROBS, 10) == pytest.approx(1.0)
    # Ties go to the lower class index, like argmax: with [0.5, 0.5] class 0 is top-1.
    tie = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert metrics.top_k_accuracy(np.array([0, 1]), tie, 1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k must"):
        metrics.top_k_accuracy(LABELS, PROBS, 0)


def test_loss_clips_zero_probability() -> None:
    r = metrics.classification_report(np.array([3]), np.array([[0.5, 0.25, 0.25, 0.0]]))
    assert r["loss"] == pytest.approx(-math.log(metrics.LOSS_EPSILON))


@pytest.mark.parametrize(
    "labels, probs, match",
    [
        (np.array([], dtype=int), np.zeros((0, 3)), "empty"),
        (np.array([0, 1]), np.full((3, 2), 0.5), "disagree on N"),
        (np.array([[0], [1]]), np.full((2, 2), 0.5), "1-D"),
        (np.array([0, 1]), np.array([0.5, 0.5]), "2-D"),
        (np.array([0, 2]), np.full((2, 2), 0.5), r"labels\[1\] = 2"),
        (np.array([-1, 0]), np.full((2, 2), 0.5), r"labels\[0\] = -1"),
        (np.array([0.0, 1.0]), np.full((2, 2), 0.5), "integer dtype"),
        (np.array([0, 1]), np.array([[2.0, -1.0], [0.5, 0.5]]), "negative"),
        (np.array([0, 1]), np.array([[3.0, 1.0], [0.5, 0.5]]), "sum to 1"),
        (np.array([0, 1]), np.array([[np.nan, 1.0], [0.5, 0.5]]), "NaN"),
    ],
)
def test_bad_input(labels: np.ndarray, probs: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        metrics.classification_report(labels, probs)
    assert "\n" not in str(info.value)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="class_names"):
        metrics.classification_report(LABELS, PROBS, class_names=["a", "b"])
    with pytest.raises(ValueError, match="num_bins"):
        metrics.classification_report(LABELS, PROBS, num_ece_bins=0)


def test_format_report() -> None:
    r = metrics.classification_report(
        LABELS, PROBS, class_names=["zero", "one", "two", "three"], num_ece_bins=5
    )
    text = metrics.format_report(r)
    lines = text.splitlines()
    assert lines[0] == "Classification report (8 examples)"
    assert any(line.split() == ["accuracy", "0.5000"] for line in lines)
    assert any(line.split() == ["top-2", "accuracy", "0.8750"] for line in lines)
    assert any(line.split() == ["ECE", "(5", "bins)", "0.2188"] for line in lines)
    assert ["one", "0.5000", "0.6667", "0.5714", "3", "4"] in [line.split() for line in lines]
    assert ["macro", "avg", "0.2917", "0.3333", "0.3095", "8", "8"] in [
        line.split() for line in lines
    ]
    # Confusion matrix block: header with class names, then one row per true class.
    start = next(i for i, line in enumerate(lines) if line.startswith("Confusion matrix"))
    assert lines[start + 1].split() == ["true", "\\", "pred", "zero", "one", "two", "three"]
    assert lines[start + 2].split() == ["zero", "2", "1", "0", "0"]
    assert lines[start + 4].split() == ["two", "1", "1", "0", "0"]
    # Columns are fixed width: the matrix rows all have the same length.
    assert len({len(line) for line in lines[start + 1 : start + 6]}) == 1
    # Works on a report that went through JSON.
    assert metrics.format_report(json.loads(json.dumps(r))) == text


def test_compare_table() -> None:
    rows = [
        {"workdir": "runs/cnn", "model": "cnn", "params": 1234567, "epochs": 10,
         "wall_time_s": 123.456, "val_accuracy": 0.99123, "test_accuracy": 0.9901},
        {"workdir": "runs/mlp-long", "model": "mlp", "val_accuracy": np.float32(0.97),
         "seed": 3},
    ]
    text = metrics.compare_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4
    header = lines[0].split()
    assert header == ["workdir", "model", "params", "epochs", "wall_time_s", "val_accuracy",
                      "test_accuracy", "seed"]
    assert lines[2].split() == ["runs/cnn", "cnn", "1,234,567", "10", "123.5", "0.9912",
                                "0.9901", "-"]
    assert lines[3].split() == ["runs/mlp-long", "mlp", "-", "-", "-", "0.9700", "-", "3"]
    # Numeric columns are right-aligned: every line ends the val_accuracy column at the
    # same character position as the header.
    end = lines[0].index("val_accuracy") + len("val_accuracy")
    assert lines[2][:end].endswith("0.9912") and lines[3][:end].endswith("0.9700")
    # Explicit column selection, and an empty table still has a header.
    assert metrics.compare_table(rows, columns=["model", "nope"]).splitlines()[2].split() == [
        "cnn", "-"
    ]
    assert metrics.compare_table([]).splitlines()[0].split()[0] == "workdir"
