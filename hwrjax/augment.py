"""Training augmentation on device: random affine (rotation, scale, shear, translation) and
elastic distortion, a pure function of (images, key, ranges)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from hwrjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random transforms; every transform is off at zero."""

    rotation_deg: float = 0.0  # angle drawn uniformly in [-r, r]
    scale: float = 0.0  # zoom factor drawn uniformly in [1 - s, 1 + s]
    translate_px: float = 0.0  # shift in x and y drawn uniformly in [-t, t] pixels
    shear_deg: float = 0.0  # shear angle drawn uniformly in [-s, s]
    elastic_alpha: float = 0.0  # displacement magnitude in pixels (0 disables elastic)
    elastic_sigma: float = 4.0  # smoothness (Gaussian sigma, pixels) of the displacement field

    @classmethod
    def from_config(cls, config: Any) -> "AugmentParams":
        """Reads the ranges from `config.augment`; all zero when `enabled` is False."""
        if not config.enabled:
            return cls()
        params = cls(rotation_deg=float(config.rotation_deg), scale=float(config.scale),
                     translate_px=float(config.translate_px), shear_deg=float(config.shear_deg),
                     elastic_alpha=float(config.elastic_alpha), elastic_sigma=float(config.elastic_sigma))
        for field in dataclasses.fields(params):
            if getattr(params, field.name) < 0:
                raise ConfigError(f"config.augment.{field.name} must be >= 0, got {getattr(params, field.name)}")
        if params.scale >= 1:
            raise ConfigError(f"config.augment.scale must be < 1 (zoom in [1-s, 1+s]), got {params.scale}")
        if params.elastic_alpha > 0 and params.elastic_sigma <= 0:
            raise ConfigError("config.augment.elastic_sigma must be > 0 when elastic_alpha > 0")
        return params

    @property
    def is_identity(self) -> bool:
        return all(getattr(self, f.name) == 0 for f in dataclasses.fields(self) if f.name != "elastic_sigma")


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


def _augment_one(image: jnp.ndarray, key: jax.Array, params: AugmentParams) -> jnp.ndarray:
    h, w, _ = image.shape
    k_aff, k_shift, k_elastic = jax.random.split(key, 3)
    inv = _affine_matrix(k_aff, params)
    shift = params.translate_px * jax.random.uniform(k_shift, (2,), minval=-1.0, maxval=1.0)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    # Offsets from the centre, minus the translation, mapped through the inverse transform.
    dy, dx = yy - cy - shift[0], xx - cx - shift[1]
    src_x = inv[0, 0] * dx + inv[0, 1] * dy + cx
    src_y = inv[1, 0] * dx + inv[1, 1] * dy + cy
    if params.elastic_alpha > 0:
        noise = jax.random.uniform(k_elastic, (2, h, w), minval=-1.0, maxval=1.0)
        disp = _smooth(noise, params.elastic_sigma)
        # Normalize so the displacement's typical magnitude is elastic_alpha pixels.
        disp = disp / (jnp.std(disp, axis=(1, 2), keepdims=True) + 1e-6)
        src_y = src_y + params.elastic_alpha * disp[0]
        src_x = src_x + params.elastic_alpha * disp[1]
    return _bilinear(image, src_y, src_x)


def augment_batch(images: jnp.ndarray, key: jax.Array, params: AugmentParams,
                  index_offset: int | jax.Array = 0) -> jnp.ndarray:
    """Applies an independent random affine (and elastic) transform to each image [N, H, W, C].

    Example i is keyed by fold_in(key, index_offset + i), so a batch split over devices
    (each passing its offset) is transformed exactly as the whole batch would be.
    """
    if params.is_identity:
        return images
    n = images.shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index_offset + jnp.arange(n))
    out = jax.vmap(lambda im, k: _augment_one(im, k, params))(images, keys)
    return out.astype(images.dtype)
