"""Render MNIST digits the ways other collections and forms capture handwriting.

For tests and benchmarks of `hwrjax.apps.preprocess` beyond photos of paper: tight crops
(the digit fills the frame and touches its edges) at 8-32 px, binarized, quantized to a
few grey levels, stretched to fill a square box (aspect ratio lost), either polarity,
upscaled with hard pixels or smoothly, inside the box of a printed form, and with stains, specks and
scanner noise. Every renderer takes a 28x28 MNIST digit (white ink on black, uint8 or
[0, 1]) and a `np.random.Generator`, and returns a uint8 grey image, so the output is
deterministic given the generator's state.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from tests.support.synth import _ink01  # the one reader of a digit as [0, 1] ink

__all__ = ["FORMS", "render_form", "tight_crop", "classic_normalize"]


def _resize(a: np.ndarray, h: int, w: int, resample=Image.Resampling.LANCZOS) -> np.ndarray:
    im = Image.fromarray(np.ascontiguousarray(a, np.float32), mode="F")
    return np.clip(np.asarray(im.resize((w, h), resample), np.float32), 0.0, 1.0)


def _bbox(a: np.ndarray, eps: float = 0.05) -> tuple[int, int, int, int]:
    rows = np.flatnonzero((a > eps).any(axis=1))
    cols = np.flatnonzero((a > eps).any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def tight_crop(digit: np.ndarray, size: int, stretch: bool = False) -> np.ndarray:
    """The digit cropped to its ink and resized so its longer side is `size` (or size x size)."""
    ink = _ink01(digit)
    r0, r1, c0, c1 = _bbox(ink)
    crop = ink[r0:r1, c0:c1]
    if stretch:
        return _resize(crop, size, size)
    h, w = crop.shape
    f = size / max(h, w)
    return _resize(crop, max(1, round(h * f)), max(1, round(w * f)))


def classic_normalize(image: np.ndarray, light_ink: bool = True) -> np.ndarray:
    """The classic MNIST normalization by hand: box to 20 px, centre of mass at the centre of 28x28."""
    a = _ink01(image) if light_ink else 1.0 - _ink01(image)
    r0, r1, c0, c1 = _bbox(a, 0.0)
    crop = a[r0:r1, c0:c1]
    h, w = crop.shape
    f = 20.0 / max(h, w)
    crop = _resize(crop, max(1, round(h * f)), max(1, round(w * f)))
    canvas = np.zeros((56, 56), np.float32)
    top, left = (56 - crop.shape[0]) // 2, (56 - crop.shape[1]) // 2
    canvas[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    cy, cx = ndimage.center_of_mass(canvas)
    y0, x0 = int(round(cy)) - 14, int(round(cx)) - 14
    return canvas[y0 : y0 + 28, x0 : x0 + 28]


def _u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)


def _tight(size: int) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    return lambda d, rng: _u8(tight_crop(d, size))


def _inverted(render: Callable) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    return lambda d, rng: 255 - render(d, rng)


def _enlarged(render: Callable, k: int) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """A small scan enlarged k times with smooth (bilinear) interpolation, as a viewer or a set's
    upscaled copy makes it: the pixels are not hard, so the enlargement cannot be undone."""
    def enlarge(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        small = render(d, rng)
        return np.asarray(Image.fromarray(small).resize((small.shape[1] * k, small.shape[0] * k),
                                                        Image.Resampling.BILINEAR))
    return enlarge


def _binary(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _u8(tight_crop(d, 16) > 0.5)


def _levels(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _u8(np.round(tight_crop(d, 16) * 3.0) / 3.0)


def _stretched(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _u8(tight_crop(d, 16, stretch=True) > 0.5)


def _pixelated(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    small = tight_crop(d, 16)
    return _u8(np.kron(small, np.ones((4, 4), np.float32)))


def _form_box(sides: int) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """Dark ink in a printed box of a form: lines on `sides` sides (4, or 2 = left and bottom)."""

    def render(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        digit = tight_crop(d, int(rng.integers(36, 56)))
        h, w = digit.shape
        box = int(max(h, w) * rng.uniform(1.15, 1.35))
        size = box + 2 * int(rng.integers(2, 8))
        ink = np.zeros((size, size), np.float32)
        o = (size - box) // 2
        top = o + (box - h) // 2 + int(rng.integers(-2, 3))
        left = o + (box - w) // 2 + int(rng.integers(-3, 4))
        ink[top : top + h, left : left + w] = digit
        t = int(rng.integers(1, 4))
        lines = np.zeros_like(ink)
        lines[o + box - t : o + box, o : o + box] = 1  # bottom
        lines[o : o + box, o : o + t] = 1  # left
        if sides == 4:
            lines[o : o + t, o : o + box] = 1
            lines[o : o + box, o + box - t : o + box] = 1
        paper = rng.uniform(0.85, 1.0)
        grey = paper - (paper - rng.uniform(0.0, 0.25)) * np.maximum(ink, 0.7 * lines)
        grey += rng.normal(0, 0.02, grey.shape)
        return _u8(grey)

    return render


def _form_cell(sides: str) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """Dark ink in a form's box cropped on its lines: the lines are the image's edges (`sides` of
    "tblr": all four, the top open, only a comb field's separators left and right, the corner
    of a grid's bottom and left lines, or the line the digit is written on), no paper outside them."""

    def render(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        digit = tight_crop(d, int(rng.integers(24, 48)))
        h, w = digit.shape
        size = int(max(h, w) * rng.uniform(1.15, 1.35))
        ink = np.zeros((size, size), np.float32)
        top = min(max(0, (size - h) // 2 + int(rng.integers(-2, 3))), size - h)
        left = min(max(0, (size - w) // 2 + int(rng.integers(-3, 4))), size - w)
        ink[top : top + h, left : left + w] = digit
        t = int(rng.integers(1, 4))
        lines = np.zeros_like(ink)
        for side, band in zip("tblr", (np.s_[:t], np.s_[-t:], np.s_[:, :t], np.s_[:, -t:])):
            if side in sides:
                lines[band] = 1
        paper = rng.uniform(0.85, 1.0)
        grey = paper - (paper - rng.uniform(0.0, 0.25)) * np.maximum(ink, 0.7 * lines)
        grey += rng.normal(0, 0.02, grey.shape)
        return _u8(grey)

    return render


def _stained(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A scanned tight-ish crop: specks, a soft stain and scanner noise on light paper."""
    digit = tight_crop(d, int(rng.integers(24, 40)))
    h, w = digit.shape
    pad = int(rng.integers(0, 5))
    ink = np.pad(digit, pad)
    hh, ww = ink.shape
    yy, xx = np.mgrid[:hh, :ww]
    cy, cx = rng.uniform(0, hh), rng.uniform(0, ww)
    stain = 0.25 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.3 * max(hh, ww)) ** 2))
    specks = np.zeros_like(ink)
    for _ in range(int(rng.integers(3, 9))):
        specks[int(rng.integers(0, hh)), int(rng.integers(0, ww))] = 1.0
    specks = ndimage.grey_dilation(specks, size=(2, 2)) * 0.8
    grey = 0.95 - stain - 0.85 * np.maximum(ink, specks) + rng.normal(0, 0.04, ink.shape)
    return _u8(grey)


FORMS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "tight8": _tight(8),
    "tight12": _tight(12),
    "tight16": _tight(16),
    "tight24": _tight(24),
    "tight32": _tight(32),
    "tight8_enlarged4": _enlarged(_tight(8), 4),
    "tight16_dark_ink": _inverted(_tight(16)),
    "binary16": _binary,
    "binary16_dark_ink": _inverted(_binary),
    "levels16": _levels,
    "stretched16": _stretched,
    "stretched16_dark_ink": _inverted(_stretched),
    "pixelated64": _pixelated,
    "form_box": _form_box(4),
    "form_corner": _form_box(2),
    "form_cell": _form_cell("tblr"),
    "form_cell_open_top": _form_cell("blr"),
    "form_cell_comb": _form_cell("lr"),
    "form_cell_corner": _form_cell("bl"),
    "form_cell_baseline": _form_cell("b"),
    "stained": _stained,
}


def render_form(name: str, digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Renders one MNIST digit in the named form (a key of FORMS) as a uint8 grey image."""
    if name not in FORMS:
        raise ValueError(f"unknown form {name!r}; choose from {', '.join(FORMS)}")
    return FORMS[name](digit, rng)
