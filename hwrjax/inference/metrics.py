"""Evaluation metrics for classifiers, computed with numpy only.

Conventions (they match scikit-learn with ``labels=range(C)`` and
``zero_division=0``):

* The predicted class is ``argmax(probs)``; ties go to the lowest class index.
* A class that is never predicted has precision 0.
* A class that never occurs in ``labels`` has recall 0 and support 0.
* F1 is 0 whenever precision + recall is 0.
* Macro averages are unweighted means over **all** C classes, including
  classes that never occur and classes that are never predicted.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "LOSS_EPSILON",
    "classification_report",
    "confusion_matrix",
    "expected_calibration_error",
    "calibration_bins",
    "coverage_table",
    "format_coverage",
    "top_k_accuracy",
    "format_report",
    "compare_table",
]

# Probabilities are clipped to [LOSS_EPSILON, 1] before taking the log.
LOSS_EPSILON = 1e-12
# How far a row of ``probs`` may sum away from 1 (allows float16/bfloat16 softmax).
_ROW_SUM_TOLERANCE = 1e-2
# Number of entries in ``most_confident_mistakes`` by default.
DEFAULT_NUM_MISTAKES = 10


# --------------------------------------------------------------------------- #
# Input validation
# --------------------------------------------------------------------------- #


def _as_labels(labels: Any, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one example")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must have an integer dtype, got {arr.dtype}")
    return arr.astype(np.int64)


def _check_range(arr: np.ndarray, num_classes: int, name: str) -> None:
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), but {name}[{i}] = {int(arr[i])}"
        )


def _as_probs(probs: Any, num_examples: int) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"probs must be a 2-D array [N, C], got shape {arr.shape}")
    if arr.shape[0] != num_examples:
        raise ValueError(
            f"labels and probs disagree on N: {num_examples} labels vs probs of shape {arr.shape}"
        )
    if arr.shape[1] < 1:
        raise ValueError(f"probs must have at least one class column, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("probs contains NaN or infinite values")
    if (arr < 0).any():
        raise ValueError("probs contains negative values (pass softmax probabilities, not logits)")
    sums = arr.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > _ROW_SUM_TOLERANCE:
        raise ValueError(
            f"rows of probs must sum to 1 (pass softmax probabilities, not logits); "
            f"row {worst} sums to {sums[worst]:.6g}"
        )
    return arr


def _validate(labels: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    labels_arr = _as_labels(labels)
    probs_arr = _as_probs(probs, labels_arr.shape[0])
    _check_range(labels_arr, probs_arr.shape[1], "labels")
    return labels_arr, probs_arr


def _check_num_bins(num_bins: int) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 1:
        raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}")
    return int(num_bins)


# --------------------------------------------------------------------------- #
# Public helpers
# --------------------------------------------------------------------------- #


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Return the [C, C] int64 confusion matrix; rows are true classes, columns predictions."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    labels_arr = _as_labels(labels, "labels")
    preds_arr = _as_labels(preds, "preds")
    if labels_arr.shape != preds_arr.shape:
        raise ValueError(
            f"labels and preds must have the same shape, got {labels_arr.shape} and {preds_arr.shape}"
        )
    _check_range(labels_arr, num_classes, "labels")
    _check_range(preds_arr, num_classes, "preds")
    flat = labels_arr * num_classes + preds_arr
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _rank_of_label(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """0-based rank of the true class when classes are sorted by descending probability.

    Ties are broken towards the lower class index, consistently with ``argmax``.
    """
    p_true = probs[np.arange(labels.shape[0]), labels][:, None]
    idx = np.arange(probs.shape[1])[None, :]
    higher = probs > p_true
    tied_before = (probs == p_true) & (idx < labels[:, None])
    return (higher | tied_before).sum(axis=1)


def top_k_accuracy(labels: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Return the fraction of examples whose true class is among the k most probable classes."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    labels_arr, probs_arr = _validate(labels, probs)
    return float(np.mean(_rank_of_label(labels_arr, probs_arr) < k))


def calibration_bins(labels: np.ndarray, probs: np.ndarray, num_bins: int = 15) -> list[dict]:
    """Return per-bin confidence/accuracy statistics over equal-width confidence bins.

    Confidence is the max probability. Bin i covers ``(i/B, (i+1)/B]``; the first bin
    also includes 0. Each dict has ``lower``, ``upper``, ``count`` and ``accuracy`` /
    ``confidence`` (both None for an empty bin).
    """
    num_bins = _check_num_bins(num_bins)
    labels_arr, probs_arr = _validate(labels, probs)
    return _calibration_bins(labels_arr, probs_arr, num_bins)


def _calibration_bins(labels: np.ndarray, probs: np.ndarray, num_bins: int) -> list[dict]:
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # right=True: a confidence equal to an inner edge belongs to the lower bin.
    which = np.digitize(confidence, edges[1:-1], right=True)
    bins = []
    for b in range(num_bins):
        mask = which == b
        count = int(mask.sum())
        bins.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": count,
                "accuracy": float(correct[mask].mean()) if count else None,
                "confidence": float(confidence[mask].mean()) if count else None,
            }
        )
    return bins


def _ece_from_bins(bins: Sequence[Mapping[str, Any]], total: int) -> float:
    ece = 0.0
    for b in bins:
        if b["count"]:
            ece += b["count"] / total * abs(b["accuracy"] - b["confidence"])
    return float(ece)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, num_bins: int = 15) -> float:
    """Return the ECE: sum over equal-width confidence bins of (n_bin/N) * |accuracy - confidence|."""
    bins = calibration_bins(labels, probs, num_bins)
    return _ece_from_bins(bins, int(np.asarray(labels).shape[0]))


def coverage_table(labels: np.ndarray, probs: np.ndarray, thresholds: Sequence[float]) -> list[dict]:
    """Accuracy against the share of examples kept, for each confidence threshold.

    An example is kept when its confidence (max probability) is >= the threshold, and is
    "unsure" otherwise. Each dict has ``min_confidence``, ``kept`` (share of all examples),
    ``num_kept`` and ``accuracy`` of the kept ones (None when none is kept).
    """
    labels_arr, probs_arr = _validate(labels, probs)
    confidence = probs_arr.max(axis=1)
    correct = probs_arr.argmax(axis=1) == labels_arr
    rows = []
    for t in thresholds:
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"thresholds must be numbers in [0, 1], got {t!r}")
        keep = confidence >= float(t)
        num = int(keep.sum())
        rows.append({"min_confidence": float(t), "kept": num / len(labels_arr), "num_kept": num,
                     "accuracy": float(correct[keep].mean()) if num else None})
    return rows


def format_coverage(rows: Sequence[Mapping[str, Any]]) -> str:
    """A text table of ``coverage_table`` rows: threshold, share kept, count kept, accuracy of those kept."""
    lines = [f"{'min confidence':>14}  {'kept':>8}  {'count':>7}  {'accuracy':>8}"]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        lines.append(f"{r['min_confidence']:>14.3f}  {100 * r['kept']:>7.2f}%  {r['num_kept']:>7}  {acc:>8}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# The report
# --------------------------------------------------------------------------- #


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def classification_report(
    labels: np.ndarray,
    probs: np.ndarray,
    *,
    class_names: Sequence[str] | None = None,
    num_ece_bins: int = 15,
    num_mistakes: int = DEFAULT_NUM_MISTAKES,
) -> dict:
    """Return a JSON-serializable dict of accuracy, loss, per-class and calibration metrics.

    ``labels`` is int [N] and ``probs`` float [N, C] with rows summing to 1; C is taken
    from ``probs``. Conventions (sklearn, ``zero_division=0``): a class never predicted
    has precision 0; a class that never occurs has recall 0 and support 0; F1 is 0
    when precision + recall is 0; macro averages are unweighted over all C classes.
    ``misclassified`` lists the indices of wrong predictions by descending confidence
    (ties: lower index first); ``most_confident_mistakes`` details the first
    ``num_mistakes`` of them. Raises ValueError on malformed input.
    """
    labels_arr, probs_arr = _validate(labels, probs)
    num_ece_bins = _check_num_bins(num_ece_bins)
    if isinstance(num_mistakes, bool) or not isinstance(num_mistakes, numbers.Integral) or num_mistakes < 0:
        raise ValueError(f"num_mistakes must be a non-negative integer, got {num_mistakes!r}")
    n, c = probs_arr.shape
    if class_names is None:
        names = [str(i) for i in range(c)]
    else:
        names = [str(s) for s in class_names]
        if len(names) != c:
            raise ValueError(f"class_names has {len(names)} entries but probs has {c} classes")

    preds = probs_arr.argmax(axis=1)
    confidence = probs_arr.max(axis=1)
    rows = np.arange(n)
    p_true = probs_arr[rows, labels_arr]

    cm = confusion_matrix(labels_arr, preds, c)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)

    per_class = []
    for k in range(c):
        precision = _safe_div(tp[k], predicted[k])
        recall = _safe_div(tp[k], support[k])
        f1 = _safe_div(2 * precision * recall, precision + recall)
        per_class.append(
            {
                "class": k,
                "name": names[k],
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "support": int(support[k]),
                "predicted": int(predicted[k]),
            }
        )

    wrong = np.flatnonzero(preds != labels_arr)
    # Stable sort on -confidence: most confident first, ties by ascending index.
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    mistakes = [
        {
            "index": int(i),
            "label": int(labels_arr[i]),
            "predicted": int(preds[i]),
            "probability": float(confidence[i]),
            "label_probability": float(p_true[i]),
        }
        for i in wrong[: int(num_mistakes)]
    ]

    bins = _calibration_bins(labels_arr, probs_arr, num_ece_bins)
    loss = -np.log(np.clip(p_true, LOSS_EPSILON, 1.0)).mean()

    return {
        "num_examples": int(n),
        "num_classes": int(c),
        "accuracy": float(np.mean(preds == labels_arr)),
        "loss": float(loss),
        "top2_accuracy": float(np.mean(_rank_of_label(labels_arr, probs_arr) < 2)),
        "per_class": per_class,
        "macro_precision": float(np.mean([r["precision"] for r in per_class])),
        "macro_recall": float(np.mean([r["recall"] for r in per_class])),
        "macro_f1": float(np.mean([r["f1"] for r in per_class])),
        "confusion_matrix": cm.tolist(),
        "ece": _ece_from_bins(bins, n),
        "num_ece_bins": num_ece_bins,
        "calibration_bins": bins,
        "misclassified": [int(i) for i in wrong],
        "most_confident_mistakes": mistakes,
    }


# --------------------------------------------------------------------------- #
# Text formatting
# --------------------------------------------------------------------------- #


def _fmt_float(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{float(x):.{digits}f}"


def format_report(report: Mapping[str, Any]) -> str:
    """Return a fixed-width text rendering of a ``classification_report`` dict."""
    lines: list[str] = []
    n = report.get("num_examples", "?")
    lines.append(f"Classification report ({n} examples)")
    bins = report.get("num_ece_bins")
    ece_label = f"ECE ({bins} bins)" if bins is not None else "ECE"
    summary = [
        ("accuracy", _fmt_float(report.get("accuracy"))),
        ("top-2 accuracy", _fmt_float(report.get("top2_accuracy"))),
        ("loss (NLL)", _fmt_float(report.get("loss"))),
        (ece_label, _fmt_float(report.get("ece"))),
    ]
    key_w = max(len(k) for k, _ in summary)
    for key, value in summary:
        lines.append(f"  {key:<{key_w}}  {value}")

    per_class = list(report.get("per_class", []))
    if per_class:
        names = [str(r.get("name", r.get("class", "?"))) for r in per_class]
        name_w = max([len("class"), len("macro avg")] + [len(s) for s in names])
        header = (
            f"{'class':<{name_w}}  {'precision':>9}  {'recall':>9}  {'f1':>9}"
            f"  {'support':>9}  {'predicted':>9}"
        )
        lines.append("")
        lines.append(header)
        lines.append("-" * len(header))
        for name, r in zip(names, per_class):
            lines.append(
                f"{name:<{name_w}}  {_fmt_float(r.get('precision')):>9}"
                f"  {_fmt_float(r.get('recall')):>9}  {_fmt_float(r.get('f1')):>9}"
                f"  {r.get('support', '-'):>9}  {r.get('predicted', '-'):>9}"
            )
        lines.append("-" * len(header))
        total_support = sum(int(r.get("support", 0)) for r in per_class)
        total_pred = sum(int(r.get("predicted", 0)) for r in per_class)
        lines.append(
            f"{'macro avg':<{name_w}}  {_fmt_float(report.get('macro_precision')):>9}"
            f"  {_fmt_float(report.get('macro_recall')):>9}"
            f"  {_fmt_float(report.get('macro_f1')):>9}"
            f"  {total_support:>9}  {total_pred:>9}"
        )

    cm = report.get("confusion_matrix")
    if cm:
        c = len(cm)
        names = (
            [str(r.get("name", i)) for i, r in enumerate(per_class)]
            if len(per_class) == c
            else [str(i) for i in range(c)]
        )
        corner = "true \\ pred"
        row_w = max([len(corner)] + [len(s) for s in names])
        cell_w = max([len(s) for s in names] + [len(str(v)) for row in cm for v in row])
        lines.append("")
        lines.append("Confusion matrix (rows = true class, columns = predicted class)")
        lines.append(f"{corner:<{row_w}} " + " ".join(f"{s:>{cell_w}}" for s in names))
        for name, row in zip(names, cm):
            lines.append(f"{name:<{row_w}} " + " ".join(f"{int(v):>{cell_w}}" for v in row))

    mistakes = report.get("most_confident_mistakes") or []
    if mistakes:
        lines.append("")
        lines.append("Most confident mistakes")
        for m in mistakes:
            lines.append(
                f"  #{m.get('index')}: true {m.get('label')} -> pred {m.get('predicted')}"
                f" (p={_fmt_float(m.get('probability'), 3)})"
            )
    return "\n".join(lines)


_COMPARE_COLUMNS = (
    "workdir",
    "model",
    "params",
    "epochs",
    "wall_time_s",
    "val_accuracy",
    "test_accuracy",
)


def _fmt_cell(key: str, value: Any) -> tuple[str, bool]:
    """Format one table cell; returns (text, right_align)."""
    if value is None:
        return "-", False
    if isinstance(value, bool):
        return str(value), False
    if isinstance(value, numbers.Integral):
        return (f"{int(value):,}" if key == "params" else str(int(value))), True
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v):
            return str(v), True
        if key.endswith("_s") or key.endswith("time"):
            return f"{v:.1f}", True
        if "accuracy" in key or key.endswith("_acc"):
            return f"{v:.4f}", True
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v)), True
        return f"{v:.4g}", True
    return str(value), False


def compare_table(rows: Sequence[Mapping[str, Any]], *, columns: Sequence[str] | None = None) -> str:
    """Return an aligned side-by-side text table of run summaries (missing values shown as "-").

    Columns default to workdir, model, params, epochs, wall_time_s, val_accuracy,
    test_accuracy, followed by any other keys in first-seen order. Numbers are
    right-aligned, text left-aligned.
    """
    if columns is None:
        cols = list(_COMPARE_COLUMNS)
        for row in rows:
            for key in row:
                if key not in cols:
                    cols.append(key)
    else:
        cols = [str(c) for c in columns]
    table: list[list[tuple[str, bool]]] = []
    for row in rows:
        table.append([_fmt_cell(col, row.get(col)) for col in cols])
    widths = [max([len(col)] + [len(r[j][0]) for r in table]) for j, col in enumerate(cols)]
    # A column is right-aligned when every present value in it is numeric.
    right = [
        bool(table) and all(r[j][1] or r[j][0] == "-" for r in table) and any(r[j][1] for r in table)
        for j in range(len(cols))
    ]

    def fmt_line(cells: Sequence[str]) -> str:
        parts = [
            f"{text:>{w}}" if r else f"{text:<{w}}" for text, w, r in zip(cells, widths, right)
        ]
        return "  ".join(parts).rstrip()

    lines = [fmt_line(cols), fmt_line(["-" * w for w in widths])]
    lines.extend(fmt_line([cell[0] for cell in r]) for r in table)
    return "\n".join(lines)
