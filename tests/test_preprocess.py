"""Tests for hwrjax.apps.preprocess (photo -> MNIST 28x28) and tests.support.synth (digit -> photo).

All images are drawn here with Pillow; nothing is downloaded or read from outside tmp_path.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from hwrjax.apps import preprocess
from hwrjax.apps.preprocess import ImageError, NoInkError, load_image, split_digits, to_mnist
from hwrjax.core.errors import HwrjaxError
from tests.support import forms, synth

# Glyph strokes on a 112x112 canvas (4x supersampled 28x28); each fills rows 16..96,
# i.e. a 20 px tall box in 28x28, roughly centred like MNIST.
_GLYPHS = {
    "1": [((58, 16), (52, 96))],
    "7": [((30, 18), (84, 18), (48, 96))],
    "4": [((72, 96), (72, 16), (28, 70), (88, 70))],
    "0": "ellipse",
    "2": [((28, 34), (46, 16), (78, 18), (84, 42), (28, 96), (88, 96))],  # a straight base
}


def _draw_glyph(draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, float, float, float],
                width: int, fill: int | tuple[int, ...]) -> None:
    """Draws a glyph scaled into box=(left, top, right, bottom) (in 112-unit glyph space)."""
    left, top, right, bottom = box
    sx, sy = (right - left) / 112.0, (bottom - top) / 112.0
    spec = _GLYPHS[kind]
    if spec == "ellipse":
        draw.ellipse(
            (left + 32 * sx, top + 16 * sy, left + 80 * sx, top + 96 * sy), outline=fill, width=width
        )
        return
    for line in spec:
        pts = [(left + x * sx, top + y * sy) for x, y in line]
        draw.line(pts, fill=fill, width=width, joint="curve")


def mnist_like(kind: str) -> np.ndarray:
    """A clean 28x28 float32 digit, white on black, ~20 px tall, anti-aliased."""
    im = Image.new("L", (112, 112), 0)
    _draw_glyph(ImageDraw.Draw(im), kind, (0, 0, 112, 112), width=10, fill=255)
    # Like MNIST: crop, longer side to 20 px (anti-aliased), centre of mass to (14, 14).
    crop = im.crop(im.getbbox())
    f = 20 / max(crop.size)
    crop = crop.resize((max(1, round(crop.width * f)), max(1, round(crop.height * f))),
                       Image.Resampling.BOX)
    field = np.zeros((56, 56), np.float32)
    field[18 : 18 + crop.height, 18 : 18 + crop.width] = np.asarray(crop, np.float32) / 255.0
    cy, cx = ndimage.center_of_mass(field)
    top, left = round(cy) - 14, round(cx) - 14
    return field[top : top + 28, left : left + 28]


def photo_of(kind: str, *, rgb: bool = True, seed: int = 0, size: int = 360) -> np.ndarray:
    """A 'photo': dark blue-black ink on off-white paper, off centre, gradient, noise."""
    rng = np.random.default_rng(seed)
    paper = (225, 215, 190) if rgb else 215
    ink = (40, 40, 90) if rgb else 50
    im = Image.new("RGB" if rgb else "L", (size, size), paper)
    draw = ImageDraw.Draw(im)
    glyph = 0.6 * size
    left, top = 0.1 * size, 0.3 * size  # off centre: left and low
    _draw_glyph(draw, kind, (left, top, left + glyph, top + glyph), width=round(glyph / 11),
                fill=ink)
    a = np.asarray(im, np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    light = 1.0 - 0.35 * xx + 0.1 * yy  # uneven lighting
    a = a * (light[..., None] if rgb else light)
    a = ndimage.gaussian_filter(a, (1.0, 1.0, 0) if rgb else 1.0)
    a = a + rng.normal(0, 8.0, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def corr1(a: np.ndarray, b: np.ndarray) -> float:
    """Best correlation over shifts of up to 1 px: integer centre-of-mass centring
    can put the same shape one pixel apart (e.g. a symmetric ring whose centre of
    mass falls on a pixel boundary)."""
    return max(corr(np.roll(a, (dy, dx), axis=(0, 1)), b) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def ink_box(d: np.ndarray, eps: float = 0.0) -> tuple[int, int]:
    """(height, width) of the bounding box of pixels above eps."""
    rows = np.flatnonzero((d > eps).any(axis=1))
    cols = np.flatnonzero((d > eps).any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def save_png(path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


# ----------------------------------------------------------------------------- to_mnist


@pytest.mark.parametrize("kind", ["1", "7", "0"])
def test_photo_becomes_mnist_digit(kind):
    out = to_mnist(photo_of(kind))
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out.max() > 0.9  # white ink, saturated stroke cores
    # Black background: the corners carry no ink, the outer frame hardly any.
    for corner in (out[:4, :4], out[:4, -4:], out[-4:, :4], out[-4:, -4:]):
        assert corner.max() == 0.0
    frame = np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]])
    assert frame.mean() < 0.05
    assert (out > 0.5).mean() < 0.35  # ink is the minority -> polarity right
    # Longer side of the ink box is 20 px, aspect ratio kept.
    h, w = ink_box(out)
    assert 19 <= max(h, w) <= 21
    # Centre of mass at pixel (14, 14), within half a pixel (MNIST: integer shift).
    cy, cx = ndimage.center_of_mass(out)
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5
    if kind == "1":
        assert h >= 19 and w <= 10  # a tall thin stroke stays tall and thin
    if kind == "0":
        assert out[14, 14] < 0.2  # the ring keeps its hole


def test_photo_matches_drawn_glyph():
    for kind in ("1", "7", "0"):
        assert corr1(to_mnist(photo_of(kind)), mnist_like(kind)) > 0.8, kind


def test_polarity_light_ink_on_dark_gives_same_digit():
    photo = photo_of("7", rgb=False)
    normal = to_mnist(photo)
    inverted = to_mnist(255 - photo)
    assert corr(normal, inverted) > 0.95


def test_grey_and_colour_inputs_agree():
    rgb = photo_of("0", rgb=True, seed=3)
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    assert corr(to_mnist(rgb), to_mnist(grey)) > 0.95
    assert corr(to_mnist(rgb), to_mnist(rgb.astype(np.float32) / 255.0)) > 0.999


@pytest.mark.parametrize("kind", ["1", "7", "4", "0"])
def test_mnist_like_input_passes_through(kind):
    digit = mnist_like(kind)
    out = to_mnist(digit)
    assert corr(out, digit) > 0.95
    assert np.abs(out - digit).mean() < 0.05


def test_thin_pen_strokes_are_thickened():
    # A ballpoint "7": 2 px strokes on a 320 px digit would vanish at 20 px.
    im = Image.new("L", (400, 400), 220)
    _draw_glyph(ImageDraw.Draw(im), "7", (40, 40, 360, 360), width=2, fill=30)
    out = to_mnist(np.asarray(im))
    assert out.max() > 0.9 and out.sum() > 40
    assert corr1(out, mnist_like("7")) > 0.8


def test_to_mnist_rejects_bad_arrays():
    with pytest.raises(ImageError, match="empty"):
        to_mnist(np.zeros((0, 5), np.float32))
    with pytest.raises(ImageError, match="shape"):
        to_mnist(np.zeros((4, 4, 4, 4), np.float32))


def test_blank_images_have_no_ink():
    rng = np.random.default_rng(0)
    white = np.full((200, 300), 255, np.uint8)
    with pytest.raises(NoInkError, match="no ink"):
        to_mnist(white)
    yy, xx = np.mgrid[0:200, 0:300]
    paper = 200 - 0.2 * xx + rng.normal(0, 6, (200, 300))  # lit unevenly, noisy, blank
    with pytest.raises(NoInkError):
        to_mnist(np.clip(paper, 0, 255).astype(np.uint8))
    with pytest.raises(NoInkError):
        split_digits(white)
    assert issubclass(NoInkError, ImageError) and issubclass(ImageError, ValueError)
    assert issubclass(ImageError, HwrjaxError)


def test_small_specks_are_ignored():
    photo = photo_of("1", rgb=False, seed=2).copy()
    clean = to_mnist(photo)
    rng = np.random.default_rng(1)
    for y, x in rng.integers(10, 350, size=(6, 2)):
        photo[y : y + 3, x : x + 3] = 40  # dust
    assert corr(to_mnist(photo), clean) > 0.95


# ----------------------------------------------------------------------------- synth


def test_render_photo_round_trip_and_determinism():
    for i, kind in enumerate(("1", "7", "4", "0")):
        digit = mnist_like(kind)
        photo = synth.render_photo(digit, np.random.default_rng(i), rgb=bool(i % 2))
        assert photo.dtype == np.uint8
        assert photo.shape[:2][0] >= 28 * 8 and photo.ndim == (3 if i % 2 else 2)
        # Dark ink on light paper.
        grey = photo if photo.ndim == 2 else photo.mean(axis=2)
        assert np.median(grey) > 120 and grey.min() < np.median(grey) - 80
        assert corr1(to_mnist(photo), digit) > 0.8, kind
    a = synth.render_photo(mnist_like("7"), np.random.default_rng(7))
    b = synth.render_photo(mnist_like("7"), np.random.default_rng(7))
    c = synth.render_photo(mnist_like("7"), np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_render_number_is_deterministic_and_reports_boxes():
    digits = [mnist_like(k) for k in "170"]
    a, boxes = synth.render_number(digits, np.random.default_rng(3), return_boxes=True)
    b = synth.render_number(digits, np.random.default_rng(3))
    assert np.array_equal(a, b)
    assert len(boxes) == 3
    lefts = [box[1] for box in boxes]
    assert lefts == sorted(lefts)
    for top, left, bottom, right in boxes:
        assert 0 <= top < bottom <= a.shape[0] and 0 <= left < right <= a.shape[1]


# ----------------------------------------------------------------------------- split_digits


@pytest.mark.parametrize("kinds,seed", [("17", 0), ("704", 1), ("4107", 2), ("01741", 3)])
def test_split_digits_recovers_number_in_order(kinds, seed):
    sources = [mnist_like(k) for k in kinds]
    photo = synth.render_number(sources, np.random.default_rng(seed), touch_prob=0.0)
    got = split_digits(photo)
    assert len(got) == len(sources)
    for i, d in enumerate(got):
        assert d.shape == (28, 28)
        scores = [corr1(d, s) for s in sources]
        assert scores[i] > 0.8
        # Best match is the source in the same position (ignoring repeated glyphs).
        assert kinds[int(np.argmax(scores))] == kinds[i]


def test_number_in_a_field_cropped_on_its_lines_is_split():
    # A form's number field cut on its box lines: the lines are the image's edges (before: the
    # frame was taken for paper and the field for ink; 1 of 150 such numbers read, now 148).
    kinds = "4107"
    field = np.full((48, 12 + 36 * len(kinds)), 255, np.uint8)
    for i, k in enumerate(kinds):
        field[10:38, 8 + 36 * i : 36 + 36 * i] = 255 - np.round(mnist_like(k) * 255).astype(np.uint8)
    framed = field.copy()
    framed[:2] = framed[-2:] = framed[:, :2] = framed[:, -2:] = 40
    got = split_digits(framed)
    assert len(got) == len(kinds)
    for d, k in zip(got, kinds):
        assert corr1(d, mnist_like(k)) > 0.9, k


def test_touching_digits_are_split():
    # Two rings whose strokes overlap: one connected component, two digits.
    im = Image.new("L", (460, 260), 230)
    draw = ImageDraw.Draw(im)
    draw.ellipse((30, 30, 230, 230), outline=30, width=16)
    draw.ellipse((222, 30, 422, 230), outline=30, width=16)
    a = np.asarray(im, np.float32)
    labels, n = ndimage.label(a < 128)
    assert n == 1  # really touching
    got = split_digits(a.astype(np.uint8))
    assert len(got) == 2
    ring = to_mnist(a[:, :230].astype(np.uint8))  # the left ring alone
    for d in got:
        assert d[14, 14] < 0.2 and corr1(d, ring) > 0.8  # each half is a whole ring
    # A touching pair inside a longer number: "1", then "00" touching, then "7".
    im = Image.new("RGB", (760, 300), (220, 220, 205))
    draw = ImageDraw.Draw(im)
    for kind, left in (("1", 20), ("0", 200), ("0", 290), ("7", 470)):
        _draw_glyph(draw, kind, (left, 20, left + 220, 240), width=20, fill=(30, 30, 60))
    photo = np.asarray(im)
    assert ndimage.label(photo.mean(axis=2) < 128)[1] == 3
    got = split_digits(photo)
    assert len(got) == 4
    for d, kind in zip(got, "1007"):
        assert corr1(d, mnist_like(kind)) > 0.7, kind


def test_broken_digit_is_one_digit():
    # A "5" whose top bar is detached from its body: two components, one digit.
    im = Image.new("L", (300, 300), 235)
    draw = ImageDraw.Draw(im)
    draw.line([(110, 50), (200, 50)], fill=25, width=14)  # detached bar
    draw.line([(100, 70), (95, 140)], fill=25, width=14)
    draw.arc((80, 120, 200, 250), start=-150, end=150, fill=25, width=14)
    a = np.asarray(im)
    assert ndimage.label(a < 128)[1] == 2
    got = split_digits(a)
    assert len(got) == 1
    assert corr(got[0], to_mnist(a)) > 0.95


def test_split_digits_max_digits():
    photo = synth.render_number([mnist_like(k) for k in "1707"], np.random.default_rng(0),
                                touch_prob=0.0)
    with pytest.raises(ImageError, match="max_digits"):
        split_digits(photo, max_digits=3)


# ----------------------------------------------------------------------------- load_image


def test_load_image_formats(tmp_path):
    photo = photo_of("7", rgb=True)
    png = save_png(tmp_path / "d.png", photo)
    jpg = tmp_path / "d.jpg"
    Image.fromarray(photo).save(jpg, quality=90)
    bmp = tmp_path / "d.bmp"
    Image.fromarray(photo).save(bmp)
    ref = load_image(png)
    assert ref.dtype == np.float32 and ref.shape == photo.shape[:2]
    assert 0.0 <= ref.min() and ref.max() <= 1.0
    for source in (jpg, bmp, open(png, "rb").read(), io.BytesIO(open(png, "rb").read())):
        img = load_image(source)
        assert img.shape == ref.shape and np.abs(img - ref).mean() < 0.02
    assert corr(to_mnist(load_image(jpg)), to_mnist(photo)) > 0.95


def test_load_image_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((120, 120, 4), np.uint8)  # transparent black everywhere ...
    rgba[30:90, 55:65] = (0, 0, 0, 255)  # ... except an opaque black "1"
    path = save_png(tmp_path / "alpha.png", rgba)
    img = load_image(path)
    assert img[5, 5] > 0.99 and img[60, 60] < 0.01
    out = to_mnist(img)
    assert ink_box(out)[0] == 20


def test_load_image_applies_exif_orientation(tmp_path):
    a = np.full((40, 100), 255, np.uint8)
    a[:, :10] = 0  # a dark band on the left, in stored orientation
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rot.jpg"
    Image.fromarray(a).save(path, exif=exif, quality=95)
    img = load_image(path)
    assert img.shape == (100, 40)
    assert img[:10].mean() < 0.2 and img[-10:].mean() > 0.8  # band now on top


def test_load_image_16_bit(tmp_path):
    a = np.full((30, 30), 60000, np.uint16)
    a[10:20, 10:20] = 3000
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    img = load_image(path)
    assert abs(img[0, 0] - 60000 / 65535) < 0.01 and img[15, 15] < 0.1


def test_load_image_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are not the pixels you are looking for\n")
    with pytest.raises(ImageError, match="not an image"):
        load_image(text)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    good = open(save_png(tmp_path / "good.png", photo_of("1", rgb=False)), "rb").read()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(truncated)
    with pytest.raises(TypeError):
        load_image(12345)


def test_load_image_blank_file_has_no_ink(tmp_path):
    path = save_png(tmp_path / "blank.png", np.full((100, 100, 3), 255, np.uint8))
    with pytest.raises(NoInkError, match="no ink"):
        to_mnist(load_image(path))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_huge_header_is_refused_before_decoding(tmp_path):
    # A 70-byte PNG claiming 100000 x 100000 pixels (10 gigapixels).
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="100000x100000.*MAX_PIXELS") as info:
        load_image(path)
    assert not isinstance(info.value, Image.DecompressionBombError)
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_max_pixels_limit(tmp_path, monkeypatch):
    path = save_png(tmp_path / "small.png", np.full((100, 80), 255, np.uint8))
    assert load_image(path).shape == (100, 80)
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 5000)
    with pytest.raises(ImageError, match="80x100 = 8,000 pixels, over the limit of 5,000"):
        load_image(path)


def test_pillows_own_pixel_guard_still_speaks_once_our_limit_is_raised_above_it(tmp_path, monkeypatch):
    # The parsed header is used as the opened image only within Pillow's guard; past it Image.open decides.
    path = save_png(tmp_path / "small.png", np.full((100, 80), 255, np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 8,000 pixels: over twice Pillow's limit
    with pytest.raises(ImageError, match="larger than Pillow's pixel limit"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # between once and twice: Pillow only warns
    with pytest.warns(Image.DecompressionBombWarning):
        assert load_image(path).shape == (100, 80)


# ----------------------------------------------------------------------------- other captures
# Tight crops, tiny scans, binarized or few-level scans, either polarity, form boxes, stains:
# the images other digit collections and forms produce (tests.support.forms renders them).

_KINDS = ("1", "7", "4", "0")
# At 8 and 12 px the glyph "1" is 2 px wide with no paper between its edges. At 8 px it is read as
# a stroke (test_a_tiny_one_two_pixels_wide_and_all_stroke_is_read_as_a_stroke), but its slant is
# two opposed gradients: 0.78 like the glyph, as by hand. Enlarged 4x it is not refused, so it is
# not read again as a stroke, and it takes the dark side for ink (corr 0.41). Stretched forms lose
# the aspect ratio and are tested apart.
_DESTROYED = {("tight8", "1"), ("tight8_enlarged4", "1"), ("tight12", "1")}
_SHAPE_KEPT = sorted(set(forms.FORMS) - {"stretched16", "stretched16_dark_ink"})


def _render(form: str, kind: str, seed: int = 0) -> np.ndarray:
    return forms.render_form(form, (mnist_like(kind) * 255).astype(np.uint8), np.random.default_rng(seed))


@pytest.mark.parametrize("kind", ["7", "4", "0"])
def test_clean_tiny_scan_is_read_from_its_own_pixels_like_by_hand(kind, monkeypatch):
    # A 16 px scan at 4 grey levels: each level is the pen's coverage of a pixel, and a stroke is
    # two or three of them wide. Read from its own pixels it comes out as the classic hand
    # normalization makes it; read from the interpolated working copy, cut at a floor and scaled
    # back down, its strokes lose their faint edges (5-7% of the ink).
    scan = _render("levels16", kind)
    out, by_hand = to_mnist(scan), forms.classic_normalize(scan)
    assert corr1(out, by_hand) > 0.999
    assert 0.99 < out.sum() / by_hand.sum() <= 1.01
    monkeypatch.setattr(preprocess, "_source_soft", lambda *args: None)
    interpolated = to_mnist(scan)
    assert interpolated.sum() < 0.97 * out.sum()
    assert corr1(interpolated, by_hand) < corr1(out, by_hand)


@pytest.mark.parametrize(
    "form,kind", [(f, k) for f in _SHAPE_KEPT for k in _KINDS if (f, k) not in _DESTROYED]
)
def test_captured_digit_becomes_the_glyph(form, kind):
    image = _render(form, kind)
    out = to_mnist(image)
    want = 0.9
    if form == "tight8_enlarged4":  # light ink; its blur keeps the classic normalization by hand
        want = min(want, corr1(forms.classic_normalize(image), mnist_like(kind)))  # at 0.886-0.91 too
    assert corr1(out, mnist_like(kind)) > want
    h, w = ink_box(out, 0.05)
    assert 19 <= max(h, w) <= 21
    cy, cx = ndimage.center_of_mass(out)
    assert abs(cy - 14) <= 0.5 + 1e-4 and abs(cx - 14) <= 0.5 + 1e-4  # float32 sums


@pytest.mark.parametrize("kind", _KINDS)
def test_only_a_crop_on_box_lines_loses_its_frame(kind):
    # A form's cell cut on its lines shows little or no paper at its edges; its lines are cut off
    # before the polarity is judged (it was read as dark paper with light ink: 29.5% of form_cell
    # and 50.2% of form_cell_comb, lines on the left and right only, 74.9% of form_cell_corner,
    # bottom and left, 92.5% of form_cell_baseline, cut on the line it is written on, by the
    # headline, benchmarks/read_forms.py).
    for form in ("form_cell", "form_cell_open_top", "form_cell_comb", "form_cell_corner", "form_cell_baseline"):
        for seed in range(6):  # lines 1-3 px thick (before: corr 0.03-0.45 from 2 px up)
            image = _render(form, kind, seed)
            grey = preprocess._as_grey(image)
            inside = preprocess._strip_frame(grey)
            lined = {"form_cell": "tblr", "form_cell_open_top": "blr", "form_cell_comb": "lr",
                     "form_cell_corner": "bl", "form_cell_baseline": "b"}[form]
            assert (inside.shape[0] < grey.shape[0]) == ("b" in lined), (form, seed)
            assert (inside.shape[1] < grey.shape[1]) == ("l" in lined), (form, seed)
            assert corr1(to_mnist(image), mnist_like(kind)) > 0.85, (form, seed)
            assert corr1(to_mnist(255 - image), mnist_like(kind)) > 0.85, (form, seed)  # light lines on dark
    # A box with paper around it (left to the form-line removal), a tight crop whose strokes run
    # along one or two edges (the base of a "2", the bar of a "7"), a photo: nothing is cut.
    for form in ("form_box", "form_corner", "tight16", "tight16_dark_ink", "binary16", "tight32", "stained"):
        for glyph in (kind, "2"):
            grey = preprocess._as_grey(_render(form, glyph))
            assert preprocess._strip_frame(grey) is grey, (form, glyph)
    grey = preprocess._as_grey(photo_of(kind, rgb=False))
    assert preprocess._strip_frame(grey) is grey


@pytest.mark.parametrize("kind", _KINDS)
def test_a_digit_touching_one_separator_of_a_comb_field_loses_both(kind):
    # A comb field's cell cut on its separators (lines left and right only); the digit was written
    # against the left one. Only a line clear of the digit on the other side tells it from a
    # tight crop's own straight strokes.
    digit = forms.tight_crop((mnist_like(kind) * 255).astype(np.uint8), 30)
    h, w = digit.shape
    for width in (1, 2, 3):
        ink = np.zeros((36, 36), np.float32)
        ink[(36 - h) // 2 : (36 - h) // 2 + h, width : width + w] = digit
        ink[:, :width] = np.maximum(ink[:, :width], 0.7)  # the separator the digit touches
        ink[:, -width:] = 0.7
        image = np.clip(np.round(255 * (0.95 - 0.85 * ink)), 0, 255).astype(np.uint8)
        for im in (image, 255 - image):
            assert preprocess._strip_frame(preprocess._as_grey(im)).shape == (36, 36 - 2 * width), width
            assert corr1(to_mnist(im), mnist_like(kind)) > 0.85, width


@pytest.mark.parametrize("kind", _KINDS)
def test_a_digit_on_its_baseline_touching_the_top_keeps_its_polarity(kind):
    # Cut on the line it is written on and at the top of its own strokes: the line stays (the top
    # edge is not paper only), and it is the one edge of ink's colour, so the other three tell the
    # paper (before: one border edge in four of ink read as a mixed ring, and the pieces of a thin
    # digit's strokes decided: 19 of 1,000 form_cell_baseline cells in the wrong polarity).
    digit = forms.tight_crop((mnist_like(kind) * 255).astype(np.uint8), 30)
    h, w = digit.shape
    for width in (1, 2, 3):
        ink = np.zeros((h + 3 + width, 40), np.float32)
        ink[:h, (40 - w) // 2 : (40 - w) // 2 + w] = digit
        ink[-width:] = 0.7
        image = np.clip(np.round(255 * (0.95 - 0.85 * ink)), 0, 255).astype(np.uint8)
        for im, light in ((image, False), (255 - image, True)):
            assert preprocess._ink_is_light(preprocess._as_grey(im)) == light, width
            if width < 3:  # a line over _LINE_THIN of the image's height is kept as ink (_form_lines)
                assert corr1(to_mnist(im), mnist_like(kind)) > 0.85, width


@pytest.mark.parametrize("kind", _KINDS)
def test_an_mnist_style_file_is_read_as_it_is_even_enlarged(kind):
    # A 28x28 file of an MNIST-style set is what the network was trained on: its pixels come back
    # as they are, from the file and from the same file enlarged 2x or 3x with hard pixels.
    digit = np.round(mnist_like(kind) * 255).astype(np.uint8)
    assert preprocess.is_mnist_form(digit.astype(np.float32) / 255.0)
    for factor in (1, 2, 3):
        image = Image.fromarray(np.kron(digit, np.ones((factor, factor), np.uint8)))
        out = to_mnist(load_image(_png_bytes(image)))
        np.testing.assert_array_equal(out, digit.astype(np.float32) / 255.0)


@pytest.mark.parametrize("kind", _KINDS)
def test_digit_stretched_to_fill_its_box_fills_the_mnist_box(kind):
    image = _render("stretched16", kind)
    out = to_mnist(image)
    h, w = ink_box(out, 0.05)
    assert h >= 19 and w >= 19  # the aspect ratio is gone; the whole 20x20 box is used
    assert corr1(out, forms.classic_normalize(image)) > 0.9


@pytest.mark.parametrize("form", ["tight8", "tight16", "tight32", "binary16", "levels16"])
@pytest.mark.parametrize("kind", ("7", "4", "0"))
def test_tight_crop_polarity_is_found(form, kind):
    light = _render(form, kind)
    assert light[0].min() == 0 or light[-1].min() == 0  # the digit touches the frame
    a, b = to_mnist(light), to_mnist(255 - light)
    assert corr(a, b) > 0.98
    assert (a > 0.5).mean() < 0.35 and a[:3].max() == 0.0  # white ink on a black field


# MNIST test digits 509 (a "2") and 843 (a "5") as tests.support.forms renders them at 8 px (tight8):
# strokes one pixel wide that break into pieces where they cross pixels at a slant.
_TIGHT8_THIN = {
    "2": [[0, 1, 0, 13, 127, 189, 200, 162], [0, 1, 0, 37, 102, 10, 24, 194], [0, 0, 4, 0, 0, 0, 120, 128],
          [2, 0, 0, 11, 19, 50, 180, 15], [0, 3, 124, 163, 194, 255, 134, 0], [39, 147, 88, 79, 173, 53, 0, 4],
          [197, 97, 110, 163, 34, 0, 2, 0], [178, 178, 112, 0, 0, 4, 0, 0]],
    "5": [[1, 6, 0, 179, 236, 158, 164, 168], [0, 0, 23, 61, 19, 9, 21, 25], [16, 137, 234, 81, 0, 0, 0, 0],
          [18, 189, 228, 184, 168, 34, 0, 3], [0, 0, 7, 5, 126, 171, 0, 1], [45, 0, 0, 0, 38, 216, 7, 0],
          [154, 92, 0, 42, 227, 176, 0, 2], [21, 146, 198, 243, 165, 20, 0, 1]],
}


@pytest.mark.parametrize("kind", sorted(_TIGHT8_THIN))
def test_a_tiny_scan_whose_strokes_break_keeps_its_polarity(kind):
    # The light ink breaks into more pieces than the paper around it, which would make it the
    # paper; the paper lies flat at the dark end of the scale, and the ink's levels vary.
    # So does the scan enlarged 2x or 4x (bilinear), whose strokes still break where they did.
    small = np.array(_TIGHT8_THIN[kind], np.uint8)
    for k in (1, 2, 4):
        scan = np.asarray(Image.fromarray(small).resize((8 * k, 8 * k), Image.Resampling.BILINEAR))
        a, b = to_mnist(scan), to_mnist(255 - scan)
        assert corr(a, b) > 0.98, k
        assert corr(a, forms.classic_normalize(scan)) > 0.8, k
        assert (a > 0.5).mean() < 0.3 and a[:3].max() == 0.0, k  # white ink on a black field


def _tiny_scan(kind: str) -> np.ndarray:
    """An 8x8 scan like scikit-learn's digits: a 32x32 drawing averaged over 4x4 blocks, 17 grey levels."""
    big = Image.fromarray((mnist_like(kind)[2:26, 2:26] * 255).astype(np.uint8)).resize((32, 32))
    small = np.asarray(big.resize((8, 8), Image.Resampling.BOX), np.float32) / 255.0
    return (np.round(small * 16) * (255 / 16)).astype(np.uint8)


def test_8x8_scan_is_upsampled_not_refused():
    for kind in ("7", "4", "0"):
        tiny = _tiny_scan(kind)
        assert tiny.shape == (8, 8)
        assert corr1(to_mnist(tiny), mnist_like(kind)) > 0.8, kind


def _spread(a: np.ndarray) -> np.ndarray:
    """The digit's size: the standard deviation of its ink mass along rows and along columns."""
    r = np.arange(a.shape[0], dtype=np.float64)
    out = []
    for m in (a.sum(axis=1), a.sum(axis=0)):
        c = (m * r).sum() / m.sum()
        out.append(np.sqrt((m * (r - c) ** 2).sum() / m.sum()))
    return np.array(out)


@pytest.mark.parametrize("kind", ("1", "7", "4"))
def test_tiny_scan_keeps_the_size_of_its_faint_edge_pixels(kind):
    # A source pixel the pen crossed in part is faint. It belongs to the digit's extent, as the
    # classic normalization counts it (the box of every inked pixel scaled to 20 px); taken from the
    # upsampled copy, whose floor cuts it, the box is short of part of a pixel on each side and an
    # 8x8 digit comes out up to an eighth too large (before: the "4" 18% too large, corr 0.87).
    tiny = _tiny_scan(kind)
    assert preprocess._segment(tiny).source is not None  # a clean tiny scan: read on its own pixels
    out, hand = to_mnist(tiny), forms.classic_normalize(tiny)
    assert np.all(_spread(out) <= 1.1 * _spread(hand)), (_spread(out), _spread(hand))
    assert corr1(out, hand) > 0.93
    assert corr(to_mnist(255 - tiny), out) > 0.99  # either polarity, the same digit


@pytest.mark.parametrize("kind", ("7", "4", "0"))
def test_digits_stored_in_a_sliver_of_the_scale_read_like_full_scale(kind):
    # scikit-learn's digits are arrays of 0..16, a bitmap is often 0s and 1s. Passed as they are
    # (floats, or saved as 8- or 16-bit files without scaling) they span a sliver of the scale:
    # fainter than any photo's ink may be, and they were refused for their contrast.
    levels = np.round(_tiny_scan(kind) / (255 / 16))  # 0..16
    want = to_mnist(np.round(levels * (255 / levels.max())).astype(np.uint8))  # scaled to the full range
    for faint in (levels, levels.astype(np.uint8), levels.astype(np.uint16) * 16, 255 - levels.astype(np.uint8)):
        assert corr(to_mnist(faint), want) > 0.99, faint.dtype
    # On a big canvas: its paper is one exact value too.
    canvas = np.zeros((64, 64), np.uint8)
    canvas[20:28, 30:38] = levels.astype(np.uint8)
    scaled = np.round(canvas * (255 / levels.max())).astype(np.uint8)
    assert corr(to_mnist(canvas), to_mnist(scaled)) > 0.99
    # A bitmap of 0s and 1s reads like the same bitmap of 0s and 255s.
    bits = np.asarray(Image.fromarray(mnist_like(kind)).resize((32, 32))) > 0.5
    assert corr(to_mnist(bits.astype(np.uint8)), to_mnist(bits.astype(np.uint8) * 255)) > 0.99


def test_a_faint_photo_is_still_refused_for_its_contrast():
    # A photo's paper level lies among its noise, never one exact value at an end of its range: a
    # faint photo keeps its levels and the contrast floor (_MIN_CONTRAST).
    photo = photo_of("7", rgb=False).astype(np.float32)
    assert corr1(to_mnist(photo.astype(np.uint8)), mnist_like("7")) > 0.7  # readable at full contrast
    faint = np.clip(200 + (photo - photo.mean()) * 0.03, 0, 255).astype(np.uint8)
    assert 6 <= int(faint.max()) - int(faint.min()) < 32  # a span that a digital image would be stretched from
    with pytest.raises(NoInkError, match="no ink"):
        to_mnist(faint)


@pytest.mark.parametrize("name", ["white", "black", "grey", "noise8", "binary_noise16", "noise64", "gauss300"])
def test_images_without_a_digit_are_refused_with_a_reason(name):
    rng = np.random.default_rng(1)
    image = {
        "white": np.full((40, 30), 255, np.uint8),
        "black": np.zeros((12, 12), np.uint8),
        "grey": np.full((200, 200), 128, np.uint8),
        "noise8": (rng.random((8, 8)) * 255).astype(np.uint8),
        "binary_noise16": ((rng.random((16, 16)) > 0.5) * 255).astype(np.uint8),
        "noise64": (rng.random((64, 64)) * 255).astype(np.uint8),
        "gauss300": np.clip(128 + rng.normal(0, 30, (300, 300)), 0, 255).astype(np.uint8),
    }[name]
    with pytest.raises(NoInkError, match="no ink|no digit") as info:
        to_mnist(image)
    assert "\n" not in str(info.value)
    with pytest.raises(NoInkError):
        split_digits(image)


_EIGHT_1PX = [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", "#...#", ".###."]


def test_a_tiny_digit_drawn_with_one_pixel_strokes_is_not_taken_for_noise():
    # An 8x5 "8" whose loops are one pixel wide: stroke, paper, stroke. Its neighbouring pixels are
    # as unrelated as noise's (the old gate refused it), but pixels two apart are opposed.
    eight = np.array([[255 if c == "#" else 0 for c in row] for row in _EIGHT_1PX], np.uint8)
    assert preprocess._neighbour_correlation(eight / 255.0) < preprocess._MIN_CORRELATION
    for image in (eight, 255 - eight):
        out = to_mnist(image)
        assert ndimage.label(out < 0.3)[1] - 1 == 2  # the paper outside and two holes: an 8
        assert corr(out, forms.classic_normalize(eight)) > 0.7


def test_a_tiny_one_two_pixels_wide_and_all_stroke_is_read_as_a_stroke():
    # An 8 px scan of a "1" is 2 px wide and every pixel is stroke: no paper shows on its border,
    # and the background found under it was the stroke itself (before: corr 0.36, a blot).
    one = _render("tight8", "1")
    assert one.shape == (8, 2) and one.min() > 80
    for image in (one, 255 - one):
        out = to_mnist(image)
        assert corr(out, forms.classic_normalize(one)) > 0.9
        assert corr1(out, mnist_like("1")) > 0.75
        height, width = ink_box(out, 0.3)
        assert height >= 18 and width <= 6
    with pytest.raises(NoInkError):  # a flat strip shows no stroke
        to_mnist(np.full((8, 2), 200, np.uint8))


# MNIST test digit 601, a "1", as tests.support.forms renders it at 8 px: every pixel is stroke.
_TIGHT8_ONE = [[187, 137], [189, 137], [173, 182], [176, 178], [176, 152], [176, 134], [179, 130], [142, 129]]


def test_an_enlarged_tiny_one_that_is_all_stroke_is_read_as_a_stroke():
    # Enlarged 2x or 4x (bilinear), the strip is 4 and 8 px wide and still all stroke: the path
    # found no ink, taking the stroke for its paper (before: "no ink found" for both polarities).
    one = np.array(_TIGHT8_ONE, np.uint8)
    for k in (1, 2, 4):
        big = np.asarray(Image.fromarray(one).resize((2 * k, 8 * k), Image.Resampling.BILINEAR))
        for image in (big, 255 - big):
            out = to_mnist(image)
            assert corr(out, forms.classic_normalize(big)) > 0.99, k
            height, width = ink_box(out, 0.3)
            assert height >= 18 and width <= 6, k
    # A narrow crop with no stroke in it keeps the reason it was refused for.
    with pytest.raises(NoInkError, match="no ink"):
        to_mnist(np.full((32, 8), 90, np.uint8))
    with pytest.raises(NoInkError, match="noise"):
        to_mnist((np.random.default_rng(3).random((32, 8)) * 255).astype(np.uint8))


def test_most_tiny_noise_is_still_refused():
    # An 8x8 image of noise can look like a digit by chance; most must not (1,000 seeds on the
    # same path: 89.7% refused before pixels two apart were looked at, 86.5% after).
    rng = np.random.default_rng(7)
    refused = 0
    for _ in range(200):
        try:
            to_mnist((rng.random((8, 8)) * 255).astype(np.uint8))
        except NoInkError:
            refused += 1
    assert refused >= 0.82 * 200
    for _ in range(20):
        with pytest.raises(NoInkError, match="noise"):
            to_mnist((rng.random((16, 16)) * 255).astype(np.uint8))


def test_free_standing_underline_is_dropped_but_a_digit_bar_is_kept():
    digit = Image.new("L", (120, 150), 255)
    _draw_glyph(ImageDraw.Draw(digit), "4", (10, 0, 110, 112), width=9, fill=20)
    ImageDraw.Draw(digit).line([(0, 140), (119, 140)], fill=20, width=3)  # the form's line
    assert corr1(to_mnist(np.asarray(digit)), mnist_like("4")) > 0.9
    # A tight "7": its bar runs from edge to edge at the top and stays part of the digit.
    seven = to_mnist(_render("tight32", "7"))
    assert corr1(seven, mnist_like("7")) > 0.9
    top = int(np.flatnonzero(seven.max(axis=1) > 0.5)[0])
    assert ink_box(seven[top : top + 3], 0.5)[1] >= 12  # the bar is still there, wide


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _peak_mb(fn) -> float:
    """Peak memory of the arrays fn allocates (numpy and scipy report to tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    except ImageError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 1e6


@pytest.mark.parametrize("size", [(2, 5000), (5000, 2), (60, 1500)])
def test_thin_lines_on_long_canvases_cost_bounded_memory(size):
    # Once a 106-byte PNG of a 1-px line made the thickening dilate with a disk thousands of
    # px wide (23 GB). Every step now works on at most a fixed multiple of a working size.
    w, h = size
    im = Image.new("L", size, 255)
    ImageDraw.Draw(im).line([(w // 2, 0), (w // 2 - 1, h - 1)] if h > w else [(0, h // 2), (w - 1, h // 2)], fill=0)
    data = _png_bytes(im)
    assert len(data) < 1000
    assert _peak_mb(lambda: to_mnist(load_image(data))) < 100
    assert _peak_mb(lambda: split_digits(load_image(data))) < 100


def test_line_read_as_a_number_is_refused_before_it_is_cut_up():
    im = Image.new("L", (5000, 2), 255)
    ImageDraw.Draw(im).line([(0, 1), (4999, 1)], fill=0)
    with pytest.raises(ImageError, match="more than max_digits"):
        split_digits(load_image(_png_bytes(im)))


def test_large_lossless_images_are_reduced_before_they_become_floats():
    im = Image.new("RGB", (2800, 2800), (255, 255, 255))
    ImageDraw.Draw(im).line([(1400, 300), (1300, 2500)], fill=(0, 0, 0), width=40)
    grey = load_image(_png_bytes(im))
    assert grey.size <= preprocess.DECODE_PIXELS
    assert grey.shape[0] == grey.shape[1] and grey.min() < 0.2 and np.median(grey) > 0.9
    # 6300x6300 RGBA (170 KB of PNG, 160 MB decoded) and 2800x2800 RGBA (31 MB decoded) are
    # refused on their headers.
    big = _png_bytes(Image.new("RGBA", (6300, 6300), (255, 255, 255, 255)))
    with pytest.raises(ImageError, match="MAX_PIXELS"):
        load_image(big)
    with pytest.raises(ImageError, match="2800x2800 RGBA.*MAX_DECODED_BYTES"):
        load_image(_png_bytes(im.convert("RGBA")))


def test_large_jpeg_is_decoded_at_reduced_scale():
    im = Image.new("RGB", (4000, 3000), (230, 225, 210))
    _draw_glyph(ImageDraw.Draw(im), "7", (1200, 600, 2800, 2200), width=120, fill=(30, 30, 60))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    grey = load_image(buf.getvalue())
    # 1/8 scale: the smallest libjpeg offers that is not below the working size (400x300 for 12 MP).
    assert grey.shape == (375, 500) and preprocess.WORK_PIXELS <= grey.size <= preprocess.DECODE_PIXELS
    assert corr1(to_mnist(grey), mnist_like("7")) > 0.9


def test_non_finite_pixels_in_a_float_tiff_are_ignored(tmp_path):
    a = np.zeros((100, 100), np.float32)
    a[20:80, 45:55] = 1.0
    a[3, 3] = np.inf
    a[90, 90] = np.nan
    path = tmp_path / "float.tiff"
    Image.fromarray(a, "F").save(path)
    grey = load_image(path)
    assert np.isfinite(grey).all() and grey.max() == 1.0 and grey[3, 3] == 0.0
    out = to_mnist(grey)
    h, w = ink_box(out, 0.05)
    assert h >= 19 and w <= 8  # the bar, upright


@pytest.mark.parametrize("ink", [(255, 255, 255, 255), (0, 0, 0, 255), (30, 60, 200, 255)])
def test_ink_on_a_transparent_canvas_is_the_opaque_part(ink):
    # A drawing app's export: strokes opaque, the rest transparent (its colour says nothing).
    im = Image.new("RGBA", (112, 112), (0, 0, 0, 0) if ink[0] == 255 else (255, 255, 255, 0))
    _draw_glyph(ImageDraw.Draw(im), "7", (0, 0, 112, 112), width=10, fill=ink)
    assert corr1(to_mnist(load_image(_png_bytes(im))), mnist_like("7")) > 0.9


@pytest.mark.parametrize("k", [2, 4, 7])
def test_hard_pixel_enlargement_reads_like_the_native_scan(k):
    small = _render("tight12", "4")
    big = np.kron(small, np.ones((k, k), np.uint8))
    np.testing.assert_array_equal(to_mnist(big), to_mnist(small))
    # Not every image of flat regions is an enlargement: one odd pixel and it is read as it is.
    odd = big.copy()
    odd[0, 1] = 255 - odd[0, 1]
    assert preprocess._native_pixels(odd.astype(np.float32)).shape == odd.shape


def _nearest(small: np.ndarray, h: int, w: int, rounding: str) -> np.ndarray:
    """`small` enlarged to h x w with hard pixels: Pillow's NEAREST, or OpenCV's (each pixel takes
    the source pixel under its top-left corner)."""
    if rounding == "pillow":
        return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.NEAREST))
    rows = np.arange(h) * small.shape[0] // h
    cols = np.arange(w) * small.shape[1] // w
    return small[rows][:, cols]


@pytest.mark.parametrize("rounding", ["pillow", "opencv"])
@pytest.mark.parametrize("factor", [2.5, 3.5, 5.25, 8.75])
def test_enlargement_by_a_fractional_factor_reads_like_the_native_scan(factor, rounding):
    # An 8x8 scan resized to 28x28 (or any size) with hard pixels: blocks of 3 and 4 pixels.
    small = _tiny_scan("4")
    size = round(8 * factor)
    big = _nearest(small, size, size, rounding)
    assert not np.array_equal(big, np.kron(small, np.ones((2, 2), np.uint8))[:size, :size])
    np.testing.assert_array_equal(preprocess._native_pixels(big.astype(np.float32)), small.astype(np.float32))
    np.testing.assert_array_equal(to_mnist(big), to_mnist(small))
    # Enlarged smoothly, the image is read as it is; enlarged to another aspect, it keeps that aspect.
    smooth = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR))
    assert preprocess._native_pixels(smooth.astype(np.float32)).shape == smooth.shape
    wide = _nearest(small, size, round(size * 1.5), rounding)
    h, w = preprocess._native_pixels(wide.astype(np.float32)).shape
    assert w / h == pytest.approx(wide.shape[1] / wide.shape[0], rel=0.02)


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    import os

    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo)


# ----------------------------------------------------------------------------- exact fast paths


def test_order_statistics_equal_numpys_bit_for_bit():
    """The quantiles read off one sort are np.percentile's ("linear") and np.median's, value and dtype."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 40)) if trial % 2 else int(rng.integers(40, 12000))
        a = ((rng.random(n) - rng.random()) * rng.choice([1e-3, 1.0, 300.0])).astype(np.float32)
        if trial % 3 == 0:
            a = (np.round(a * 7) / 7).astype(np.float32)  # ties, as in few-level scans
        if trial % 5 == 0:
            a = a.astype(np.float64)
        s = np.sort(a)
        for q in (0, 0.5, 5, 50, 75, 90, 99.5, 100):
            want, got = np.percentile(a, q), preprocess._percentile_sorted(s, q)
            assert got == want and type(got) is type(want), (n, q)
        for qs in ((5, 99.5), (0.5, 99.5)):
            want, got = np.percentile(a, list(qs)), preprocess._percentile_sorted(s, qs)
            assert list(got) == list(want) and all(type(g) is np.float64 for g in got), (n, qs)
        want = np.median(a)
        got = preprocess._median_sorted(s)
        assert got == want and type(got) is type(want), n
        if trial % 4 < 2:  # zeros: any count, and just below, at and past the middle
            a[: int(rng.choice([rng.integers(0, n + 1), max(0, n // 2 - 1), n // 2, n // 2 + 1]))] = 0.0
        want = np.median(np.abs(a))
        got = preprocess._median_abs(a.copy())
        assert got == want and type(got) is type(want), n


def test_lean_helpers_equal_the_numpy_expressions_they_replace_bit_for_bit():
    """Otsu without error-state patches, boxes by argmax, shares and means by sums: the same floats."""
    rng = np.random.default_rng(3)
    for trial in range(400):
        n = int(rng.integers(2, 30)) if trial % 2 else int(rng.integers(30, 9000))
        v = (rng.random(n) * rng.choice([1e-4, 1.0, 50.0]) - rng.random()).astype(np.float32)
        if trial % 3 == 0:
            v = (np.round(v * 3) / 3).astype(np.float32)  # few levels: many empty bins
        if trial % 7 == 0:
            v[: n // 2] = v[0]  # half the sample one value
        assert preprocess._otsu(v) == _otsu_reference(v), trial
    assert preprocess._otsu(np.array([0.0, 1.0], np.float32)) == _otsu_reference(np.array([0.0, 1.0], np.float32))
    for shape in [(1, 1), (1, 9), (7, 1), (5, 5), (30, 41)]:
        for density in (0.0, 0.02, 0.5, 1.0):
            mask = rng.random(shape) < density
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            want = None if rows.size == 0 else (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
            assert preprocess._bbox(mask) == want
            assert preprocess._share(mask) == float(np.mean(mask))
    for shape in [(2, 2), (9, 13), (48, 31)]:
        a = rng.random(shape).astype(np.float32)
        d = a.astype(np.float64) - float(a.mean())
        want = float(max(np.mean(d[1:] * d[:-1]), np.mean(d[:, 1:] * d[:, :-1])) / float(np.mean(d * d)))
        assert preprocess._neighbour_correlation(a) == want


def _otsu_reference(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold as written before the lean version: every bin, with nan/inf patched."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        return hi
    width = (hi - lo) / bins
    hist = np.bincount(np.minimum(((values - lo) / width).astype(np.int64), bins - 1), minlength=bins)
    p = hist.astype(np.float64) / hist.sum()
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * (lo + (np.arange(bins) + 0.5) * width))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = ((m0[-1] * w0 - m0) ** 2 / (w0 * (1.0 - w0)))[:-1]
    return lo + (int(np.argmax(np.nan_to_num(between, nan=-1.0))) + 1) * width


def test_3x3_morphology_and_centre_of_mass_equal_scipys():
    rng = np.random.default_rng(1)
    ones = np.ones((3, 3), bool)
    for shape in [(1, 1), (1, 7), (5, 1), (2, 2), (9, 13), (40, 31)]:
        for density in (0.05, 0.5, 0.95):
            mask = rng.random(shape) < density
            for k in (1, 2, 3, 6):  # 6: a reach past the (1, 7) and (5, 1) images
                assert np.array_equal(preprocess._dilate3(mask, k),
                                      ndimage.binary_dilation(mask, structure=ones, iterations=k))
            assert np.array_equal(preprocess._erode3(mask), ndimage.binary_erosion(mask, structure=ones, border_value=0))
            soft = (rng.random(shape) * mask).astype(np.float32)
            if soft.sum() > 0:
                assert preprocess._centre_of_mass(soft) == tuple(float(c) for c in ndimage.center_of_mass(soft))


def test_separable_filters_equal_ndimages_bit_for_bit():
    rng = np.random.default_rng(2)
    for shape in [(8, 8), (9, 31), (31, 9), (3, 50), (48, 48), (76, 61), (120, 90)]:
        a = rng.random(shape).astype(np.float32)
        for sigma in (1.0, 1.37, 2.5):
            assert np.array_equal(preprocess._gaussian(a, sigma), ndimage.gaussian_filter(a, sigma))
        for size in (1, 2, 3, 4, 5, 12, 19, 24, 38, 45):
            for mode in ("nearest", "reflect"):
                assert np.array_equal(preprocess._box(a, size, mode), ndimage.uniform_filter(a, size, mode=mode))
            if size >= 3:
                assert np.array_equal(preprocess._opening(a, size), ndimage.grey_opening(a, size=(size, size),
                                                                                          mode="reflect"))
