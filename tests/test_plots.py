"""Tests for hwrjax.apps.plots: decode the PNGs and check size, content and heatmap colours."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hwrjax.apps import plots


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _assert_not_blank(img: np.ndarray, min_colours: int = 8) -> None:
    assert img.std() > 10.0
    assert len(np.unique(img.reshape(-1, 3), axis=0)) >= min_colours


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _history() -> list[dict]:
    rows = []
    for step in range(0, 501, 50):
        rows.append({"step": step, "train_loss": 2.3 * np.exp(-step / 100) + 0.05,
                     "train_accuracy": 1 - 0.9 * np.exp(-step / 80),
                     "learning_rate": 1e-3 * min(1.0, step / 100)})
        if step and step % 250 == 0:
            rows.append({"step": step, "epoch": step // 250, "val_loss": 0.2,
                         "val_accuracy": 0.95})
    return rows


def test_training_curves_png(tmp_path: Path) -> None:
    out = plots.plot_training_curves(_history(), tmp_path / "sub" / "curves.png")
    assert out == tmp_path / "sub" / "curves.png"
    img = _load(out)
    w, h = plots.TRAINING_CURVES_SIZE
    assert img.shape == (int(h * plots.DPI), int(w * plots.DPI), 3)
    _assert_not_blank(img)
    # The PNG holds exactly the pixels of the in-memory rendering (for TensorBoard).
    arr = plots.figure_to_array(plots.training_curves_figure(_history()))
    assert arr.dtype == np.uint8 and arr.shape == img.shape
    np.testing.assert_array_equal(arr, img)


@pytest.mark.parametrize(
    "history",
    [
        [],
        [{"step": 10, "val_accuracy": 0.5}, {"step": 20, "val_accuracy": 0.7}],
        [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": None},
         {"step": 3, "train_loss": float("nan")}, {"train_loss": 0.5}, {"step": 4}],
    ],
)
def test_training_curves_missing_series(tmp_path: Path, history: list[dict]) -> None:
    img = _load(plots.plot_training_curves(history, tmp_path / "c.png"))
    assert img.shape == (400, 1200, 3)
    _assert_not_blank(img, min_colours=4)


def test_confusion_heatmap_matches_counts(tmp_path: Path) -> None:
    matrix = np.array([[50, 0, 3, 1], [2, 40, 0, 0], [0, 7, 20, 0], [1, 0, 0, 12]])
    fig = plots.confusion_matrix_figure(matrix, ["a", "b", "c", "d"])
    boxes = plots.confusion_cell_boxes(fig)
    img = _load(plots.save_figure(fig, tmp_path / "cm.png"))
    assert img.shape[:2] == (int(fig.bbox.height), int(fig.bbox.width))
    _assert_not_blank(img)
    assert boxes.shape == (4, 4, 4)

    def cell(i: int, j: int) -> np.ndarray:
        left, top, right, bottom = boxes[i, j]
        # Inner 80% of the cell; the median ignores the count annotation in the middle.
        dx, dy = 0.1 * (right - left), 0.1 * (bottom - top)
        return img[int(top + dy) : int(bottom - dy), int(left + dx) : int(right - dx)]

    # Cells are laid out left-to-right and top-to-bottom, each well over 20 px wide.
    assert np.all(np.diff(boxes[0, :, 0]) > 20) and np.all(np.diff(boxes[:, 0, 1]) > 20)
    background = np.array([[_luminance(np.median(cell(i, j).reshape(-1, 3), axis=0))
                            for j in range(4)] for i in range(4)])
    # Largest count is darkest, a zero count is (near) white.
    assert background[0, 0] == background.min() and background[0, 0] < 100
    assert background[0, 1] > 240
    # Colour intensity is ordered like the counts: more counts -> darker cell.
    order = np.argsort(matrix.reshape(-1), kind="stable")
    lum = background.reshape(-1)[order]
    counts = matrix.reshape(-1)[order]
    for a in range(len(counts) - 1):
        if counts[a] < counts[a + 1]:
            assert lum[a] > lum[a + 1] - 1.0
    # Readable text: the dark cell's annotation is drawn in a light colour.
    assert _luminance(cell(0, 0).reshape(-1, 3).astype(float)).max() > 200


def test_confusion_heatmap_normalized_and_bad_input(tmp_path: Path) -> None:
    matrix = np.array([[5, 5], [0, 100]])
    fig = plots.confusion_matrix_figure(matrix, normalize=True)
    assert plots.figure_to_array(fig).shape[2] == 3
    with pytest.raises(ValueError, match="square"):
        plots.plot_confusion_matrix(np.zeros((2, 3)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="class_names"):
        plots.confusion_matrix_figure(matrix, ["a"])
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("shape", [(5, 28, 28), (5, 28, 28, 1)])
def test_mistakes_grid(tmp_path: Path, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    images = np.zeros(shape)
    images[:, 8:20, 12:16] = 1.0  # a crude "1"
    images += 0.1 * rng.random(shape)
    labels, preds = [7, 3, 2, 9, 4], [1, 8, 2, 4, 9]
    probs = np.array([0.98, 0.6, 0.7, 0.51, 0.9])
    out = plots.plot_mistakes(images, labels, preds, probs, tmp_path / "m.png", ncols=3)
    img = _load(out)
    tw, th = plots.MISTAKE_TILE_SIZE
    assert img.shape == (int(2 * th * plots.DPI), int(3 * tw * plots.DPI), 3)
    _assert_not_blank(img)
    # Full [K, C] probabilities are accepted too and give the same picture.
    full = np.full((5, 10), 0.0)
    full[np.arange(5), preds] = probs
    arr = plots.figure_to_array(plots.mistakes_figure(images, labels, preds, full, ncols=3))
    np.testing.assert_array_equal(arr, img)


def test_mistakes_edge_cases(tmp_path: Path) -> None:
    img = _load(plots.plot_mistakes(np.zeros((0, 28, 28)), [], [], np.zeros(0), tmp_path / "e.png"))
    tw, th = plots.MISTAKE_TILE_SIZE
    assert img.shape == (int(th * plots.DPI), int(tw * plots.DPI), 3)
    with pytest.raises(ValueError, match="agree on K"):
        plots.mistakes_figure(np.zeros((2, 28, 28)), [1], [2], [0.5])
    with pytest.raises(ValueError, match="shape"):
        plots.mistakes_figure(np.zeros((2, 28)), [1, 1], [2, 2], [0.5, 0.5])


def test_figure_to_array_on_pyplot_figure() -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    fig = plt.figure(figsize=(2, 1), dpi=50)
    try:
        fig.add_subplot().plot([0, 1], [1, 0])
        canvas = fig.canvas
        arr = plots.figure_to_array(fig)
        assert arr.shape == (50, 100, 3) and arr.dtype == np.uint8
        assert fig.canvas is canvas
    finally:
        plt.close(fig)
