"""Training augmentation on device, a pure function of (images, key, ranges): random affine
(rotation, scale, slant/shear, translation), elastic distortion, and what differs between
writers and capture: stroke width, aspect ratio, stretching to fill a square box, rendering at
a low resolution and back, binarization and grey-level quantization."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from hwrjax.core.errors import ConfigError

# fold_in tags of each example's key for the writer and capture transforms. They are folded in
# rather than split off so that the affine and elastic draws (split(key, 3)) stay as they were.
_STROKE, _ASPECT, _STRETCH, _BINARIZE, _RESOLUTION, _QUANTIZE = 1, 2, 3, 4, 5, 6
# A pixel above this is ink when measuring a digit's box for the stretch.
_INK = 0.2
# Binarization thresholds and quantization level counts are drawn from these ranges.
_THRESHOLDS = (0.25, 0.75)
_LEVELS = (3, 16)
# MNIST's digits fit a 20-pixel box in the 28x28 frame: resolution sizes are measured on it.
_MNIST_BOX = 20.0
_GEOMETRIC = ("rotation_deg", "scale", "translate_px", "shear_deg", "elastic_alpha", "aspect", "stretch_prob")


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random transforms; every transform is off at zero."""

    rotation_deg: float = 0.0  # angle drawn uniformly in [-r, r]
    scale: float = 0.0  # zoom factor drawn uniformly in [1 - s, 1 + s]
    translate_px: float = 0.0  # shift in x and y drawn uniformly in [-t, t] pixels
    shear_deg: float = 0.0  # slant: horizontal shear angle drawn uniformly in [-s, s]
    elastic_alpha: float = 0.0  # displacement magnitude in pixels (0 disables elastic)
    elastic_sigma: float = 4.0  # smoothness (Gaussian sigma, pixels) of the displacement field
    stroke_thicken_px: float = 0.0  # strokes grown by up to this many pixels a side ...
    stroke_thin_px: float = 0.0  # ... or thinned by up to this many: the change drawn in [-thin, thicken]
    aspect: float = 0.0  # width scaled by a factor drawn log-uniformly in [1/(1+a), 1+a]
    stretch_prob: float = 0.0  # chance a digit is stretched to fill a square box
    resolution_prob: float = 0.0  # chance a digit is rendered at a low resolution and back
    resolution_min_px: float = 8.0  # its box size at that resolution, drawn in [min, max] pixels
    resolution_max_px: float = 16.0
    binarize_prob: float = 0.0  # chance of a threshold drawn in [0.25, 0.75]: two grey levels
    quantize_prob: float = 0.0  # chance of rounding to a number of grey levels drawn in 3..16

    @classmethod
    def from_config(cls, config: Any) -> "AugmentParams":
        """Reads the ranges from `config.augment`; all zero when `enabled` is False.

        Fields missing from the config (a run saved before they existed) take their defaults.
        """
        if not config.enabled:
            return cls()
        params = cls(**{f.name: float(config.get(f.name, f.default)) for f in dataclasses.fields(cls)})
        for field in dataclasses.fields(params):
            if getattr(params, field.name) < 0:
                raise ConfigError(f"config.augment.{field.name} must be >= 0, got {getattr(params, field.name)}")
        if params.scale >= 1:
            raise ConfigError(f"config.augment.scale must be < 1 (zoom in [1-s, 1+s]), got {params.scale}")
        if params.elastic_alpha > 0 and params.elastic_sigma <= 0:
            raise ConfigError("config.augment.elastic_sigma must be > 0 when elastic_alpha > 0")
        for name in ("stretch_prob", "resolution_prob", "binarize_prob", "quantize_prob"):
            if getattr(params, name) > 1:
                raise ConfigError(f"config.augment.{name} is a probability; use a value in [0, 1], "
                                  f"got {getattr(params, name)}")
        for name in ("stroke_thicken_px", "stroke_thin_px"):
            if getattr(params, name) > 3:
                raise ConfigError(f"config.augment.{name} must be <= 3 pixels, got {getattr(params, name)}")
        if params.resolution_prob > 0 and not (
                1 <= params.resolution_min_px <= params.resolution_max_px <= _MNIST_BOX):
            raise ConfigError("config.augment.resolution_min_px and resolution_max_px must satisfy "
                              f"1 <= min <= max <= {_MNIST_BOX:g}, got {params.resolution_min_px} and "
                              f"{params.resolution_max_px}")
        return params

    @property
    def is_geometric(self) -> bool:
        """Whether any transform moves pixels (and the image must be resampled)."""
        return any(getattr(self, name) != 0 for name in _GEOMETRIC)

    @property
    def is_identity(self) -> bool:
        skip = ("elastic_sigma", "resolution_min_px", "resolution_max_px")
        return all(getattr(self, f.name) == 0 for f in dataclasses.fields(self) if f.name not in skip)


def _affine_matrix(key: jax.Array, p: AugmentParams) -> jnp.ndarray:
    """Draws one 2x2 matrix mapping output offsets to input offsets (an inverse transform)."""
    k_rot, k_scale, k_shear = jax.random.split(key, 3)
    rot = jnp.deg2rad(p.rotation_deg) * jax.random.uniform(k_rot, minval=-1.0, maxval=1.0)
    zoom = 1.0 + p.scale * jax.random.uniform(k_scale, minval=-1.0, maxval=1.0)
    shear = jnp.deg2rad(p.shear_deg) * jax.random.uniform(k_shear, minval=-1.0, maxval=1.0)
    cos, sin = jnp.cos(rot), jnp.sin(rot)
    # Forward transform A = R(rot) @ Shear(shear) @ zoom on (x, y); we sample the input at A^-1 (out - c) + c.
    a = jnp.array([[cos, -sin + cos * jnp.tan(shear)], [sin, cos + sin * jnp.tan(shear)]]) * zoom
    return jnp.linalg.inv(a)


def _gaussian_kernel(sigma: float) -> jnp.ndarray:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _smooth(field: jnp.ndarray, sigma: float) -> jnp.ndarray:
    """Separable Gaussian blur of fields [N, H, W] with zero padding."""
    k = _gaussian_kernel(sigma)
    blur_rows = jax.vmap(jax.vmap(lambda r: jnp.convolve(r, k, mode="same")))
    field = blur_rows(field)
    return jnp.swapaxes(blur_rows(jnp.swapaxes(field, 1, 2)), 1, 2)


def _bilinear(image: jnp.ndarray, rows: jnp.ndarray, cols: jnp.ndarray) -> jnp.ndarray:
    """Samples image [H, W, C] at fractional coordinates with zeros outside."""
    sample = lambda ch: jax.scipy.ndimage.map_coordinates(ch, [rows, cols], order=1, mode="constant", cval=0.0)
    return jnp.stack([sample(image[..., c]) for c in range(image.shape[-1])], axis=-1)


def _chance(key: jax.Array, prob: float) -> jax.Array:
    return jax.random.uniform(key) < prob


def _neighbourhood(image: jnp.ndarray, reduce: Any) -> jnp.ndarray:
    """Grey dilation (reduce=jnp.maximum) or erosion (jnp.minimum) of [H, W, C] by a 3x3 cross;
    outside the image is background."""
    h, w, _ = image.shape
    p = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
    out = image
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        out = reduce(out, p[dy:dy + h, dx:dx + w])
    return out


def _stroke_width(image: jnp.ndarray, key: jax.Array, thicken: float, thin: float) -> jnp.ndarray:
    """Grows or thins every stroke by a width drawn uniformly in [-thin, thicken] pixels a side.

    Whole pixels are steps of grey dilation (erosion) by a 3x3 cross; a fraction blends the two
    nearest steps, so the ink changes smoothly with the width drawn.
    """
    thinner, thicker = [image], [image]
    for _ in range(int(math.ceil(thin))):
        thinner.append(_neighbourhood(thinner[-1], jnp.minimum))
    for _ in range(int(math.ceil(thicken))):
        thicker.append(_neighbourhood(thicker[-1], jnp.maximum))
    ladder = jnp.stack(thinner[:0:-1] + thicker)  # from the thinnest to the thickest; image at len(thinner) - 1
    position = len(thinner) - 1 + jax.random.uniform(key, minval=-thin, maxval=thicken)
    low = jnp.clip(jnp.floor(position), 0, ladder.shape[0] - 2).astype(jnp.int32)
    frac = position - low
    return (1.0 - frac) * ladder[low] + frac * ladder[low + 1]


def _box_and_centre(image: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(height, width) of the box holding the ink and (row, col) of the centre of mass; an empty
    image gives a 1x1 box at the image centre."""
    h, w, _ = image.shape
    grey = image.sum(axis=-1)

    def extent(any_ink: jnp.ndarray) -> jnp.ndarray:
        first = jnp.argmax(any_ink)
        last = any_ink.shape[0] - 1 - jnp.argmax(any_ink[::-1])
        return jnp.where(any_ink.any(), last - first + 1, 1).astype(jnp.float32)

    ink = grey > _INK
    mass = grey.sum()
    safe = jnp.maximum(mass, 1e-6)
    row = jnp.where(mass > 0, (grey.sum(axis=1) * jnp.arange(h)).sum() / safe, (h - 1) / 2.0)
    col = jnp.where(mass > 0, (grey.sum(axis=0) * jnp.arange(w)).sum() / safe, (w - 1) / 2.0)
    return extent(ink.any(axis=1)), extent(ink.any(axis=0)), row, col


def _area_then_bilinear(size: int, scale: jax.Array, phase: jax.Array) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Matrices down [M, size] (box average onto pixels `scale` input pixels wide, the first
    starting at `phase - scale`) and up [size, M] (bilinear from those pixels' centres back)."""
    m = size + 2  # low-resolution pixels enough to cover the image at scale >= 1
    a = jnp.arange(m, dtype=jnp.float32)[:, None]
    i = jnp.arange(size, dtype=jnp.float32)[None, :]
    lo, hi = phase + (a - 1.0) * scale, phase + a * scale
    down = jnp.clip(jnp.minimum(i + 1.0, hi) - jnp.maximum(i, lo), 0.0, None) / scale
    u = (jnp.arange(size, dtype=jnp.float32) + 0.5 - phase) / scale + 0.5
    first = jnp.clip(jnp.floor(u), 0, m - 2)
    frac = jnp.clip(u - first, 0.0, 1.0)
    cols = jnp.arange(m, dtype=jnp.float32)[None, :]
    up = (1.0 - frac)[:, None] * (cols == first[:, None]) + frac[:, None] * (cols == first[:, None] + 1)
    return down, up


def _low_resolution(image: jnp.ndarray, key: jax.Array, p: AugmentParams) -> jnp.ndarray:
    """Renders the image as if the digit's 20-pixel box had been captured at a size drawn in
    [resolution_min_px, resolution_max_px] (box-averaged, at a random pixel phase) and scaled
    back up bilinearly."""
    h, w, _ = image.shape
    k_size, k_row, k_col = jax.random.split(key, 3)
    box = jax.random.uniform(k_size, minval=p.resolution_min_px, maxval=p.resolution_max_px)
    scale = _MNIST_BOX / box
    down_r, up_r = _area_then_bilinear(h, scale, scale * jax.random.uniform(k_row))
    down_c, up_c = _area_then_bilinear(w, scale, scale * jax.random.uniform(k_col))
    per_channel = lambda ch: up_r @ (down_r @ ch @ down_c.T) @ up_c.T
    out = jnp.stack([per_channel(image[..., c]) for c in range(image.shape[-1])], axis=-1)
    return jnp.clip(out, 0.0, 1.0)


def _augment_one(image: jnp.ndarray, key: jax.Array, params: AugmentParams) -> jnp.ndarray:
    h, w, _ = image.shape
    k_aff, k_shift, k_elastic = jax.random.split(key, 3)
    if params.stroke_thicken_px > 0 or params.stroke_thin_px > 0:
        image = _stroke_width(image, jax.random.fold_in(key, _STROKE), params.stroke_thicken_px,
                              params.stroke_thin_px)
    if not params.is_geometric:
        return _capture(image, key, params)
    inv = _affine_matrix(k_aff, params)
    shift = params.translate_px * jax.random.uniform(k_shift, (2,), minval=-1.0, maxval=1.0)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    # Offsets from the centre, minus the translation, mapped through the inverse transform.
    dy, dx = yy - cy - shift[0], xx - cx - shift[1]
    src_x = inv[0, 0] * dx + inv[0, 1] * dy + cx
    src_y = inv[1, 0] * dx + inv[1, 1] * dy + cy
    # The forward chain is stretch (about the centre of mass), aspect (about the image centre),
    # then the affine above; its inverse undoes them in the opposite order.
    if params.aspect > 0:
        log_range = math.log1p(params.aspect)
        width_factor = jnp.exp(log_range * jax.random.uniform(jax.random.fold_in(key, _ASPECT),
                                                             minval=-1.0, maxval=1.0))
        src_x = cx + (src_x - cx) / width_factor
    if params.stretch_prob > 0:
        box_h, box_w, com_row, com_col = _box_and_centre(image)
        side = jnp.maximum(box_h, box_w)
        stretch = _chance(jax.random.fold_in(key, _STRETCH), params.stretch_prob)
        src_x = jnp.where(stretch, com_col + (src_x - com_col) * box_w / side, src_x)
        src_y = jnp.where(stretch, com_row + (src_y - com_row) * box_h / side, src_y)
    if params.elastic_alpha > 0:
        noise = jax.random.uniform(k_elastic, (2, h, w), minval=-1.0, maxval=1.0)
        disp = _smooth(noise, params.elastic_sigma)
        # Normalize so the displacement's typical magnitude is elastic_alpha pixels.
        disp = disp / (jnp.std(disp, axis=(1, 2), keepdims=True) + 1e-6)
        src_y = src_y + params.elastic_alpha * disp[0]
        src_x = src_x + params.elastic_alpha * disp[1]
    return _capture(_bilinear(image, src_y, src_x), key, params)


def _capture(out: jnp.ndarray, key: jax.Array, params: AugmentParams) -> jnp.ndarray:
    """The capture transforms of one image in the order a scan applies them: binarization, a
    low resolution, then few grey levels."""
    if params.binarize_prob > 0:
        k_apply, k_threshold = jax.random.split(jax.random.fold_in(key, _BINARIZE))
        threshold = jax.random.uniform(k_threshold, minval=_THRESHOLDS[0], maxval=_THRESHOLDS[1])
        out = jnp.where(_chance(k_apply, params.binarize_prob), (out > threshold).astype(out.dtype), out)
    if params.resolution_prob > 0:
        k_apply, k_render = jax.random.split(jax.random.fold_in(key, _RESOLUTION))
        out = jnp.where(_chance(k_apply, params.resolution_prob), _low_resolution(out, k_render, params), out)
    if params.quantize_prob > 0:
        k_apply, k_levels = jax.random.split(jax.random.fold_in(key, _QUANTIZE))
        steps = jax.random.randint(k_levels, (), _LEVELS[0], _LEVELS[1] + 1).astype(out.dtype) - 1.0
        out = jnp.where(_chance(k_apply, params.quantize_prob), jnp.round(out * steps) / steps, out)
    return out


def augment_batch(images: jnp.ndarray, key: jax.Array, params: AugmentParams,
                  index_offset: int | jax.Array = 0) -> jnp.ndarray:
    """Applies an independent random transform of every kind in `params` to each image [N, H, W, C].

    Example i is keyed by fold_in(key, index_offset + i), so a batch split over devices
    (each passing its offset) is transformed exactly as the whole batch would be.
    """
    if params.is_identity:
        return images
    n = images.shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index_offset + jnp.arange(n))
    out = jax.vmap(lambda im, k: _augment_one(im, k, params))(images, keys)
    return out.astype(images.dtype)
