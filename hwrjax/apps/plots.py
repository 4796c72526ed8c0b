"""Figures for training runs and evaluations, rendered headlessly with Agg.

Every plot comes in two forms:

* ``*_figure(...) -> Figure`` builds a ``matplotlib.figure.Figure`` (no pyplot, so
  no global state and no display are involved); turn it into an RGB array with
  :func:`figure_to_array` (e.g. for TensorBoard) or write it with :func:`save_figure`.
* ``plot_*(..., path) -> Path`` builds the figure and writes it as a PNG.

Figures have a fixed size in inches and are rendered at :data:`DPI`, so the pixel
size is known in advance, and the PNG is exactly the array from
:func:`figure_to_array`. This module never calls ``matplotlib.use``, so the
caller's own pyplot backend is left alone.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colors as mcolors
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from hwrjax.training.storage import atomic_file

__all__ = [
    "DPI",
    "TRAINING_CURVES_SIZE",
    "figure_to_array",
    "save_figure",
    "training_curves_figure",
    "plot_training_curves",
    "confusion_matrix_figure",
    "plot_confusion_matrix",
    "confusion_cell_boxes",
    "mistakes_figure",
    "plot_mistakes",
]

DPI = 100
# (width, height) in inches of the training-curves figure: 1200 x 400 px at DPI.
TRAINING_CURVES_SIZE = (12.0, 4.0)
# Size in inches of one image tile in the mistakes grid: 150 x 170 px at DPI.
MISTAKE_TILE_SIZE = (1.5, 1.7)
_HEATMAP_LABEL = "hwrjax-confusion-matrix"
_CMAP = "Blues"


# --------------------------------------------------------------------------- #
# Rendering helpers
# --------------------------------------------------------------------------- #


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure at its own DPI and return it as an [H, W, 3] uint8 RGB array."""
    canvas = fig.canvas
    if isinstance(canvas, FigureCanvasAgg):
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()
    # Non-Agg canvas (e.g. a pyplot figure on another backend): render through a
    # temporary Agg canvas, then give the figure its original canvas back.
    agg = FigureCanvasAgg(fig)
    try:
        agg.draw()
        return np.asarray(agg.buffer_rgba())[..., :3].copy()
    finally:
        fig.set_canvas(canvas)


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write a figure as an RGB PNG (pixels identical to ``figure_to_array``) and return the path."""
    path = Path(path)
    with atomic_file(os.fspath(path)) as f:
        Image.fromarray(figure_to_array(fig), mode="RGB").save(f, format="PNG")
    return path


def _no_data(ax: Any, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "no data", ha="center", va="center", color="0.5", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- #
# Training curves
# --------------------------------------------------------------------------- #


def _as_finite_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of rows that have both a numeric ``step`` and a finite ``key``."""
    pts = []
    for row in history:
        step = _as_finite_float(row.get("step"))
        value = _as_finite_float(row.get(key))
        if step is not None and value is not None:
            pts.append((step, value))
    pts.sort(key=lambda p: p[0])
    arr = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def training_curves_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    """Build a 3-panel figure (loss, accuracy, learning rate vs step) from metrics.jsonl rows."""
    fig = _new_figure(*TRAINING_CURVES_SIZE)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    panels = [
        (ax_loss, "loss", [("train_loss", "train", "-", "min"), ("val_loss", "val", "o-", "min")]),
        (
            ax_acc,
            "accuracy",
            [("train_accuracy", "train", "-", "max"), ("val_accuracy", "val", "o-", "max")],
        ),
        (ax_lr, "learning rate", [("learning_rate", None, "-", None)]),
    ]
    colours = {"train": "tab:blue", "val": "tab:orange", None: "tab:green"}
    for ax, title, specs in panels:
        drawn = 0
        for key, label, style, best in specs:
            steps, values = _series(history, key)
            if steps.size == 0:
                continue
            legend = label
            if label is not None and best is not None:
                best_value = values.min() if best == "min" else values.max()
                legend = f"{label} ({best} {best_value:.4g})"
            ax.plot(
                steps, values, style, color=colours[label], label=legend, markersize=3, linewidth=1.2
            )
            drawn += 1
        if not drawn:
            _no_data(ax, title)
            continue
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if any(label is not None for _, label, _, _ in specs):
            ax.legend(loc="best", fontsize=8)
        if ax is ax_lr:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return fig


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write the training-curves figure (1200 x 400 px) to ``path`` as PNG and return the path."""
    return save_figure(training_curves_figure(history), path)


# --------------------------------------------------------------------------- #
# Confusion matrix heatmap
# --------------------------------------------------------------------------- #


def _check_matrix(matrix: Any) -> np.ndarray:
    m = np.asarray(matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"confusion matrix must be a non-empty square [C, C] array, got shape {m.shape}")
    if not np.isfinite(m.astype(np.float64)).all() or (m < 0).any():
        raise ValueError("confusion matrix must contain non-negative finite counts")
    return m


def confusion_matrix_figure(
    matrix: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    normalize: bool = False,
) -> Figure:
    """Build an annotated confusion-matrix heatmap (rows true, columns predicted).

    Cells show the counts; the colour is the count, or the row fraction (recall)
    when ``normalize`` is true, on a linear white-to-blue scale.
    """
    m = _check_matrix(matrix)
    c = m.shape[0]
    names = [str(i) for i in range(c)] if class_names is None else [str(s) for s in class_names]
    if len(names) != c:
        raise ValueError(f"class_names has {len(names)} entries but the matrix is {c} x {c}")

    counts = m.astype(np.float64)
    if normalize:
        row_sums = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)
        norm = mcolors.Normalize(vmin=0.0, vmax=1.0)
    else:
        values = counts
        norm = mcolors.Normalize(vmin=0.0, vmax=max(1.0, float(counts.max())))
    cmap = colormaps[_CMAP]

    side = float(min(14.0, max(5.0, 0.5 * c + 2.0)))
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1, label=_HEATMAP_LABEL)
    im = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    cbar = fig.colorbar(im, ax=ax, shrink=0.8)
    cbar.set_label("fraction of true class" if normalize else "count")

    ax.set_xticks(range(c), labels=names, rotation=90 if c > 20 or max(map(len, names)) > 3 else 0)
    ax.set_yticks(range(c), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix" + (" (colour: row-normalised)" if normalize else ""))

    fontsize = float(np.clip(90.0 / c, 5.0, 10.0))
    is_int = np.issubdtype(m.dtype, np.integer) or np.all(counts == np.round(counts))
    for i in range(c):
        for j in range(c):
            text = str(int(counts[i, j])) if is_int else f"{counts[i, j]:.3g}"
            r, g, b, _ = cmap(norm(values[i, j]))
            luminance = 0.299 * r + 0.587 * g + 0.114 * b
            colour = "white" if luminance < 0.5 else ("0.55" if counts[i, j] == 0 else "black")
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=fontsize)
    return fig


def plot_confusion_matrix(
    matrix: np.ndarray,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    *,
    normalize: bool = False,
) -> Path:
    """Write the annotated confusion-matrix heatmap to ``path`` as PNG and return the path."""
    return save_figure(confusion_matrix_figure(matrix, class_names, normalize=normalize), path)


def confusion_cell_boxes(fig: Figure) -> np.ndarray:
    """Return [C, C, 4] pixel boxes (left, top, right, bottom) of heatmap cells, image coordinates.

    ``fig`` must come from :func:`confusion_matrix_figure`. Coordinates index the
    array of :func:`figure_to_array` / the saved PNG (origin top-left, y down).
    """
    axes = [ax for ax in fig.axes if ax.get_label() == _HEATMAP_LABEL]
    if not axes:
        raise ValueError("figure has no confusion-matrix heatmap (use confusion_matrix_figure)")
    ax = axes[0]
    figure_to_array(fig)  # run the layout so the transforms are final
    c = ax.images[0].get_array().shape[0]
    height = fig.bbox.height
    edges = np.arange(c + 1) - 0.5
    xs = ax.transData.transform(np.stack([edges, np.zeros_like(edges)], axis=1))[:, 0]
    ys = height - ax.transData.transform(np.stack([np.zeros_like(edges), edges], axis=1))[:, 1]
    boxes = np.empty((c, c, 4), dtype=np.float64)
    for i in range(c):
        for j in range(c):
            boxes[i, j] = (xs[j], ys[i], xs[j + 1], ys[i + 1])
    return boxes


# --------------------------------------------------------------------------- #
# Mistakes grid
# --------------------------------------------------------------------------- #


def _check_images(images: Any) -> np.ndarray:
    imgs = np.asarray(images)
    if imgs.ndim == 4 and imgs.shape[-1] == 1:
        imgs = imgs[..., 0]
    if imgs.ndim != 3:
        raise ValueError(f"images must have shape [K, H, W] or [K, H, W, 1], got {np.shape(images)}")
    if imgs.dtype == np.uint8:
        return imgs.astype(np.float64) / 255.0
    return imgs.astype(np.float64)


def mistakes_figure(
    images: np.ndarray,
    labels: Sequence[int],
    preds: Sequence[int],
    probs: np.ndarray,
    *,
    ncols: int = 8,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Build a grid of images titled "true 7 → pred 1 (0.98)" (red if wrong, green if right).

    ``images`` is [K, H, W] or [K, H, W, 1] floats in [0, 1] (uint8 is scaled by
    1/255); ``probs`` is either the [K] probability of each prediction or the full
    [K, C] probabilities. Each tile is ``MISTAKE_TILE_SIZE`` inches, so the figure is
    150*min(K, ncols) x 170*ceil(K/ncols) px (one tile if K == 0).
    """
    imgs = _check_images(images)
    k = imgs.shape[0]
    labels_arr = np.asarray(labels).reshape(-1)
    preds_arr = np.asarray(preds).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if labels_arr.shape[0] != k or preds_arr.shape[0] != k or p.shape[:1] != (k,):
        raise ValueError(
            f"images, labels, preds and probs must agree on K: got {k}, {labels_arr.shape[0]}, "
            f"{preds_arr.shape[0]}, {p.shape[0] if p.ndim else 'scalar'}"
        )
    if p.ndim == 2:
        p = p[np.arange(k), preds_arr.astype(np.int64)]
    elif p.ndim != 1:
        raise ValueError(f"probs must be [K] or [K, C], got shape {p.shape}")
    if isinstance(ncols, bool) or not isinstance(ncols, numbers.Integral) or ncols < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}")

    def name(c: Any) -> str:
        return str(class_names[int(c)]) if class_names is not None else str(int(c))

    cols = max(1, min(int(ncols), k))
    rows = max(1, math.ceil(k / cols))
    tile_w, tile_h = MISTAKE_TILE_SIZE
    fig = _new_figure(tile_w * cols, tile_h * rows)
    if k == 0:
        _no_data(fig.add_subplot(1, 1, 1), "no images")
        return fig
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for idx, ax in enumerate(axes):
        ax.set_axis_off()
        if idx >= k:
            continue
        ax.imshow(imgs[idx], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        right = int(labels_arr[idx]) == int(preds_arr[idx])
        ax.set_title(
            f"true {name(labels_arr[idx])} \u2192 pred {name(preds_arr[idx])} ({p[idx]:.2f})",
            fontsize=8,
            color="tab:green" if right else "tab:red",
        )
    return fig


def plot_mistakes(
    images: np.ndarray,
    labels: Sequence[int],
    preds: Sequence[int],
    probs: np.ndarray,
    path: str | os.PathLike,
    *,
    ncols: int = 8,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the image grid of :func:`mistakes_figure` to ``path`` as PNG and return the path."""
    fig = mistakes_figure(images, labels, preds, probs, ncols=ncols, class_names=class_names)
    return save_figure(fig, path)
