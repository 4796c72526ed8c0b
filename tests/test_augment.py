"""Augmentation: deterministic per key, range-preserving, identity at zero ranges."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from configs import default
from hwrjax.core.augment import AugmentParams, augment_batch
from hwrjax.core.errors import ConfigError

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


# ----------------------------------------------------------------------------------------
# How writers and capture differ: stroke width, slant, aspect, stretch, resolution, grey levels.

# Each transform at a strength with a visible effect (probabilities at 1 so every example gets it).
WRITER = {
    "thicken": AugmentParams(stroke_thicken_px=1.5),
    "thin": AugmentParams(stroke_thin_px=0.8),
    "slant": AugmentParams(shear_deg=25),
    "aspect": AugmentParams(aspect=0.5),
    "stretch": AugmentParams(stretch_prob=1.0),
    "resolution": AugmentParams(resolution_prob=1.0),
    "binarize": AugmentParams(binarize_prob=1.0),
    "quantize": AugmentParams(quantize_prob=1.0),
    "elastic": AugmentParams(elastic_alpha=2.0, elastic_sigma=3.0),
}
# The field that turns each one off at 0.
STRENGTH = {"thicken": "stroke_thicken_px", "thin": "stroke_thin_px", "slant": "shear_deg", "aspect": "aspect",
            "stretch": "stretch_prob", "resolution": "resolution_prob", "binarize": "binarize_prob",
            "quantize": "quantize_prob", "elastic": "elastic_alpha"}
ALL_WRITER = AugmentParams(rotation_deg=10, scale=0.1, translate_px=2, shear_deg=10, elastic_alpha=1.0,
                           stroke_thicken_px=1.0, stroke_thin_px=0.5, aspect=0.3, stretch_prob=0.5,
                           resolution_prob=0.5, binarize_prob=0.5, quantize_prob=0.5)


def _grey_digits(n=8):
    """Anti-aliased strokes: a blurred bar and top stroke, so grey levels and edges are realistic."""
    return jnp.asarray(ndimage.gaussian_filter(np.asarray(_digits(n)), sigma=(0, 0.7, 0.7, 0)).clip(0, 1))


def _box(image):
    """(height, width) of the pixels at least half inked."""
    ink = np.asarray(image)[..., 0] >= 0.5
    rows, cols = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


@pytest.mark.parametrize("name", sorted(WRITER))
def test_writer_transform_same_key_same_output_and_range(name):
    params = WRITER[name]
    x = _grey_digits()
    noise = jnp.asarray(np.random.default_rng(1).random((8, 28, 28, 1)).astype(np.float32))
    for images in (x, noise):
        a = np.asarray(augment_batch(images, jax.random.key(5), params))
        b = np.asarray(augment_batch(images, jax.random.key(5), params))
        np.testing.assert_array_equal(a, b)
        assert a.shape == images.shape and a.dtype == images.dtype
        assert a.min() >= 0.0 and a.max() <= 1.0 + 1e-6
    c = np.asarray(augment_batch(x, jax.random.key(6), params))
    a = np.asarray(augment_batch(x, jax.random.key(5), params))
    # Another key draws other amounts (a stretch has none; thresholds may cut two-level strokes alike).
    if name not in ("stretch", "binarize"):
        assert np.abs(a - c).max() > 0.02
    assert np.abs(a - np.asarray(x)).max() > 0.1  # a visible effect


@pytest.mark.parametrize("name", sorted(WRITER))
def test_writer_transform_off_at_zero_strength(name):
    x = _grey_digits()
    off = dataclasses.replace(WRITER[name], **{STRENGTH[name]: 0.0})
    assert off.is_identity
    np.testing.assert_array_equal(np.asarray(augment_batch(x, jax.random.key(0), off)), np.asarray(x))
    # Alongside a rotation, a zero strength leaves exactly the rotation's output.
    rotated = AugmentParams(rotation_deg=12)
    with_zero = dataclasses.replace(rotated, **{STRENGTH[name]: 0.0})
    np.testing.assert_array_equal(np.asarray(augment_batch(x, jax.random.key(0), with_zero)),
                                  np.asarray(augment_batch(x, jax.random.key(0), rotated)))


@pytest.mark.parametrize("field", ["stroke_thicken_px", "stroke_thin_px", "aspect", "stretch_prob",
                                   "resolution_prob", "binarize_prob", "quantize_prob"])
def test_writer_transform_tends_to_identity_as_strength_vanishes(field):
    x = _grey_digits()
    tiny = AugmentParams(**{field: 1e-7})
    np.testing.assert_allclose(np.asarray(augment_batch(x, jax.random.key(0), tiny)), np.asarray(x), atol=1e-5)


@pytest.mark.parametrize("name", ["thicken", "thin", "aspect", "resolution"])
def test_each_example_draws_its_own_amount(name):
    x = jnp.repeat(_grey_digits(1), 6, axis=0)
    out = np.asarray(augment_batch(x, jax.random.key(1), WRITER[name]))
    assert len({out[i].tobytes() for i in range(6)}) == 6


def test_thicker_strokes_hold_more_ink_and_thinner_less():
    x = np.asarray(_grey_digits())
    ink = x.sum(axis=(1, 2, 3))
    thick = np.asarray(augment_batch(jnp.asarray(x), jax.random.key(2), WRITER["thicken"])).sum(axis=(1, 2, 3))
    thin = np.asarray(augment_batch(jnp.asarray(x), jax.random.key(2), WRITER["thin"])).sum(axis=(1, 2, 3))
    assert np.all(thick > ink) and np.all(thin < ink)
    assert thick.mean() > 1.3 * ink.mean() and thin.mean() < 0.9 * ink.mean()
    assert np.all(thin > 0.1 * ink)  # thinned, not erased


def test_stroke_change_is_drawn_within_its_range():
    x = _grey_digits()
    ink = np.asarray(x).sum(axis=(1, 2, 3))
    one = lambda p: np.asarray(augment_batch(x, jax.random.key(0), p)).sum(axis=(1, 2, 3))
    # No example grows past a full pixel of dilation, or thins past a full pixel of erosion.
    assert np.all(one(AugmentParams(stroke_thicken_px=1.0)) <= one(AugmentParams(stroke_thicken_px=1.0 - 1e-9)) + 1e-3)
    grown = one(AugmentParams(stroke_thicken_px=1.0))
    assert np.all(grown >= ink - 1e-3)
    thinned = one(AugmentParams(stroke_thin_px=1.0))
    assert np.all(thinned <= ink + 1e-3)


def test_slant_tilts_a_vertical_bar_within_its_angle():
    x = np.zeros((8, 28, 28, 1), np.float32)
    x[:, 4:24, 13:15, 0] = 1.0
    out = np.asarray(augment_batch(jnp.asarray(x), jax.random.key(3), AugmentParams(shear_deg=25)))[..., 0]
    leans = np.array([ndimage.center_of_mass(o[5:9])[1] - ndimage.center_of_mass(o[19:23])[1] for o in out])
    # Rows 14 apart lean by up to tan(25 deg) * 14 = 6.5 pixels, and the angles drawn differ.
    assert np.abs(leans).max() > 3.0 and np.abs(leans).max() < 6.6 and leans.min() < 0 < leans.max()
    for o in out:  # a shear keeps each row's ink
        np.testing.assert_allclose(o.sum(axis=1)[6:22], x[0, 6:22, :, 0].sum(axis=1), rtol=0.05)


def test_aspect_changes_the_width_not_the_height():
    x = np.zeros((6, 28, 28, 1), np.float32)
    x[:, 6:22, 10:18, 0] = 1.0
    out = np.asarray(augment_batch(jnp.asarray(x), jax.random.key(4), AugmentParams(aspect=0.5)))
    heights, widths = zip(*(_box(o) for o in out))
    assert set(heights) == {16}
    assert max(abs(w - 8) for w in widths) >= 1 and all(5 <= w <= 12 for w in widths)  # factor in [1/1.5, 1.5]


def test_stretched_digit_fills_its_box():
    x = np.zeros((3, 28, 28, 1), np.float32)
    x[0, 4:24, 12:15, 0] = 1.0  # a "1": 20 tall, 3 wide
    x[1, 6:20, 8:20, 0] = 1.0  # 14 x 12
    x[2, 10:14, 4:24, 0] = 1.0  # a dash: wider than tall
    out = np.asarray(augment_batch(jnp.asarray(x), jax.random.key(5), AugmentParams(stretch_prob=1.0)))
    for before, after in zip(x, out):
        h, w = _box(before)
        nh, nw = _box(after)
        assert abs(nh - max(h, w)) <= 1 and abs(nw - max(h, w)) <= 1  # square, at the longer side
    # The centre of mass stays where it was.
    np.testing.assert_allclose(ndimage.center_of_mass(out[0, ..., 0]), ndimage.center_of_mass(x[0, ..., 0]),
                               atol=0.3)


def test_stretch_probability_is_per_example():
    x = np.zeros((64, 28, 28, 1), np.float32)
    x[:, 4:24, 12:15, 0] = 1.0
    out = np.asarray(augment_batch(jnp.asarray(x), jax.random.key(6), AugmentParams(stretch_prob=0.25)))
    stretched = np.array([_box(o)[1] > 10 for o in out])
    assert 4 <= stretched.sum() <= 30
    np.testing.assert_allclose(out[~stretched], x[~stretched], atol=1e-5)  # the others untouched


def test_low_resolution_loses_detail_and_keeps_ink():
    x = np.zeros((4, 28, 28, 1), np.float32)
    x[:, 4:24, 4:24:2, 0] = 1.0  # one-pixel stripes: finer than any resolution drawn
    out = np.asarray(augment_batch(jnp.asarray(x), jax.random.key(7), AugmentParams(resolution_prob=1.0)))
    inner = (slice(None), slice(8, 20), slice(8, 20))
    assert out[inner].std() < 0.3 * x[inner].std()
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), x.sum(axis=(1, 2, 3)), rtol=0.05)


def test_resolution_at_mnist_size_keeps_a_smooth_digit():
    x = _grey_digits()
    same = AugmentParams(resolution_prob=1.0, resolution_min_px=20.0, resolution_max_px=20.0)
    coarse = AugmentParams(resolution_prob=1.0, resolution_min_px=6.0, resolution_max_px=6.0)
    err = lambda p: float(np.abs(np.asarray(augment_batch(x, jax.random.key(8), p)) - np.asarray(x)).mean())
    assert err(same) < 0.5 * err(coarse)


def test_binarized_output_has_two_levels():
    x = _grey_digits()
    out = np.asarray(augment_batch(x, jax.random.key(9), AugmentParams(binarize_prob=1.0)))
    assert set(np.unique(out)) == {0.0, 1.0}
    xs = np.asarray(x)
    assert np.all(out[xs > 0.75] == 1.0) and np.all(out[xs < 0.25] == 0.0)


def test_quantized_output_has_few_levels_near_the_input():
    x = _grey_digits()
    out = np.asarray(augment_batch(x, jax.random.key(10), AugmentParams(quantize_prob=1.0)))
    for before, after in zip(np.asarray(x), out):
        levels = np.unique(after)
        assert 2 <= len(levels) <= 16
        steps = round(1.0 / np.diff(levels).min())  # levels are multiples of 1 / (L - 1)
        np.testing.assert_allclose(levels * steps, np.round(levels * steps), atol=1e-4)
        assert np.abs(after - before).max() <= 0.5 / steps + 1e-6


def test_elastic_moves_pixels_smoothly_and_keeps_most_ink():
    x = _grey_digits()
    out = np.asarray(augment_batch(x, jax.random.key(11), WRITER["elastic"]))
    ink, moved = np.asarray(x).sum(axis=(1, 2, 3)), out.sum(axis=(1, 2, 3))
    assert abs(moved.mean() / ink.mean() - 1) < 0.2  # moved, neither piled up nor lost
    assert np.abs(out - np.asarray(x)).max() > 0.3
    # Neighbouring pixels move together: the displacement is smooth, so rows stay strokes, not noise.
    assert np.abs(np.diff(out, axis=2)).mean() < 2 * np.abs(np.diff(np.asarray(x), axis=2)).mean()


def test_all_transforms_split_over_devices_match_the_whole_batch():
    x = jnp.concatenate([_grey_digits(8), _digits(8)])
    key = jax.random.key(12)
    run = jax.jit(lambda im, offset: augment_batch(im, key, ALL_WRITER, index_offset=offset))
    whole = np.asarray(run(x, 0))
    halves = [np.asarray(run(x[i:i + 8], i)) for i in (0, 8)]
    # The same transforms; a different batch size may change the float summation order only.
    np.testing.assert_allclose(np.concatenate(halves), whole, atol=1e-5)
    assert whole.min() >= 0.0 and whole.max() <= 1.0 + 1e-6


def test_labels_are_untouched_by_the_batch_program():
    from hwrjax.core import rng
    from hwrjax.core import steps as steps_lib
    from hwrjax.training import parallel

    n, b = 64, 16
    images = jnp.asarray((np.asarray(_grey_digits(n)) * 255).astype(np.uint8))
    labels = jnp.asarray(np.arange(n, dtype=np.int32) % 10)
    keys = rng.RunKeys.from_seed(0)
    order = steps_lib.epoch_order(keys.order, 0, n)
    plain = steps_lib.make_batch_fn(AugmentParams(), keys, n, b, parallel.make_mesh())
    augmented = steps_lib.make_batch_fn(ALL_WRITER, keys, n, b, parallel.make_mesh())
    for step in (0, 3):
        a, p = augmented(images, labels, order, step), plain(images, labels, order, step)
        np.testing.assert_array_equal(np.asarray(a["label"]), np.asarray(labels)[np.asarray(order)[step * b:(step + 1) * b]])
        np.testing.assert_array_equal(np.asarray(a["label"]), np.asarray(p["label"]))
        assert np.abs(np.asarray(a["image"]) - np.asarray(p["image"])).max() > 0.1


def test_writer_fields_from_config():
    c = default.get_config()
    base = AugmentParams.from_config(c.augment)
    assert all(getattr(base, STRENGTH[name]) == 0 for name in STRENGTH if name not in ("slant",))
    c.augment.stroke_thicken_px = 1.0
    c.augment.binarize_prob = 0.3
    p = AugmentParams.from_config(c.augment)
    assert p.stroke_thicken_px == 1.0 and p.binarize_prob == 0.3
    # A run saved before these fields existed reads them as off.
    old = default.get_config().augment
    for name in ("stroke_thicken_px", "stroke_thin_px", "aspect", "stretch_prob", "resolution_prob",
                 "resolution_min_px", "resolution_max_px", "binarize_prob", "quantize_prob"):
        del old[name]
    assert AugmentParams.from_config(old) == base


def test_resnet_recipe_variants_differ_only_in_the_writer_transforms():
    from configs import resnet

    robust, mnist = resnet.get_config(), resnet.get_config("mnist")
    robust_params, mnist_params = AugmentParams.from_config(robust.augment), AugmentParams.from_config(mnist.augment)
    # The headline draws the writer and capture transforms; the mnist variant draws none of them...
    assert robust_params.binarize_prob > 0 and robust_params.resolution_prob > 0 and robust_params.stroke_thicken_px > 0
    assert mnist_params == AugmentParams.from_config(default.get_config().augment)
    # ...and everything else (network, schedule, averaging, the geometric augmentation) is the same.
    robust_dict, mnist_dict = robust.to_dict(), mnist.to_dict()
    robust_dict.pop("augment"), mnist_dict.pop("augment")
    assert robust_dict == mnist_dict
    with pytest.raises(ValueError, match="'', 'mnist' or 'smoke'"):
        resnet.get_config("robust")


@pytest.mark.parametrize("field,value,message", [
    ("binarize_prob", 1.5, "binarize_prob is a probability"),
    ("stretch_prob", -0.1, "stretch_prob must be >= 0"),
    ("stroke_thicken_px", 4.0, "stroke_thicken_px must be <= 3"),
    ("resolution_max_px", 24.0, "resolution_min_px and resolution_max_px must satisfy"),
])
def test_bad_writer_fields(field, value, message):
    c = default.get_config()
    c.augment.resolution_prob = 0.5
    setattr(c.augment, field, value)
    with pytest.raises(ConfigError, match=message):
        AugmentParams.from_config(c.augment)
