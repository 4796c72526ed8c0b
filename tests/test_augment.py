"""Augmentation: deterministic per key, range-preserving, identity at zero ranges."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from configs import default
from hwrjax.augment import AugmentParams, augment_batch
from hwrjax.errors import ConfigError

FULL = AugmentParams(rotation_deg=15, scale=0.15, translate_px=3, shear_deg=10, elastic_alpha=2.0, elastic_sigma=3.0)


def _digits(n=8):
    rng = np.random.default_rng(0)
    x = np.zeros((n, 28, 28, 1), np.float32)
    for i in range(n):
        r0, c0 = rng.integers(8, 12, size=2)
        x[i, r0:r0 + 10, c0:c0 + 3, 0] = 1.0  # a vertical bar
        x[i, r0:r0 + 3, c0:c0 + 8, 0] = 0.7  # and a top stroke
    return jnp.asarray(x)


def test_same_key_same_output_and_different_key_differs():
    x = _digits()
    a = augment_batch(x, jax.random.key(3), FULL)
    b = augment_batch(x, jax.random.key(3), FULL)
    c = augment_batch(x, jax.random.key(4), FULL)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.abs(a - c).max()) > 0.1
    assert a.shape == x.shape and a.dtype == x.dtype


def test_pixel_range_is_kept():
    x = _digits()
    out = np.asarray(augment_batch(x, jax.random.key(0), FULL))
    assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6
    assert out.max() > 0.5  # the digit survives


def test_identity_when_ranges_are_zero():
    x = _digits()
    zero = AugmentParams(elastic_sigma=3.0)
    assert zero.is_identity
    np.testing.assert_array_equal(np.asarray(augment_batch(x, jax.random.key(0), zero)), np.asarray(x))
    # The sampling path itself is exact at identity: a tiny elastic field with zero alpha excluded,
    # a zero-width rotation range still goes through the affine code when another range is non-zero.
    near = AugmentParams(rotation_deg=1e-9)
    np.testing.assert_allclose(np.asarray(augment_batch(x, jax.random.key(0), near)), np.asarray(x), atol=1e-5)


def test_each_example_gets_its_own_transform():
    x = jnp.repeat(_digits(1), 6, axis=0)
    out = np.asarray(augment_batch(x, jax.random.key(1), AugmentParams(rotation_deg=20, translate_px=2)))
    assert len({out[i].tobytes() for i in range(6)}) == 6


def test_translation_moves_the_centre_of_mass_within_the_range():
    x = _digits()
    p = AugmentParams(translate_px=3.0)
    out = np.asarray(augment_batch(x, jax.random.key(7), p))
    shifts = []
    for a, b in zip(np.asarray(x)[..., 0], out[..., 0]):
        shifts.append(np.subtract(ndimage.center_of_mass(b), ndimage.center_of_mass(a)))
        assert b.sum() == pytest.approx(a.sum(), rel=0.02)  # a pure shift keeps the ink
    shifts = np.abs(np.array(shifts))
    assert shifts.max() <= 3.0 + 1e-3 and shifts.max() > 0.5


def test_rotation_keeps_the_centre_fixed_for_a_centred_blob():
    x = np.zeros((1, 28, 28, 1), np.float32)
    x[0, 11:17, 12:16, 0] = 1.0  # centred at (13.5, 13.5)
    out = np.asarray(augment_batch(jnp.asarray(x), jax.random.key(2), AugmentParams(rotation_deg=30)))
    np.testing.assert_allclose(ndimage.center_of_mass(out[0, ..., 0]), (13.5, 13.5), atol=0.05)


def test_from_config_and_bad_ranges():
    c = default.get_config()
    p = AugmentParams.from_config(c.augment)
    assert p.rotation_deg == c.augment.rotation_deg and not p.is_identity
    c.augment.enabled = False
    assert AugmentParams.from_config(c.augment).is_identity
    c.augment.enabled = True
    c.augment.rotation_deg = -5.0
    with pytest.raises(ConfigError, match="rotation_deg must be >= 0"):
        AugmentParams.from_config(c.augment)
    c.augment.rotation_deg = 5.0
    c.augment.scale = 1.5
    with pytest.raises(ConfigError, match="scale must be < 1"):
        AugmentParams.from_config(c.augment)
