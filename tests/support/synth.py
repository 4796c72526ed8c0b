"""Render MNIST-style 28x28 digits as synthetic "photos" of ink on paper.

For tests and benchmarks of `hwrjax.apps.preprocess`: the output looks like a phone
photo or scan of a digit written with a dark pen on light paper: upscaled
strokes, random paper and ink tones, the digit off centre on a larger sheet, a
lighting gradient, blur and sensor noise. Everything random comes from the
`np.random.Generator` passed in, so the output is deterministic given its state.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["render_photo", "render_number"]


def _ink01(digit28: np.ndarray) -> np.ndarray:
    """A 2-D digit (uint8 0..255 or float 0..1, white ink on black) as float32 in [0, 1]."""
    a = np.asarray(digit28)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"expected a non-empty 2-D digit image, got shape {a.shape}")
    if a.dtype == np.uint8 or float(a.max(initial=0)) > 1.0:
        a = a.astype(np.float32) / 255.0
    return np.clip(a.astype(np.float32), 0.0, 1.0)


def _upscale(ink: np.ndarray, scale: int) -> np.ndarray:
    """Smoothly upscales an ink map by an integer factor."""
    h, w = ink.shape
    im = Image.fromarray(np.ascontiguousarray(ink, np.float32), mode="F")
    big = np.asarray(im.resize((w * scale, h * scale), Image.Resampling.BICUBIC), np.float32)
    return np.clip(big, 0.0, 1.0)


def _photo(
    ink: np.ndarray,
    rng: np.random.Generator,
    *,
    scale: int,
    margin: float,
    rgb: bool,
    paper: tuple[float, float],
    ink_tone: tuple[float, float],
    gradient: float,
    noise: float,
    blur: tuple[float, float],
) -> tuple[np.ndarray, tuple[int, int]]:
    """Puts an ink map (1 = ink) on a larger sheet of lit, blurred, noisy paper.

    Returns the uint8 photo and the (row, col) where the ink map's origin landed.
    """
    h, w = ink.shape
    extra = int(round(margin * min(h, w)))
    canvas = np.zeros((h + extra, w + extra), np.float32)
    top, left = (int(v) for v in rng.integers(0, extra + 1, size=2))
    canvas[top : top + h, left : left + w] = ink

    p = float(rng.uniform(*paper))
    q = float(rng.uniform(*ink_tone))
    q = min(q, p - 0.25)
    if rgb:
        paper_rgb = p * np.array([1.0, rng.uniform(0.94, 1.0), rng.uniform(0.82, 0.98)])
        pen = rng.choice(["black", "blue"])
        ink_rgb = np.full(3, q)
        if pen == "blue":
            ink_rgb = q * np.array([0.6, 0.8, 1.0]) + np.array([0.0, 0.05, rng.uniform(0.1, 0.3)])
        tones = [(float(a), float(b)) for a, b in zip(paper_rgb, ink_rgb)]
    else:
        tones = [(p, q)]

    hh, ww = canvas.shape
    theta = rng.uniform(0, 2 * np.pi)
    amount = rng.uniform(0, gradient)
    yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float32)
    ramp = (np.cos(theta) * (xx / ww - 0.5) + np.sin(theta) * (yy / hh - 0.5)).astype(np.float32)
    light = 1.0 + amount * ramp
    sigma = rng.uniform(*blur) * scale / 8.0
    noise_sigma = noise * rng.uniform(0.5, 1.0)

    channels = []
    for paper_level, ink_level in tones:
        img = paper_level + (ink_level - paper_level) * canvas
        img = img * light
        if sigma > 0:
            img = ndimage.gaussian_filter(img, sigma)
        img = img + rng.normal(0.0, noise_sigma, img.shape).astype(np.float32)
        channels.append(img)
    out = np.stack(channels, axis=-1) if rgb else channels[0]
    return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8), (top, left)


def render_photo(
    digit28: np.ndarray,
    rng: np.random.Generator,
    scale: int = 8,
    *,
    rgb: bool = False,
    margin: float = 0.5,
    paper: tuple[float, float] = (0.6, 0.95),
    ink_tone: tuple[float, float] = (0.0, 0.35),
    gradient: float = 0.3,
    noise: float = 0.04,
    blur: tuple[float, float] = (0.5, 2.0),
) -> np.ndarray:
    """Renders a 28x28 MNIST digit as a uint8 photo of dark ink on paper ((H, W) or (H, W, 3)).

    The digit is upscaled `scale` times, inverted to dark ink (tone drawn from
    `ink_tone`) on paper (tone from `paper`), placed at a random offset on a sheet
    `margin` times larger, lit by a linear gradient of up to `gradient` relative
    strength in a random direction, Gaussian-blurred (sigma from `blur`, in units
    of scale/8 px) and given Gaussian noise (sigma up to `noise`).
    """
    ink = _upscale(_ink01(digit28), int(scale))
    photo, _ = _photo(
        ink, rng, scale=int(scale), margin=margin, rgb=rgb, paper=paper,
        ink_tone=ink_tone, gradient=gradient, noise=noise, blur=blur,
    )
    return photo


def _edges(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first and last ink column (-1 where the row has no ink)."""
    on = ink > 0.1
    any_row = on.any(axis=1)
    first = np.where(any_row, on.argmax(axis=1), -1)
    last = np.where(any_row, ink.shape[1] - 1 - on[:, ::-1].argmax(axis=1), -1)
    return first, last


def render_number(
    digits: Sequence[np.ndarray],
    rng: np.random.Generator,
    scale: int = 8,
    *,
    gap: tuple[float, float] = (2.0, 6.0),
    touch_prob: float = 0.1,
    jitter: int = 1,
    return_boxes: bool = False,
    **photo_kwargs,
) -> np.ndarray | tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Renders 28x28 digits side by side, left to right, as one photo of a written number.

    Each digit is cropped to its ink; neighbours are placed so the closest
    ink-to-ink horizontal clearance is drawn from `gap` (px at 28x28 scale), or,
    with probability `touch_prob`, so their strokes overlap by about one pixel
    (touching). Digits are vertically centred with +-`jitter` px of random offset.
    The photo effects of `render_photo` follow (`photo_kwargs` are passed on).
    With `return_boxes`, also returns each digit's ink box in the photo as
    (top, left, bottom, right), end-exclusive, left to right (ground truth).
    """
    if len(digits) == 0:
        raise ValueError("render_number needs at least one digit")
    crops = []
    for d in digits:
        ink = _ink01(d)
        rows = np.flatnonzero(ink.max(axis=1) > 0.1)
        cols = np.flatnonzero(ink.max(axis=0) > 0.1)
        if rows.size == 0:
            raise ValueError("render_number got a digit image with no ink")
        crops.append(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])

    height = max(c.shape[0] for c in crops) + 2 * jitter + 2
    tops = [
        (height - c.shape[0]) // 2 + int(rng.integers(-jitter, jitter + 1)) for c in crops
    ]
    lefts = [1]
    for i in range(1, len(crops)):
        prev = np.zeros((height, crops[i - 1].shape[1]), np.float32)
        prev[tops[i - 1] : tops[i - 1] + crops[i - 1].shape[0]] = crops[i - 1]
        cur = np.zeros((height, crops[i].shape[1]), np.float32)
        cur[tops[i] : tops[i] + crops[i].shape[0]] = crops[i]
        _, prev_last = _edges(prev)
        cur_first, _ = _edges(cur)
        both = (prev_last >= 0) & (cur_first >= 0)
        # Offset of cur's left edge from prev's left edge giving zero clearance.
        if both.any():
            base = int(np.max(prev_last[both] - cur_first[both])) + 1
        else:
            base = prev.shape[1]
        if rng.random() < touch_prob:
            clearance = -1
        else:
            clearance = int(round(rng.uniform(*gap)))
        lefts.append(lefts[-1] + base + clearance)

    width = max(l + c.shape[1] for l, c in zip(lefts, crops)) + 1
    strip = np.zeros((height, width), np.float32)
    for top, left, c in zip(tops, lefts, crops):
        region = strip[top : top + c.shape[0], left : left + c.shape[1]]
        np.maximum(region, c, out=region)
    ink = _upscale(strip, int(scale))
    defaults = dict(
        margin=0.5, rgb=False, paper=(0.6, 0.95), ink_tone=(0.0, 0.35),
        gradient=0.3, noise=0.04, blur=(0.5, 2.0),
    )
    defaults.update(photo_kwargs)
    photo, (dy, dx) = _photo(ink, rng, scale=int(scale), **defaults)
    if not return_boxes:
        return photo
    k = int(scale)
    boxes = [
        (dy + t * k, dx + l * k, dy + (t + c.shape[0]) * k, dx + (l + c.shape[1]) * k)
        for t, l, c in zip(tops, lefts, crops)
    ]
    return photo, boxes
