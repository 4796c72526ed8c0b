"""Turn photos and scans of handwritten digits into MNIST-style 28x28 arrays.

MNIST digits are white ink (1.0) on black (0.0); the digit is scaled so the
longer side of its bounding box is 20 px (aspect ratio kept, anti-aliased) and
pasted into a 28x28 field with an integer shift that puts its centre of mass at
pixel (14, 14) (row, column; so the centre of mass lies in [13.5, 14.5]).
A photo of a digit on paper is dark ink on light, unevenly lit, noisy paper.

Pipeline (`to_mnist`):
  0. the pixels the digit was written in: a frame of box lines at the image's
     edges (a form's cell cropped on its lines) is cut off, and a hard-pixel
     (nearest-neighbour) enlargement by any factor from 2 to 16 is undone;
     an image already in MNIST's form is returned as it is;
  1. grey conversion; large inputs are area-downscaled to a working size of
     about `WORK_PIXELS` pixels for segmentation, tiny ones (8x8 and up)
     upsampled to `MIN_WORK_SIDE`; a faint digital image (its paper one exact
     value at an end of a narrow range: levels 0..16 stored unscaled) is
     stretched to the full range; a tiny image whose pixels are unrelated
     one apart and two apart is refused as noise;
  2. polarity: the paper is taken to be the median of a thin border ring; the
     ink is the side (darker or lighter) with the larger extreme deviation; a
     tight crop, whose ring is partly ink, is judged by its pieces instead
     (a small scan whose pieces and area disagree by its flat paper), and
     gets a margin of paper; a strip of stroke with no paper in it (a tight
     "1" from an 8 px scan) is put on paper;
  3. background removal: a grey-level morphological opening of the
     ink-positive image (window = half the shorter side) follows smooth
     lighting gradients but not strokes; it is subtracted;
  4. Otsu threshold (never below 4 robust noise sigmas) on a lightly smoothed
     copy gives the ink mask; connected components much smaller than the
     largest are dropped as specks; too little contrast raises `NoInkError`;
  5. grey levels are kept: the ink strength is rescaled so stroke cores are
     ~1.0, zeroed outside a slightly dilated mask; a clean (noiseless) small
     scan takes them from its own pixels, as the classic normalization does;
  6. very thin strokes (below ~1.5 px once scaled to 20 px) are thickened;
  7. crop to the ink bounding box, resize the longer side to 20 px with
     Lanczos, paste into 28x28 by centre of mass.

`split_digits` runs the same segmentation, groups connected components into
digits and cuts over-wide components; see its docstring for the limits.

Known limits: the paper must fill the frame (a dark table around the sheet
confuses polarity and background); a single digit is assumed to be the
dominant ink in the image (ruled lines, text or large smudges are kept as ink);
sharp-edged shadows are not removed; digits smaller than ~20 px after the
working-size downscale lose detail.
"""

from __future__ import annotations

import functools
import io
import math
import os
import stat
import struct
from dataclasses import dataclass
from typing import BinaryIO, Union

from absl import logging
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from hwrjax.core.errors import HwrjaxError

__all__ = [
    "ImageError",
    "NoInkError",
    "MAX_PIXELS",
    "load_image",
    "is_mnist_form",
    "to_mnist",
    "split_digits",
]

# Largest image (width * height) `load_image` will decode; checked on the header ...
MAX_PIXELS = 24_000_000
# ... and the most bytes a lossless file may decode to: its cost in time and memory grows with
# them (24 MB: a 300 dpi A4 scan in grey, 8 MP of RGB or 6 MP of RGBA, ~0.1 s each here).
MAX_DECODED_BYTES = 24_000_000
# JPEGs are decoded at 1/2 to 1/8 scale in libjpeg, so larger ones cost no more than that.
MAX_JPEG_PIXELS = 64_000_000
# Decoded images larger than this are area-reduced in Pillow before they become floats.
DECODE_PIXELS = 1_000_000
# Segmentation runs on an area-downscaled copy of at most about this many pixels ...
WORK_PIXELS = 120_000
# ... and on an upsampled copy when the image is smaller than this on its shorter side.
MIN_WORK_SIDE = 48

MNIST_SIZE = 28
MNIST_BOX = 20
_CENTRE = 14  # MNIST puts the centre of mass at pixel index 14 (row and column).

_MIN_CONTRAST = 0.06  # weakest ink-vs-paper difference accepted, on a [0, 1] scale
_NOISE_SIGMAS = 6.0  # ink must stand this many noise sigmas above the paper
_SPECK_FRACTION = 0.04  # components below this fraction of the largest are specks
_MIN_STROKE = 1.5  # thinner strokes (px, at the 20 px box) are thickened ...
_TARGET_STROKE = 2.0  # ... to about this width
_MIN_INK_PX = 4  # ink spanning fewer px (at working resolution) ...
_MIN_INK_FRACTION = 0.03  # ... or less than this fraction of the shorter side is a dot
_BBOX_EPS = 0.02  # ink strength counted as ink for the bounding box
_MIXED_RING = 0.3  # a border ring with more ink-like pixels than this shows no paper level
_SOFT_FLOOR = 0.15  # share of the paper-to-ink range cut from the soft ink levels
_CLEAN_NOISE = 0.05  # a tiny scan whose paper noise is below this share of its ink contrast is "clean" ...
_CLEAN_FLOOR = 0.075  # ... and has this share of its paper-to-ink range cut, not _SOFT_FLOOR
_FAINT_SPAN = 0.125  # a digital image spanning less than this share of the full scale ...
_MIN_SPAN = 1e-3  # ... and more than this (a quarter of an 8-bit level; less is round-off) ...
_FLAT_PAPER = 0.25  # ... whose lowest or highest value lies on this share of its pixels is stretched
_FLAT_TOLERANCE = 0.03  # _flat_end: levels this near an end of the range lie flat; the paper's end holds
_FLAT_OTHER = 0.25  # ... _FLAT_PAPER of the pixels or more, and the other end at most this share of that
_SQUAT = 3  # a small crop less than this many times as long as it is wide: no narrow "1"
_FRAME_FULL = 0.9  # an edge line this much of one class is a line of a frame ...
_FRAME_DEPTH = 0.15  # ... within this outer share of the shorter side (_strip_frame)
_OPEN_EDGE = 0.05  # a frame of one line: the other edges hold at most this share of its class
_OPEN_EDGES = 0.5  # a frame of two lines: the open edges hold less than this share of it
_MARGIN = 0.25  # paper added around a tight crop, as a fraction of its longer side
_STRIP = (8, 32)  # a scan 2 px across and 8-32 px long is one stroke of a tiny "1", no paper
_MIN_CORRELATION = 0.2  # a small image whose neighbouring pixels correlate less ...
_MIN_ALTERNATION = 0.25  # ... whose pixels two apart are opposed less than this ...
_MIN_STRUCTURE = 0.3  # ... and for which the two together make less than this is noise
_MAX_COMPONENTS = 2000  # more separate marks than this is noise or texture, not digits
_LINE_COVER = 0.9  # a form line covers this share of the ink's extent along it ...
_LINE_THIN = 0.08  # ... is at most this share of the extent across it thick ...
_LINE_EDGE = 0.2  # ... and lies in this outer share of the extent across it
_REPLICATION_PIXELS = 1_000_000  # larger images are not checked for hard-pixel enlargement
_MAX_THICKEN = 4  # thickening radius cap, in px at the layout's working box (4x the 20 px box)

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]

_EIGHT = np.ones((3, 3), bool)  # 8-connectivity for ndimage.label
_EIGHT.flags.writeable = False
_SQRT2 = np.sqrt(2.0)  # np.float64, as before: noise levels keep that type, and the soft levels the precision it gives


class ImageError(HwrjaxError, ValueError):
    """The input cannot be turned into a digit image; the message says why and what to do."""


class NoInkError(ImageError):
    """The image contains no detectable ink (blank, or too faint / low contrast)."""


# --------------------------------------------------------------------------- loading


def load_image(source: ImageSource) -> np.ndarray:
    """Reads an image file, bytes or binary stream into a float32 grey array in [0, 1].

    The cost is bounded whatever the file says: the header is checked against
    `MAX_PIXELS` before any pixel is decoded, JPEGs are decoded at a reduced scale
    when they are larger than needed, and anything larger than `DECODE_PIXELS` is
    area-reduced in Pillow (on 8-bit data) before it becomes a float array.
    """
    fp, name = _open_source(source)
    try:
        im = _read_header(fp)
        if im is not None:
            _check_size(im.size, name, im.format, im.mode)
        if im is None or (Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS):
            # No plugin took the header, or Pillow's own bomb guard has its say (only when MAX_PIXELS was
            # raised above it): Image.open decides. Otherwise the parsed header is the opened image.
            fp.seek(0)
            try:
                im = Image.open(fp)
            except UnidentifiedImageError:
                raise ImageError(
                    f"{name} is not an image Pillow can read; save it as PNG, JPEG or BMP"
                ) from None
            except Image.DecompressionBombError:
                raise ImageError(
                    f"{name} is larger than Pillow's pixel limit; downscale it first"
                ) from None
            _check_size(im.size, name, im.format, im.mode)
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)  # The first frame of an animation or a multi-page scan.
        try:
            if im.format == "JPEG" and im.width * im.height > WORK_PIXELS:
                # Decode at 1/2, 1/4 or 1/8 scale in libjpeg, never below the working size that `to_mnist`
                # and `split_digits` area-reduce every image to: far less time and memory, and no pixel
                # they would use is lost (each decoded pixel stands for an s x s block of the file).
                f = (WORK_PIXELS / (im.width * im.height)) ** 0.5
                im.draft(im.mode, (math.ceil(im.width * f), math.ceil(im.height * f)))
            im.load()
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            raise ImageError(
                f"{name} is corrupt or truncated ({e}); re-export or re-download the file"
            ) from None
        try:
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy when there is nothing to turn
        except Exception as e:  # A malformed EXIF block must not make the image unreadable.
            logging.warning("Ignoring unusable EXIF orientation in %s: %s", name, e)
        return _pil_to_grey(_reduce(im))
    finally:
        fp.close()


def _reduce(im: Image.Image) -> Image.Image:
    """Area-reduces an image over DECODE_PIXELS by an integer factor (in Pillow, before floats)."""
    pixels = im.width * im.height
    if pixels <= DECODE_PIXELS:
        return im
    factor = int(np.ceil((pixels / DECODE_PIXELS) ** 0.5))
    if im.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "F", "P", "CMYK", "YCbCr", "La", "RGBa"):
        im = im.convert("RGBA" if "A" in im.mode else "RGB")
    if im.mode in ("P", "1"):
        im = im.convert("RGBA" if "transparency" in im.info else "L")
    return im.reduce(factor)


def _open_source(source: ImageSource) -> tuple[BinaryIO, str]:
    """Returns a seekable binary stream for `source` and a name for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("image data is empty (0 bytes); pass the bytes of an image file")
        return io.BytesIO(data), "image data"
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        name = f"image file {path!r}"
        try:
            mode = os.stat(path).st_mode  # one call answers all three questions below
        except (OSError, ValueError):  # as os.path.exists: missing, unreachable, or a path the OS refuses
            raise ImageError(f"cannot read {name}: no such file; check the path") from None
        if stat.S_ISDIR(mode):
            raise ImageError(f"cannot read {name}: it is a directory; pass an image file")
        if not stat.S_ISREG(mode):
            # A FIFO, socket or device would block or never end; it is never opened.
            raise ImageError(f"cannot read {name}: not a regular file (a pipe or device); pass an image file")
        try:
            fp = open(path, "rb")
        except OSError as e:
            raise ImageError(
                f"cannot read {name}: {e.strerror or e}; check the file permissions"
            ) from None
        if os.fstat(fp.fileno()).st_size == 0:
            fp.close()
            raise ImageError(f"{name} is empty (0 bytes); pass a non-empty image file")
        return fp, name
    if hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError("image stream must be opened in binary mode ('rb')")
        if not data:
            raise ImageError("image stream is empty (0 bytes); pass an image file's bytes")
        return io.BytesIO(bytes(data)), "image stream"
    raise TypeError(
        f"load_image takes a path, bytes or a binary stream, not {type(source).__name__}"
    )


def _read_header(fp: BinaryIO) -> Image.Image | None:
    """Opens the image as `Image.open` would, parsing only its header (no pixel data, no bomb guard).

    Returns None when no registered Pillow format accepts the data, in which case
    `Image.open` gets the final say. This mirrors how `Image.open` picks a plugin,
    so that our own `MAX_PIXELS` check runs before Pillow's decompression-bomb check.
    """
    fp.seek(0)
    prefix = fp.read(16)
    try:
        registry_loaders = (Image.preinit, Image.init)
        registry = Image.OPEN
        format_ids = Image.ID
    except AttributeError:  # Pillow internals moved; fall back to Image.open.
        return None
    tried: set[str] = set()
    for loader in registry_loaders:
        loader()
        for fmt in tuple(format_ids):
            if fmt in tried or fmt not in registry:
                continue
            tried.add(fmt)
            factory, accept = registry[fmt]
            try:
                accepted = accept is None or accept(prefix)
                if not accepted or isinstance(accepted, str):
                    continue
                fp.seek(0)
                return factory(fp, "")
            except Exception:  # Probing only: any plugin failure means "not this format".
                continue
    return None


def _check_size(size: tuple[int, int], name: str, fmt: str | None = None, mode: str = "L") -> None:
    """Raises ImageError for a 0-pixel image, or one over the pixel or decoded-byte limits."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name} is empty ({w}x{h} pixels); pass an image with content")
    limit, what = (MAX_JPEG_PIXELS, "MAX_JPEG_PIXELS") if fmt == "JPEG" else (MAX_PIXELS, "MAX_PIXELS")
    if w * h > limit:
        raise ImageError(
            f"{name} is {w}x{h} = {w * h:,} pixels, over the limit of {limit:,} "
            f"(hwrjax.apps.preprocess.{what}); downscale it first"
        )
    if fmt != "JPEG":
        per_pixel = 2 * len(mode) if mode.startswith("I;16") else 4 if mode in ("I", "F") else len(mode)
        if w * h * per_pixel > MAX_DECODED_BYTES:
            raise ImageError(
                f"{name} is {w}x{h} {mode}, {w * h * per_pixel:,} bytes decoded, over the limit of "
                f"{MAX_DECODED_BYTES:,} (hwrjax.apps.preprocess.MAX_DECODED_BYTES); downscale it or save it as JPEG"
            )


def _pil_to_grey(im: Image.Image) -> np.ndarray:
    """Converts any Pillow image to float32 grey in [0, 1]; alpha is composited (see _composite)."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float32)
        return _finite_unit(a, 65535.0 if mode != "F" and a.max(initial=0) > 255 else 255.0)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA")).astype(np.float32) / 255.0
        return _composite(_luma(rgba[..., :3]), rgba[..., 3])
    grey = np.asarray(im if mode == "L" else im.convert("L"), dtype=np.float32)  # a new array
    grey /= 255.0
    return grey


def _finite_unit(a: np.ndarray, full_scale: float) -> np.ndarray:
    """Integer or float samples to [0, 1]: non-finite samples become the median, then scaled."""
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, np.median(a[finite]) if finite.any() else 0.0)
    lo, hi = float(a.min(initial=0)), float(a.max(initial=0))
    if lo >= 0 and hi <= 1:
        return a.astype(np.float32)
    if lo >= 0 and hi <= full_scale:
        return (a / full_scale).astype(np.float32)
    return ((a - lo) / max(hi - lo, 1e-12)).astype(np.float32)


def _composite(grey: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Puts a grey layer with alpha on a backdrop that the opaque pixels stand out from.

    Dark ink drawn on a transparent canvas goes on white, light ink on black: what the
    image shows is its opaque part, whatever colour a viewer would put behind it.
    """
    alpha = np.clip(alpha, 0.0, 1.0)
    opaque = alpha > 0.5
    backdrop = 1.0
    if opaque.any() and not opaque.all():
        backdrop = 0.0 if float(np.median(grey[opaque])) > 0.5 else 1.0
    return (grey * alpha + backdrop * (1.0 - alpha)).astype(np.float32)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an (..., 3) array (same weights as Pillow's 'L')."""
    return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.float32)


def _as_grey(image: np.ndarray) -> np.ndarray:
    """Validates an array image and returns float32 grey in [0, 1]."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        if a.dtype == np.uint8:
            a = a.astype(np.float32) / 255.0
        a = a.astype(np.float32)
        luma = _luma(a[..., :3])
        a = _composite(luma, a[..., 3]) if a.shape[-1] == 4 else luma
    if a.ndim != 2:
        raise ImageError(
            f"expected a 2-D grey or (H, W, 3|4) colour image, got shape {a.shape}; "
            "use load_image to read files"
        )
    if a.size == 0:
        raise ImageError(f"image is empty (shape {a.shape}); pass an image with content")
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ImageError("image contains NaN or infinite values; clean the array first")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1:
        # Integer-valued or out-of-range floats: assume 0..255, else stretch.
        if lo >= 0 and hi <= 255:
            a = a / 255.0
        else:
            a = (a - lo) / max(hi - lo, 1e-12)
    return a


# --------------------------------------------------------------------------- segmentation


@dataclass
class _Ink:
    """Segmentation of one image at working resolution."""

    soft: np.ndarray  # float32 ink strength in [0, 1], 0 away from kept ink
    mask: np.ndarray  # bool binarized ink, specks removed
    labels: np.ndarray  # int32 connected-component labels of `mask` (8-connected)
    count: int  # number of components in `labels`
    # A clean tiny scan's ink levels on its own pixels (see _source_soft), which the layout reads
    # in place of `soft`; None for any other image.
    source: np.ndarray | None = None


def _resize(a: np.ndarray, shape: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resizes a float array to shape (rows, cols) with Pillow."""
    h, w = shape
    # frombytes of native float32 ("F"): the image fromarray makes, at a third of its per-call cost.
    im = Image.frombytes("F", (a.shape[1], a.shape[0]), a.astype(np.float32, copy=False).tobytes())
    return np.asarray(im.resize((w, h), resample), dtype=np.float32)


def _to_working_size(grey: np.ndarray) -> tuple[np.ndarray, bool]:
    """Area-downscales images over WORK_PIXELS; upsamples images under MIN_WORK_SIDE.

    Returns the working image and whether it was upsampled. Tiny scans (8x8 and up)
    are interpolated, not refused: their strokes become smooth strokes a few working
    pixels wide, which the rest of the path treats like any pen stroke. Either way the
    result has at most about WORK_PIXELS pixels.
    """
    h, w = grey.shape
    if h * w > WORK_PIXELS:
        f = (WORK_PIXELS / (h * w)) ** 0.5
        return _resize(grey, (max(1, round(h * f)), max(1, round(w * f))), Image.Resampling.BOX), False
    f = min(MIN_WORK_SIDE / min(h, w), (WORK_PIXELS / (h * w)) ** 0.5)
    if f <= 1.0:
        return grey, False
    up = (max(1, round(h * f)), max(1, round(w * f)))
    # Lanczos, not bilinear: it keeps the shape of strokes a few pixels wide (scikit-learn's 8x8
    # digits read about 2 points better with it). A clean scan's digit is read from its own
    # pixels, not from this copy (_source_soft).
    return np.clip(_resize(grey, up, Image.Resampling.LANCZOS), 0.0, 1.0), True


def _share(mask: np.ndarray) -> float:
    """np.mean(mask) of a bool array: the share of True (the same float, without np.mean's per-call cost)."""
    return np.count_nonzero(mask) / mask.size


def _ring(a: np.ndarray, width: int) -> np.ndarray:
    """The pixels of a border ring `width` wide, as one 1-D array."""
    return np.concatenate([a[:width].ravel(), a[-width:].ravel(), a[:, :width].ravel(), a[:, -width:].ravel()])


# Order statistics: the segmentation takes several quantiles of the same few arrays, so each is
# sorted once (numpy's SIMD sort) and the quantiles are read off. They equal np.percentile's
# ("linear") and np.median's bit for bit, with the same dtypes (tests/test_preprocess.py checks).


def _percentile_sorted(s: np.ndarray, q: float | tuple[float, ...]):
    """np.percentile(a, q) from s = np.sort(a, axis=None) (non-empty): a scalar for a scalar q, else a list."""
    n = s.size
    scalar = not isinstance(q, (tuple, list))
    out = []
    for p in (q,) if scalar else q:
        v = (n - 1) * (float(p) / 100.0)  # numpy's virtual index, in float64
        if v >= n - 1:
            out.append(s[-1] if scalar else np.float64(s[-1]))
            continue
        i = int(v)  # v >= 0: its floor
        a, b = s[i], s[i + 1]
        d = b - a  # in the array's dtype
        # numpy's _lerp; a scalar q's weight is a Python float (weak: it becomes the array's dtype),
        # a sequence's weights are float64.
        t = v - i if scalar else np.float64(v - i)
        out.append(b - d * (1 - t) if t >= 0.5 else a + d * t)
    return out[0] if scalar else out


def _median_sorted(s: np.ndarray):
    """np.median of a non-empty sorted 1-D array."""
    h = s.size // 2
    return s[h] if s.size % 2 else _midpoint(s[h - 1], s[h])


def _midpoint(lo: np.generic, hi: np.generic):
    """np.median's mean of the two middle values (numpy scalars of one dtype), in that dtype for floats."""
    return lo.dtype.type((lo + hi) / 2) if lo.dtype.kind == "f" else (lo + hi) / 2


def _median_abs(d: np.ndarray):
    """np.median(np.abs(d)) of a non-empty 1-D float array (d is overwritten), by a partial sort of the nonzero values.

    The zeros (flat paper: most pixel differences of a clean scan) are the lowest values, so they are only
    counted; numpy's partition is many times slower on an array that is mostly one value.
    """
    a = np.abs(d, out=d)
    h = a.size // 2
    zeros = a.size - np.count_nonzero(a)
    if zeros > h:  # both middle values are zeros
        return a.dtype.type(0)
    if zeros:
        a = a[a != 0]  # rank r of the nonzero values is rank r + zeros of all
    r = h - zeros
    part = np.partition(a, r)  # one rank: the one below it is the largest of those partition put before it
    if d.size % 2:
        return part[r]
    return _midpoint(part[:r].max() if r else a.dtype.type(0), part[r])


# Separable filters called pass by pass: the same 1-D passes, in the same order, as ndimage's
# gaussian_filter and uniform_filter, without their per-call argument handling, which costs more
# than the passes on small images; grey_opening by doubling. All equal ndimage's bit for bit
# (tests/test_preprocess.py checks).


@functools.lru_cache(maxsize=64)
def _gaussian_weights(sigma: float) -> np.ndarray:
    """The kernel ndimage.gaussian_filter(sigma, truncate=4) correlates with."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    w = np.ascontiguousarray((phi / phi.sum())[::-1])  # contiguous: correlate1d would copy a reversed view
    w.flags.writeable = False  # shared by every call
    return w


def _gaussian(a: np.ndarray, sigma: float) -> np.ndarray:
    """ndimage.gaussian_filter(a, sigma) (mode "reflect") of a 2-D float array."""
    w = _gaussian_weights(float(sigma))
    # An output array given: ndimage makes none itself, which costs more than the pass on a small image.
    out = ndimage.correlate1d(a, w, axis=0, output=np.empty_like(a), mode="reflect")
    return ndimage.correlate1d(out, w, axis=1, output=out, mode="reflect")


def _box(a: np.ndarray, size: int, mode: str) -> np.ndarray:
    """ndimage.uniform_filter(a, size, mode=mode) of a 2-D float array."""
    if size <= 1:
        return a.copy()
    out = ndimage.uniform_filter1d(a, size, axis=0, output=np.empty_like(a), mode=mode)
    return ndimage.uniform_filter1d(out, size, axis=1, output=out, mode=mode)


def _running(a: np.ndarray, size: int, origin: int, fn: np.ufunc) -> np.ndarray:
    """ndimage.minimum_filter1d / maximum_filter1d(a, size, axis=0, mode="reflect", origin) for fn =
    np.minimum / np.maximum, by doubling: log2(size) elementwise passes over whole rows instead of a
    window per pixel (the extremes are the same values: exact). Needs size // 2 <= len(a)."""
    n = a.shape[0]
    lo = size // 2 + origin  # rows taken before each row (reflected at the start), the rest after it
    hi = size - 1 - lo
    p = np.concatenate([a[:lo][::-1], a, a[n - hi :][::-1]]) if lo or hi else a
    k = 1
    while 2 * k <= size:  # p[i] becomes the extreme of 2k consecutive rows from i
        p = fn(p[:-k], p[k:])
        k *= 2
    return fn(p[:n], p[size - k : size - k + n])


def _opening(a: np.ndarray, size: int) -> np.ndarray:
    """ndimage.grey_opening(a, size=(size, size), mode="reflect") of a 2-D array."""
    if size // 2 > min(a.shape):  # a window past a whole reflected copy: ndimage's own extension
        return ndimage.grey_opening(a, size=(size, size), mode="reflect")
    origin = 0 if size & 1 else -1  # grey_dilation mirrors the window of an even size
    # Minimum over the square, then maximum over it: each separable, each in any order of the axes.
    t = np.ascontiguousarray(_running(a, size, 0, np.minimum).T)
    t = _running(_running(t, size, 0, np.minimum), size, origin, np.maximum)
    return _running(np.ascontiguousarray(t.T), size, origin, np.maximum)


def _dilate3(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """ndimage.binary_dilation(mask, np.ones((3, 3)), iterations) (outside the image is False)."""
    # k iterations of the 3x3 square are one pass of the (2k + 1)-square: rows, then columns.
    rows = mask.copy()
    for k in range(1, iterations + 1):
        rows[k:] |= mask[:-k]
        rows[:-k] |= mask[k:]
    out = rows.copy()
    for k in range(1, iterations + 1):
        out[:, k:] |= rows[:, :-k]
        out[:, :-k] |= rows[:, k:]
    return out


def _erode3(mask: np.ndarray) -> np.ndarray:
    """ndimage.binary_erosion(mask, np.ones((3, 3)), border_value=0): pixels whose 3x3 block is all set."""
    p = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), bool)
    p[1:-1, 1:-1] = mask
    rows = p[:-2] & p[1:-1] & p[2:]
    return rows[:, :-2] & rows[:, 1:-1] & rows[:, 2:]


def _ink_is_light(grey: np.ndarray, small: bool = False) -> bool:
    """True for light ink on dark paper (MNIST polarity), False for dark ink on light.

    The paper is what most of the border ring shows: a photo's margin, or the background
    around a digit that touches the frame in a few places. Then the ink is the side
    (darker or lighter) with the larger extreme deviation from that paper. When much of
    the ring lies past the middle between paper and ink (a tight crop whose strokes run
    along its edges) the ring cannot tell, unless one edge is a solid line and the three
    others show the paper; else the ink is the side cut into fewer pieces, or covering less
    of the image; in a `small` scan (upsampled, under _SQUAT times as long as it is wide) where
    the two disagree, the side that lies flat at its end of the scale, as blank paper does, is
    the paper.
    """
    h, w = grey.shape
    smooth = _gaussian(grey, 1.0) if min(h, w) >= 8 else grey
    bw = max(1, round(0.04 * min(h, w)))
    ring = _ring(smooth, bw)
    paper = float(_median_sorted(np.sort(ring)))
    lo, hi = _percentile_sorted(np.sort(smooth, axis=None), (0.5, 99.5))
    darker, lighter = paper - float(lo), float(hi) - paper
    light = lighter > darker
    middle = paper + 0.5 * (lighter if light else -darker)
    inky_ring = _share(ring > middle if light else ring < middle)
    if inky_ring > _MIXED_RING and hi - lo > _MIN_CONTRAST:
        # One edge a solid line of one level (the line a digit is written on, the bar of a tight
        # "7"): the paper is what the three others show, if they show little else.
        edges = (smooth[:bw], smooth[-bw:], smooth[:, :bw], smooth[:, -bw:])
        solid = [_share(e > middle if light else e < middle) >= _FRAME_FULL for e in edges]
        if sum(solid) == 1:
            rest = np.sort(np.concatenate([e.ravel() for e, s in zip(edges, solid) if not s]))
            paper = float(_median_sorted(rest))
            light = float(hi) - paper > paper - float(lo)
            middle = paper + 0.5 * ((float(hi) - paper) if light else (float(lo) - paper))
            if _share(rest > middle if light else rest < middle) <= _MIXED_RING:
                return light
        bright = smooth > 0.5 * (float(lo) + float(hi))
        # A digit's ink is one or two strokes; the paper is cut into pieces by them (the
        # hole of a 0, the corners around a 1). Fewer pieces, else less area, is the ink.
        pieces = [_count_regions(bright), _count_regions(~bright)]
        less = _share(bright) < 0.5
        if pieces[0] == pieces[1]:
            return less
        fewer = pieces[0] < pieces[1]
        if small and fewer != less:
            # In a scan of 8 px (or one enlarged from it) a stroke is a pixel wide and breaks
            # where it crosses pixels at a slant, so the count of pieces misleads; the paper a
            # digital scan leaves blank lies flat at one end of the scale, where a stroke's
            # levels vary. Not in a narrow crop, where a "1" may fill most of it and its
            # saturated core lies flat too.
            flat = _flat_end(grey)
            if flat is not None:
                return flat
        return fewer
    return light


def _flat_end(a: np.ndarray) -> bool | None:
    """True if a quarter or more of the image lies flat at its dark end and the bright end holds a
    quarter as many pixels or fewer (the paper is dark: light ink); False for the reverse; else None."""
    lo, hi = float(a.min()), float(a.max())
    tol = _FLAT_TOLERANCE * (hi - lo)
    dark, bright = _share(a <= lo + tol), _share(a >= hi - tol)
    if dark >= _FLAT_PAPER and bright <= _FLAT_OTHER * dark:
        return True
    if bright >= _FLAT_PAPER and dark <= _FLAT_OTHER * bright:
        return False
    return None


def _count_regions(mask: np.ndarray) -> int:
    """Connected regions (8-connected) of a mask covering at least 1% of the image each."""
    labels, count = ndimage.label(mask, structure=_EIGHT)
    if count == 0:
        return 0
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return int(np.sum(areas >= 0.01 * mask.size))


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-12:
        return hi
    width = (hi - lo) / bins
    idx = ((values - lo) / width).astype(np.int64)
    np.minimum(idx, bins - 1, out=idx)
    hist = np.bincount(idx, minlength=bins)  # np.histogram's result, several times faster
    centres = lo + (np.arange(bins) + 0.5) * width
    p = hist / hist.sum()
    w0 = p.cumsum()
    m0 = (p * centres).cumsum()
    mt = m0[-1]
    # A split after bin k for k below the last: the minimum lies in the first bin and the maximum in the
    # last, so both classes hold samples (0 < w0 < 1) and no quotient is 0/0 or infinite.
    w0, m0 = w0[:-1], m0[:-1]
    between = (mt * w0 - m0) ** 2 / (w0 * (1.0 - w0))
    return lo + (int(between.argmax()) + 1) * width


def _centred(a: np.ndarray) -> tuple[np.ndarray, float]:
    """`a` (float64) less its mean, and its variance."""
    # np.mean's results, bit for bit, without its per-call cost: the sum in the array's dtype over the
    # count, rounded back to that dtype.
    d = a.astype(np.float64) - float(a.dtype.type(float(a.sum()) / a.size))
    return d, float((d * d).sum()) / d.size


def _neighbour_correlation(a: np.ndarray, centred: tuple[np.ndarray, float] | None = None) -> float:
    """Correlation of horizontally and vertically adjacent pixels (1 for a flat image).

    `centred` is `_centred(a)`, when the caller has it already."""
    d, var = centred or _centred(a)
    if var < 1e-12 or min(a.shape) < 2:
        return 1.0
    # The larger of the two: a thin vertical "1" is unrelated across its 3 px, not along them.
    across, along = d[1:] * d[:-1], d[:, 1:] * d[:, :-1]
    return max(float(across.sum()) / across.size, float(along.sum()) / along.size) / var


def _alternation(a: np.ndarray, centred: tuple[np.ndarray, float] | None = None) -> float:
    """How strongly pixels two apart are opposed: minus their mean correlation down and across.

    A digit drawn with strokes one pixel wide (an "8" in 8x5 px: stroke, paper, stroke) has
    neighbours as unrelated as noise's, but a stroke two pixels on is paper and the next is
    stroke again; noise's pixels are as unrelated two apart as one apart. 0 for a flat image
    or one under 3 px on a side. `centred` is `_centred(a)`, when the caller has it already.
    """
    d, var = centred or _centred(a)
    if var < 1e-12 or min(a.shape) < 3:
        return 0.0
    down, across = d[2:] * d[:-2], d[:, 2:] * d[:, :-2]
    return -0.5 * (float(down.sum()) / down.size + float(across.sum()) / across.size) / var


def _looks_like_noise(a: np.ndarray) -> bool:
    """Whether a small image's pixels are as unrelated as noise's, one apart and two apart."""
    centred = _centred(a)
    near = _neighbour_correlation(a, centred)
    if near >= _MIN_CORRELATION:
        return False
    apart = _alternation(a, centred)
    return apart < _MIN_ALTERNATION and near + apart < _MIN_STRUCTURE


def _on_paper(a: np.ndarray, pad: int, paper: float) -> np.ndarray:
    """`a` inside a margin of `pad` pixels of `paper` on every side (np.pad's result, without its overhead)."""
    out = np.full((a.shape[0] + 2 * pad, a.shape[1] + 2 * pad), paper, a.dtype)
    out[pad:-pad, pad:-pad] = a
    return out


def _add_margin(ink_pos: np.ndarray) -> np.ndarray:
    """Gives a tight crop (ink touching the frame) a margin of paper, as a photo has.

    Without it the border shows no paper, and background removal takes the strokes along
    the edges for background. Ink touches the frame when pixels of the outer ring stand
    out from their surroundings (a high-pass copy, so that a lighting gradient does not
    count) by more than half the image's ink contrast, and that contrast is well above
    the noise. Other images are returned as they are.
    """
    h, w = ink_pos.shape
    size = max(3, min(h, w) // 4)
    local = ink_pos - _box(_box(ink_pos, size, "nearest"), size, "nearest")  # ~triangular smoothing, O(1) a pixel
    lo, hi = _percentile_sorted(np.sort(local, axis=None), (5, 99.5))
    if hi - lo < _MIN_CONTRAST or _share(_ring(local, 1) > 0.5 * (float(lo) + float(hi))) <= 0.01:
        return ink_pos
    if hi - lo < 8.0 * _noise(ink_pos, 0.0):  # asked last: it costs the most
        return ink_pos
    ordered = np.sort(ink_pos, axis=None)
    middle = 0.5 * (float(_percentile_sorted(ordered, 5)) + float(_percentile_sorted(ordered, 99.5)))
    paper = float(_median_sorted(ordered[: np.count_nonzero(ordered <= middle)]))  # never empty
    # Relative to the longer side, but at most 4x the shorter one: a 2x5000 line must not
    # grow a margin of thousands of pixels on every side.
    pad = round(_MARGIN * min(max(h, w), 4 * min(h, w))) + 2
    return _on_paper(ink_pos, pad, paper)


def _line_bands(mask: np.ndarray, axis: int, box: tuple[int, int, int, int]) -> list[tuple[int, int, str]]:
    """Thin bands of rows (axis 0) or columns (axis 1) that a straight line crosses end to end.

    A band's rows are covered over at least _LINE_COVER of the ink's extent along them
    (runs up to 3 rows apart are one band), it is at most _LINE_THIN of the extent across
    them thick, and it is the outermost ink on its side: where a printed box's lines are,
    not a digit's bar through its middle or the dense core of a slanted stroke. Each band is (start, stop, side),
    side "low" or "high". `box` is `_bbox(mask)` (never None).
    """
    m, (r0, r1, c0, c1) = (mask, box) if axis == 0 else (mask.T, (box[2], box[3], box[0], box[1]))
    along, across = c1 - c0, r1 - r0
    if along < 8 or across < 8:
        return []
    cover = m[r0:r1, c0:c1].sum(axis=1) / along
    rows = (cover >= _LINE_COVER).nonzero()[0]
    bands = []
    for run in np.split(rows, np.flatnonzero(np.diff(rows) > 3) + 1) if rows.size else []:
        lo, hi = int(run[0]), int(run[-1]) + 1  # relative to r0
        thick = hi - lo
        if thick > max(2, _LINE_THIN * across):
            continue
        # A printed line is the outermost ink on its side (the dense core of a slanted pen
        # stroke has the rest of that stroke beyond it).
        if lo <= 2 and lo < _LINE_EDGE * across:
            bands.append((r0 + lo, r0 + hi, "low"))
        elif across - hi <= 2 and hi > (1 - _LINE_EDGE) * across:
            bands.append((r0 + lo, r0 + hi, "high"))
    return bands


def _form_lines(mask: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray | None:
    """Pixels of printed form lines (a box around the digit, or a line under it) to drop, or None.

    Lines at two or more edges (a box, a corner, lines above and below) are removed; a
    line at one edge only when no stroke touches it (an underline below the digit),
    because a tight crop of a "7" or a "2" has one bar running from edge to edge that is
    part of the digit. `box` is `_bbox(mask)`; None stands for no line pixel at all.
    """
    bands = [(axis, band) for axis in (0, 1) for band in _line_bands(mask, axis, box)]
    if not bands:
        return None
    lines = np.zeros(mask.shape, bool)
    edges = set()
    for axis, (lo, hi, side) in bands:
        edges.add((axis, side))
        if axis == 0:
            lines[max(0, lo - 1) : hi + 1] |= mask[max(0, lo - 1) : hi + 1]
        else:
            lines[:, max(0, lo - 1) : hi + 1] |= mask[:, max(0, lo - 1) : hi + 1]
    if len(edges) == 1:
        grown = _dilate3(lines, 2)
        if (grown & mask & ~lines).any():
            return None
    return lines


def _noise(a: np.ndarray, sigma: float) -> float:
    """Robust noise sigma from differences of pixels 2 sigma + 1 apart (past a blur's reach).

    Their median absolute value ignores edges between ink and paper as long as most pixel
    pairs lie inside one of them, so it does not depend on how much of the image is ink.
    """
    k = math.ceil(2.0 * sigma) + 1
    diffs = np.concatenate([(a[k:] - a[:-k]).ravel(), (a[:, k:] - a[:, :-k]).ravel()])
    if diffs.size == 0:
        return 0.0
    return 1.4826 * float(_median_abs(diffs)) / _SQRT2


def _paper_level_and_noise(strength: np.ndarray, ordered: np.ndarray, t: float, sigma: float) -> tuple[float, float]:
    """The paper's level (median of the darker Otsu class, below `t`) and its noise (robust sigma).

    `ordered` is `strength` sorted. Neither may depend on how much of the image is ink: a bold
    digit in a tight box can cover half of it.
    """
    below = ordered[: np.count_nonzero(ordered <= t)]
    return float(_median_sorted(below if below.size else ordered)), _noise(strength, sigma)


def _frame_depth(cls: np.ndarray, depth: int) -> int:
    """How many lines from the edge (rows of `cls`, at most `depth`) are each _FRAME_FULL of the class."""
    full = cls[:depth].mean(axis=1) >= _FRAME_FULL
    return depth if full.all() else int(full.argmin())


def _frame_side(cls: np.ndarray, depth: int) -> tuple[int, int, bool]:
    """One side of a possible frame (its rows from the edge inward): how many lines are of the class
    (0 when more than `depth` are: a margin, not a line); how many after them are of the other
    class across the middle (a gap); and whether the class comes back across the middle after
    that gap (the pattern of a paper margin around a printed box's line)."""
    a = _frame_depth(cls, depth + 1)
    if a > depth:  # wider than a line: a margin
        return 0, 0, False
    middle = cls[:, depth : cls.shape[1] - depth]  # clear of the lines along the other sides
    if a == 0 or a >= cls.shape[0] or middle.shape[1] == 0:
        return a, 0, False
    b = _frame_depth(~middle[a:], depth)
    if b == 0 or a + b >= cls.shape[0]:
        return a, b, False
    return a, b, bool(middle[a + b].mean() >= _FRAME_FULL)


def _strip_frame(grey: np.ndarray) -> np.ndarray:
    """The inside of a box that the image's edges are lines of: a form's cell cropped on its lines.

    The edge then shows no paper, only lines of ink's colour, and the polarity, the margin and
    the background all take the line for the paper. A frame is a run of thin lines from the edge
    inward, each nearly all of one class (Otsu's), with mostly the other class inside it and
    along its inner edge: on three or four sides; on two (an L, a comb field's separators) with
    the open edges showing the other class and one line clear of the digit; or on one (the line
    the digit is written on) with the three other edges showing nothing else. A digit's own
    stroke along an edge (the bar of a tight "7") touches the rest of the digit and its other
    edges; a paper margin around a printed box has the box's line after it, and paper again.
    Other images are returned as they are.
    """
    h, w = grey.shape
    if min(h, w) < 8:
        return grey
    lo, hi = float(grey.min()), float(grey.max())
    if hi - lo < _MIN_CONTRAST:
        return grey
    # Cheap first: an edge is flat (a line, or paper).
    levels = []
    for edge in (grey[0], grey[-1], grey[:, 0], grey[:, -1]):
        p10, p50, p90 = _percentile_sorted(np.sort(edge), (10, 50, 90))
        if p90 - p10 < 0.25 * (hi - lo):
            levels.append(float(p50))
    if not levels:
        return grey
    levels.sort()  # the darker class is tried first
    step = max(1, max(h, w) // 64)
    threshold = _otsu(grey[::step, ::step].ravel())
    depth = max(1, round(_FRAME_DEPTH * min(h, w)))
    # Lines may be dark while the open edges show light paper, or the other way round: the class of
    # each flat edge is tried as the lines'.
    for bright in dict.fromkeys(level > threshold for level in levels):
        box = _frame_box(grey > threshold if bright else grey <= threshold, depth)
        if box is not None:
            t, b, l, r = box
            return grey[t : h - b, l : w - r]
    return grey


def _frame_box(cls: np.ndarray, depth: int) -> tuple[int, int, int, int] | None:
    """How many lines of `cls` frame the image at its top, bottom, left and right (_strip_frame), or
    None when they make no frame."""
    h, w = cls.shape
    oriented = (cls, cls[::-1], cls.T, cls.T[::-1])
    sides = [_frame_side(c, depth) for c in oriented]
    t, b, l, r = (d for d, _, _ in sides)
    lined = sum(d > 0 for d in (t, b, l, r))
    # Lines of the edge's class, then of the other, then the edge's class again across the middle:
    # a margin of paper around a printed box (left to _form_lines), not a frame.
    if lined == 0 or sum(m for _, _, m in sides) >= 2:
        return None
    # The share of the class along each edge without a line, clear of the lines' ends.
    open_edges = [_share(c[0, depth:-depth]) for (d, _, _), c in zip(sides, oriented) if d == 0]
    if lined == 1 and max(open_edges) > _OPEN_EDGE:
        # One line (the one a digit is written on): the other three edges show paper only. A
        # tight crop's ink reaches every edge: the base of a "2" or the bar of a "7" lies along
        # one, and the rest of the digit reaches the others.
        return None
    if lined == 2 and (max(open_edges) >= _OPEN_EDGES or not any(gap > 0 for d, gap, _ in sides if d > 0)):
        # Two lines only (an L, or a comb field's separators left and right): the open edges show
        # mostly the other class (the paper), and one line at least is clear of the digit by a gap
        # of it (the digit may touch the other). A tight "7" has its bar and stroke at a corner
        # with no gap, a tight "1" ink across its ends.
        return None
    inner = cls[t : h - b, l : w - r]
    if min(inner.shape) < 4 or _share(_ring(inner, 1)) >= 0.5 or _share(inner) >= 0.5:
        return None
    return t, b, l, r


def _stretch_faint(grey: np.ndarray, g: np.ndarray, upsampled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Stretches a faint digital image to the full range: (grey, g), the source and its working copy.

    Digits stored without scaling their levels (scikit-learn's 0..16 arrays, a bitmap of 0s and 1s
    saved as 8-bit grey, 12-bit data in a 16-bit file) span a sliver of the full scale, and their
    ink contrast falls short of the faintest a photo may show (_MIN_CONTRAST). Such an image is
    known by its paper: one exact value at an end of its range on many pixels, which a camera's
    noise never gives. Stretched to [0, 1], it is judged by its noise like any other image. A
    faint photo, whose paper level lies among its noise, keeps its levels and the contrast floor.
    """
    a = grey if upsampled else g  # the smaller one: the statistics cost at most WORK_PIXELS
    lo, hi = float(a.min()), float(a.max())
    span = hi - lo
    if not _MIN_SPAN <= span < _FAINT_SPAN:
        return grey, g
    values, counts = np.unique(a, return_counts=True)
    paper = int(counts.argmax())
    if paper not in (0, values.size - 1) or counts[paper] < _FLAT_PAPER * a.size:
        return grey, g
    return (grey - lo) / span, np.clip((g - lo) / span, 0.0, 1.0)


def _narrow(grey: np.ndarray) -> bool:
    """A small crop at least 4x as long as it is wide (at most 8 working sides long, under one wide)."""
    short, long = sorted(grey.shape)
    return 4 * short <= long <= 8 * MIN_WORK_SIDE and short < MIN_WORK_SIDE


def _strip_on_paper(grey: np.ndarray, narrow: bool = False) -> tuple[np.ndarray, bool] | None:
    """A strip of stroke put on paper, and whether its ink is light; else None.

    A scan 2 px across and 8-32 px long (a tight "1" from an 8 px scan), or with `narrow` any
    crop 4x as long as it is wide (the same "1" enlarged), is one stroke along its length that
    fills it from side to side: the ring that shows the paper around any other digit is all
    stroke, and the background found under it is the stroke itself. The ink is the level most
    of it holds (the side of the middle of its range that its median lies on), and the paper,
    which no pixel shows, is the end of the scale on the other side, as a digital scan leaves it.
    A flat strip stays refused (no contrast), and a 1 px line or a long one is no tiny digit.
    """
    short, long = sorted(grey.shape)
    lo, hi = float(grey.min()), float(grey.max())
    if narrow:
        if not _narrow(grey):
            return None
    elif short != 2 or not _STRIP[0] <= long <= _STRIP[1]:
        return None
    if hi - lo < _MIN_CONTRAST:
        return None
    light = float(np.median(grey)) > 0.5 * (lo + hi)
    return _on_paper(grey, long // 4, 0.0 if light else 1.0), light


def _segment(grey: np.ndarray, narrow: bool = False) -> _Ink:
    """Finds the ink: polarity, margin, background removal, Otsu, form lines, specks, soft levels.

    `narrow`: a small crop 4x as long as it is wide is taken for a stroke that fills it
    (_strip_on_paper), as when it was refused for showing no ink.
    """
    g, upsampled = _to_working_size(grey)
    if grey.size > _REPLICATION_PIXELS:  # not looked at by _source_pixels: at working size here
        g = _strip_frame(g)
    grey, g = _stretch_faint(grey, g, upsampled)
    if upsampled and _looks_like_noise(grey):
        raise NoInkError(
            "no digit found: the image looks like noise (neighbouring pixels are unrelated); "
            "pass an image of a handwritten digit"
        )
    strip = _strip_on_paper(grey, narrow) if upsampled else None
    if strip is None:
        light = _ink_is_light(g, small=upsampled and max(grey.shape) < _SQUAT * min(grey.shape))
    else:
        grey, light = strip
        g, _ = _to_working_size(grey)
    ink_pos = g if light else 1.0 - g  # ink high, paper low
    ink_pos = _add_margin(ink_pos)
    pad = (ink_pos.shape[0] - g.shape[0]) // 2  # the margin added on every side, 0 for none
    h, w = ink_pos.shape
    short = min(h, w)

    sigma = max(1.0, short / 150.0) if short >= 8 else 0.0
    smooth = _gaussian(ink_pos, sigma) if sigma else ink_pos
    win = max(3, short // 2)
    background = _opening(smooth, win)
    for _ in range(2):  # ~triangular smoothing, O(1) per pixel whatever the window
        background = _box(background, max(1, win // 2), "nearest")
    raw = ink_pos - background
    strength = smooth - background

    ordered = np.sort(strength, axis=None)
    otsu = _otsu(ordered)
    med, noise = _paper_level_and_noise(strength, ordered, otsu, sigma)
    if float(ordered[-1]) - med < _MIN_CONTRAST:
        raise NoInkError(
            "no ink found: the image is blank or the strokes are too faint; "
            "photograph darker, thicker strokes under even light"
        )
    threshold = max(otsu, med + 4.0 * noise)
    mask = strength > threshold
    above = ordered[np.count_nonzero(ordered <= threshold) :]  # the values of strength[mask], sorted
    contrast = float(_percentile_sorted(above, 90)) - med if above.size else 0.0
    if contrast < max(_MIN_CONTRAST, _NOISE_SIGMAS * noise):
        raise NoInkError(
            f"no ink found: best ink contrast {contrast:.3f} is too low against paper noise "
            f"{noise:.3f}; photograph darker, thicker strokes under even light"
        )

    lines = _form_lines(mask, _bbox(mask))  # the box is never None: the contrast above needs ink
    if lines is not None:
        mask &= ~lines
        if not mask.any():
            raise NoInkError("only the lines of a form were found, no digit; crop the image to the digit")
    labels, count = ndimage.label(mask, structure=_EIGHT)
    if count > _MAX_COMPONENTS:
        raise NoInkError(
            f"no digit found: {count} separate marks, like noise or texture; "
            "pass an image of handwritten digits"
        )
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    areas[0] = 0
    largest = float(areas.max())
    min_area = min(largest, max(2.0, _SPECK_FRACTION * largest, (short / 100.0) ** 2))
    keep = areas >= min_area
    keep[0] = False
    if not keep[1:].all():  # else the mask and its labels stay as they are
        mask = keep[labels]
        labels, count = ndimage.label(mask, structure=_EIGHT)
    r0, r1, c0, c1 = _bbox(mask)
    if max(r1 - r0, c1 - c0) < max(_MIN_INK_PX, _MIN_INK_FRACTION * short):
        raise NoInkError(
            f"the only ink found is a {r1 - r0}x{c1 - c0} px dot in a {h}x{w} image "
            "(after downscaling); crop the image closer to the digit"
        )

    inked = np.sort(raw[mask])
    level = float(_percentile_sorted(inked, 90))
    reach = max(1, round(short / 100.0))
    # A clean scan (upsampled, paper noise under _CLEAN_NOISE of the contrast) is read from its own
    # pixels (_source_soft). Its working levels serve split_digits, and lose less of their faint
    # edges (half the usual floor): its strokes are only a few source pixels wide, and cutting the
    # full floor thins them.
    clean = upsampled and noise <= _CLEAN_NOISE * (level - med)
    cut = _CLEAN_FLOOR if clean else _SOFT_FLOOR
    floor = max(med + 2.0 * noise, med + cut * (level - med))
    gate = _dilate3(mask, reach)
    if lines is not None:
        gate &= ~_dilate3(lines, reach)
    soft = np.clip((raw - floor) / max(level - floor, 1e-6), 0.0, 1.0)
    soft[~gate] = 0.0
    source = None
    if clean:  # its paper's noise above the paper's level is no ink
        source = _source_soft(grey if light else 1.0 - grey, background, gate, lines, pad, med + 2.0 * noise, level)
    return _Ink(soft=soft.astype(np.float32, copy=False), mask=mask, labels=labels.astype(np.int32, copy=False),
                count=int(count), source=source)


def _source_soft(source: np.ndarray, background: np.ndarray, gate: np.ndarray, lines: np.ndarray | None,
                 pad: int, paper: float, level: float) -> np.ndarray | None:
    """A clean tiny scan's ink on its own pixels: 0 at the `paper` level, 1 at the ink's; None if none.

    `source` is the scan (ink high) before upsampling; `background`, `gate` (where kept ink may
    lie: the digit, without specks or form lines) and `lines` (a form's, or None) are at working
    size with a margin of `pad` pixels on every side. Each level of such a scan is the share of
    its pixel that the pen covered. Interpolated up, cut at a floor and scaled back down, a
    stroke one or two pixels wide loses its faint pixels: the digit comes out thinner, and its
    box, short of part of a pixel on each side (an eighth of an 8 px digit), makes it too large.
    Read here as the classic normalization reads it (every level above the paper; the box of
    every inked pixel), 8 px digits read as well as normalized by hand: MNIST test digits at
    8 px 98.8 -> 99.1%, scikit-learn's digits 98.11 -> 98.27% (the headline ResNet;
    benchmarks/read_forms.py).
    """
    h, w = source.shape
    rows, cols = background.shape
    inner = (slice(pad, rows - pad), slice(pad, cols - pad))

    def reduced(a: np.ndarray) -> np.ndarray:  # a working-size array on the scan's pixels
        return _resize(a[inner].astype(np.float32, copy=False), (h, w), Image.Resampling.BOX)

    near = reduced(gate) > 0
    # A faint pixel beside a kept one is the edge of its stroke, unless a form's line lies there.
    grown = _dilate3(near)
    if lines is not None:
        grown &= ~(reduced(lines) > 0)
    near |= grown
    soft = np.clip((source - reduced(background) - paper) / max(level - paper, 1e-6), 0.0, 1.0)
    soft[~near] = 0.0
    return soft.astype(np.float32, copy=False) if float(soft.max()) > _BBOX_EPS else None


# --------------------------------------------------------------------------- MNIST layout


def _bbox(a: np.ndarray) -> tuple[int, int, int, int] | None:
    """(row0, row1, col0, col1), end-exclusive, of the nonzero/True region, or None."""
    rows = a.any(axis=1)
    r0 = int(rows.argmax())  # the first True (argmax of flags, without flatnonzero's per-call cost)
    if not rows[r0]:
        return None
    cols = a.any(axis=0)
    return r0, rows.size - int(rows[::-1].argmax()), int(cols.argmax()), cols.size - int(cols[::-1].argmax())


def _centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    """ndimage.center_of_mass(a) of a 2-D float array, bit for bit (the same sums in the same order)."""
    total = a.sum()
    rows = np.arange(a.shape[0], dtype=np.float64)[:, None]
    cols = np.arange(a.shape[1], dtype=np.float64)[None, :]
    return float((a * rows).sum() / total), float((a * cols).sum() / total)


def _stroke_width(mask: np.ndarray) -> float:
    """Rough stroke width in px: area / half the boundary length."""
    area = np.count_nonzero(mask)
    if area == 0:
        return 0.0
    boundary = area - int(np.count_nonzero(_erode3(mask)))
    return area / max(boundary / 2.0, 1.0)


def _layout(soft: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Crops the ink, scales its longer side to 20 px and centres it by mass in 28x28."""
    box = _bbox(soft > _BBOX_EPS)
    if box is None:
        raise NoInkError(
            "no ink found after cleaning; photograph darker, thicker strokes under even light"
        )
    r0, r1, c0, c1 = box
    scale = MNIST_BOX / max(r1 - r0, c1 - c0)

    width_out = _stroke_width(mask) * scale
    if 0 < width_out < _MIN_STROKE:
        # Thin pen on a big digit: thicken so the 20 px digit has MNIST-like strokes. This runs
        # on the crop reduced to at most 4x the box, so its cost is bounded whatever the image.
        crop = soft[r0:r1, c0:c1]
        f = min(1.0, 4 * MNIST_BOX / max(r1 - r0, c1 - c0))
        if f < 1.0:
            small = (max(1, round((r1 - r0) * f)), max(1, round((c1 - c0) * f)))
            crop = _resize(crop, small, Image.Resampling.BOX)
            inked = crop[crop > _BBOX_EPS * f]
            crop = np.clip(crop / max(float(np.percentile(inked, 90)) if inked.size else 1.0, 1e-6), 0, 1)
        scale = MNIST_BOX / max(crop.shape)
        radius = min((_TARGET_STROKE - width_out) / (2.0 * scale), _MAX_THICKEN)
        rad = int(np.ceil(radius))
        yy, xx = np.mgrid[-rad : rad + 1, -rad : rad + 1]
        disk = (yy**2 + xx**2) <= radius**2 + 0.25
        soft = ndimage.grey_dilation(np.pad(crop, rad + 1), footprint=disk)
        r0, r1, c0, c1 = _bbox(soft > _BBOX_EPS)
        scale = MNIST_BOX / max(r1 - r0, c1 - c0)

    crop = np.where(soft[r0:r1, c0:c1] > _BBOX_EPS, soft[r0:r1, c0:c1], 0.0)
    h, w = crop.shape
    out_h = min(MNIST_BOX, max(1, round(h * scale)))
    out_w = min(MNIST_BOX, max(1, round(w * scale)))
    if (out_h, out_w) != (h, w):
        crop = np.clip(_resize(crop, (out_h, out_w), Image.Resampling.LANCZOS), 0.0, 1.0)

    canvas = np.zeros((2 * MNIST_SIZE, 2 * MNIST_SIZE), np.float32)
    top = (canvas.shape[0] - out_h) // 2
    left = (canvas.shape[1] - out_w) // 2
    canvas[top : top + out_h, left : left + out_w] = crop
    if canvas.sum() <= 0:
        raise NoInkError("no ink left after scaling; the digit strokes are too faint or thin")
    cy, cx = _centre_of_mass(canvas)
    y0 = int(round(cy)) - _CENTRE
    x0 = int(round(cx)) - _CENTRE
    return np.ascontiguousarray(canvas[y0 : y0 + MNIST_SIZE, x0 : x0 + MNIST_SIZE])


def _on_lattice(cuts: np.ndarray, size: int, n: int) -> bool:
    """Whether every cut (a line that differs from the one before) is where n native lines enlarged
    to `size` with hard pixels change: within half a pixel of each multiple of the factor k = size / n
    when each pixel takes the native line under its centre (Pillow, scikit-image), within the pixel
    after it when it takes the one under its top edge (OpenCV). A whole factor leaves no slack."""
    d = cuts - np.round(cuts * n / size) * (size / n)  # from the nearest native boundary, in pixels
    return bool(np.all(np.abs(d) <= 0.5 + 1e-9) or np.all((d >= -1e-9) & (d < 1.0 - 1e-9)))


def _native_pixels(grey: np.ndarray) -> np.ndarray:
    """Undoes nearest-neighbour enlargement, by any factor from 2 to 16, whole or not (8 -> 28 px).

    A tiny scan blown up with hard pixels keeps its staircase edges through any smooth
    resampling; read at its native size it is upsampled smoothly like any tiny scan. An
    image is taken for an enlargement only when every place its rows and columns change
    lies on the lattice of one factor, the same along both axes (its aspect is kept).
    """
    h, w = grey.shape
    if min(h, w) < 4:
        return grey
    rows = np.flatnonzero((grey[1:] != grey[:-1]).any(axis=1)) + 1
    if 2 * (rows.size + 1) > h:  # a photo: nearly every row differs from the one above
        return grey
    cols = np.flatnonzero((grey[:, 1:] != grey[:, :-1]).any(axis=0)) + 1
    if 2 * (cols.size + 1) > w:
        return grey
    for n in range(max(rows.size + 1, math.ceil(h / 16)), h // 2 + 1):  # fewest native rows first
        m = round(w * n / h)  # native columns at the same factor
        if not (cols.size + 1 <= m <= w // 2 and abs(h / n - w / m) <= 0.01 * h / n):
            continue
        if (h % n or w % m) and h / n < 2.5:  # a lattice finer than that would fit chance edges
            continue
        if _on_lattice(rows, h, n) and _on_lattice(cols, w, m):
            # The centre of each native pixel's block, inside it whichever rounding made it.
            return np.ascontiguousarray(grey[((np.arange(n) + 0.5) * h / n).astype(np.intp)]
                                        [:, ((np.arange(m) + 0.5) * w / m).astype(np.intp)])
    return grey


def _source_pixels(grey: np.ndarray) -> np.ndarray:
    """The pixels the digit was written in: a frame of box lines cut off (_strip_frame), then a
    hard-pixel enlargement undone (_native_pixels), for images up to _REPLICATION_PIXELS."""
    if grey.size > _REPLICATION_PIXELS:
        return grey
    return _native_pixels(_strip_frame(grey))


def is_mnist_form(grey: np.ndarray) -> bool:
    """True for a grey image in [0, 1] already in MNIST's form: 28x28, light ink on black, ink box ~20 px,
    centred by mass (every digit of MNIST's test set is)."""
    if grey.shape != (MNIST_SIZE, MNIST_SIZE) or float(_ring(grey, 2).mean()) > 0.05:
        return False
    box = _bbox(grey > 0.1)
    if box is None or not 18 <= max(box[1] - box[0], box[3] - box[2]) <= 22:
        return False
    cy, cx = _centre_of_mass(grey)
    return abs(cy - _CENTRE) <= 1.5 and abs(cx - _CENTRE) <= 1.5


def to_mnist(image: np.ndarray) -> np.ndarray:
    """Converts a grey/RGB image of one digit (any polarity) to a 28x28 float32 MNIST digit.

    An image that already has MNIST's form (a 28x28 file of an MNIST-style set) is
    returned as it is: resampling it would only blur what the network was trained on.
    """
    grey = _as_grey(image)
    # Checked first, since it is what a folder of MNIST-style files holds: a black border has no box
    # lines to cut (_strip_frame leaves all 70,000 of MNIST's digits as they are), and an enlarged
    # scan is still undone.
    mnist = is_mnist_form(grey) and _native_pixels(grey) is grey
    if not mnist:
        grey = _source_pixels(grey)
        mnist = is_mnist_form(grey)
    if mnist:
        return np.ascontiguousarray(grey, dtype=np.float32)
    try:
        ink = _segment(grey)
    except NoInkError as refused:
        # A small crop 4x as long as it is wide whose stroke fills it shows no paper: what the
        # path took for paper was the stroke. Read again as a stroke on paper (a tight "1"
        # enlarged from an 8 px scan); if that finds nothing either, the first reason stands.
        if not _narrow(grey):
            raise
        try:
            ink = _segment(grey, narrow=True)
        except NoInkError:
            raise refused from None
    if ink.source is not None:
        return _layout(ink.source, ink.source > _BBOX_EPS)
    return _layout(ink.soft, ink.mask)


# --------------------------------------------------------------------------- numbers


@dataclass
class _Group:
    """A candidate digit: a set of component labels and its bounding box."""

    labels: list[int]
    r0: int
    r1: int
    c0: int
    c1: int
    area: int

    @property
    def width(self) -> int:
        return self.c1 - self.c0

    @property
    def height(self) -> int:
        return self.r1 - self.r0

    def absorb(self, other: "_Group") -> None:
        self.labels += other.labels
        self.r0, self.r1 = min(self.r0, other.r0), max(self.r1, other.r1)
        self.c0, self.c1 = min(self.c0, other.c0), max(self.c1, other.c1)
        self.area += other.area


_MERGE_OVERLAP = 0.5  # merge components overlapping in x by this fraction of the narrower ...
_MERGE_SHORT = 0.75  # ... when the shorter one is below this fraction of the digit height,
_MERGE_TALL_OVERLAP = 0.8  # ... or by this fraction when both are full height (broken "4")
_SPLIT_ASPECT = 1.4  # a group this many digit heights wide holds several digits
_DIGIT_ASPECT = 0.8  # digits in such a group: round(width / (this * height))
_TOUCH_ASPECT = 1.1  # a narrower group is one digit; a wider one may be two touching
_TOUCH_RUN = 4.5  # ... if a middle column crosses one stroke or this many stroke widths of ink
_TOUCH_HEIGHT = 0.5  # ... and leaves this fraction of the digit height on both sides
_LONE_STRICTER = 0.4  # a lone mark measures its own height: both aspects are raised by this
_FRAGMENT = 0.6  # groups shorter than this fraction of the digit height are fragments ...
_ATTACH_GAP = 0.5  # ... joined to the nearest digit within this many digit heights,
_MIN_HEIGHT = 0.35  # ... else dropped as noise when shorter than this fraction
_MIN_AREA = 0.08  # groups smaller in area than this fraction of the median digit are noise


def _gap(a: _Group, b: _Group) -> float:
    """Distance between two bounding boxes (0 when they overlap)."""
    dx = max(0, a.c0 - b.c1, b.c0 - a.c1)
    dy = max(0, a.r0 - b.r1, b.r0 - a.r1)
    return float(np.hypot(dx, dy))


def _groups(ink: _Ink) -> tuple[list[_Group], float]:
    """Digit candidates left to right, and the typical digit height in px.

    Components are merged when they overlap in x by half the narrower one's
    width and one of them is short (a broken stroke, a detached bar, a dot), or
    by 80% when both are full height (an open-top "4"), so that slanted
    neighbours stay apart. Remaining short fragments join the nearest digit if
    close, else are kept (a small digit) or dropped (noise) by height.
    """
    slices = ndimage.find_objects(ink.labels)
    areas = np.bincount(ink.labels.ravel(), minlength=ink.count + 1)
    groups = [
        _Group([i + 1], s[0].start, s[0].stop, s[1].start, s[1].stop, int(areas[i + 1]))
        for i, s in enumerate(slices)
        if s is not None
    ]
    if not groups:
        return groups, 0.0
    largest = max(g.area for g in groups)
    tallest = max(g.height for g in groups if g.area >= 0.25 * largest)
    height = float(np.median([g.height for g in groups if g.height >= _FRAGMENT * tallest]))
    merged = True
    while merged:
        merged = False
        groups.sort(key=lambda g: (g.c0 + g.c1) / 2)
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                a, b = groups[i], groups[j]
                overlap = min(a.c1, b.c1) - max(a.c0, b.c0)
                short = min(a.height, b.height) < _MERGE_SHORT * height
                need = _MERGE_OVERLAP if short else _MERGE_TALL_OVERLAP
                if overlap >= need * min(a.width, b.width):
                    a.absorb(b)
                    del groups[j]
                    merged = True
                    break
            if merged:
                break

    digits = [g for g in groups if g.height >= _FRAGMENT * height]
    fragments = [g for g in groups if g.height < _FRAGMENT * height]
    if not digits:
        digits, fragments = groups, []
    # Upper quartile: a smaller digit must not make its neighbours look too wide.
    height = float(np.percentile([g.height for g in digits], 75))
    for f in sorted(fragments, key=lambda g: -g.area):
        nearest = min(digits, key=lambda g: _gap(f, g))
        if _gap(f, nearest) <= _ATTACH_GAP * height:
            nearest.absorb(f)
        elif f.height >= _MIN_HEIGHT * height:
            digits.append(f)
    area = float(np.median([g.area for g in digits]))
    digits = [g for g in digits if g.area >= _MIN_AREA * area]
    digits.sort(key=lambda g: (g.c0 + g.c1) / 2)
    return digits, height


def _cut_cost(mask: np.ndarray, height: float) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the number of separate ink runs, and the cost of cutting there.

    The cost is the number of runs plus half the column's ink length in digit
    heights, so a cut prefers a single stroke (a touching point, or two walls
    pressed together as in "00") over the inside of a loop, which crosses two.
    """
    runs = mask[0].astype(np.float64) + (mask[1:] & ~mask[:-1]).sum(axis=0)
    cost = runs + 0.5 * mask.sum(axis=0) / max(height, 1.0)
    return runs, cost


def _even_cuts(mask: np.ndarray, pieces: int, height: float) -> list[int]:
    """Cuts splitting a wide group into `pieces` near even spacing, crossing few strokes."""
    width = mask.shape[1]
    _, cost_all = _cut_cost(mask, height)
    step = width / pieces
    cost_all = ndimage.uniform_filter1d(cost_all, max(1, round(step / 10)))
    cuts = []
    for k in range(1, pieces):
        expected = k * step
        lo = max(1, int(expected - 0.35 * step))
        hi = min(width - 1, int(expected + 0.35 * step) + 1)
        xs = np.arange(lo, hi)
        cost = cost_all[lo:hi] + 0.5 * np.abs(xs - expected) / step
        cuts.append(int(xs[int(np.argmin(cost))]))
    return cuts


def _touch_cut(mask: np.ndarray, height: float) -> int | None:
    """Column where two touching digits meet, or None if the group looks like one digit.

    Two candidates in the middle half of the group are tried: the cheapest
    column by `_cut_cost` if it crosses a single stroke (two walls pressed
    together, as in "00"), else the column of least ink if that is at most
    `_TOUCH_RUN` stroke widths. The cut must leave a mark at least
    `_TOUCH_HEIGHT` of the digit height tall on either side.
    """
    w = mask.shape[1]
    lo, hi = int(0.25 * w), int(0.75 * w) + 1
    if hi - lo < 1:
        return None
    xs = np.arange(lo, hi)
    centre = np.abs(xs - w / 2) / (w / 2)
    runs, cost = _cut_cost(mask, height)
    ink = mask.sum(axis=0).astype(np.float64)
    stroke = max(_stroke_width(mask), 1.0)
    candidates = []
    cheapest = int(xs[int(np.argmin(cost[lo:hi] + 0.25 * centre))])
    if runs[cheapest] == 1:
        candidates.append(cheapest)
    thinnest = int(xs[int(np.argmin(ink[lo:hi] + 0.5 * stroke * centre))])
    if ink[thinnest] <= _TOUCH_RUN * stroke:
        candidates.append(thinnest)
    for cut in candidates:
        sides = (mask[:, :cut], mask[:, cut:])
        boxes = [_bbox(side) for side in sides]
        if all(b is not None and b[1] - b[0] >= _TOUCH_HEIGHT * height for b in boxes):
            return cut
    return None


def split_digits(image: np.ndarray, max_digits: int = 12) -> list[np.ndarray]:
    """Splits an image of a written number into 28x28 MNIST digits, left to right.

    Steps: the ink is segmented as in `to_mnist`; connected components that
    overlap strongly in x are merged (a broken "5", a detached bar, an open-top
    "4"); fragments much shorter than the digit height H (upper quartile of the
    digit heights) join the nearest digit or are dropped as noise. A group at
    least 1.4 H wide is cut into round(width / 0.8 H) digits near even spacing
    at columns crossing the fewest strokes; a group 1.1-1.4 H wide is cut in two at its
    least-ink middle column only if that column crosses little ink (touching
    strokes) and both sides are at least H/2 tall. With a single group (H is
    then its own height) both thresholds are 0.4 higher, so one wide digit is
    not split. Each piece is laid out like `to_mnist`.

    Limits: one line of digits of similar height, written left to right;
    digits overlapping in x by most of the narrower one's width (strongly
    slanted, or written over each other) are merged; cuts are straight vertical
    lines, so interlocking touching digits are cut imperfectly; touching pairs
    narrower than 1.1 H (e.g. "11", "17", often "36") are not split, and a
    lone touching pair must be 1.5 H wide; a digit broken into two tall parts
    side by side becomes two digits; signs, letters and punctuation are
    dropped as noise or returned as digits. Raises NoInkError for blank images
    and ImageError when more than `max_digits` digits are found.
    """
    if max_digits < 1:
        raise ValueError(f"max_digits must be >= 1, got {max_digits}")
    ink = _segment(_source_pixels(_as_grey(image)))
    if ink.count > 5 * max_digits + 20:  # grouping compares every pair of marks
        raise ImageError(
            f"found {ink.count} separate marks, too many for a number of at most {max_digits} "
            "digits; crop the image to the number"
        )
    groups, height = _groups(ink)
    if not groups:
        raise NoInkError("no digits found; photograph darker, thicker strokes under even light")

    # A wide digit (MNIST: up to ~1.45x wider than tall) alone is not a pair.
    lone = _LONE_STRICTER if len(groups) == 1 else 0.0
    # Count before building anything: each piece is a full-size mask, and a long line would
    # otherwise become thousands of them.
    expected = sum(
        max(2, round(g.width / (_DIGIT_ASPECT * height))) if g.width >= (_SPLIT_ASPECT + lone) * height else 1
        for g in groups
    )
    if expected > max_digits:
        raise ImageError(
            f"found {expected} digits, more than max_digits={max_digits}; "
            "crop the image to the number or raise max_digits"
        )
    pieces: list[np.ndarray] = []  # bool masks, left to right
    for g in groups:
        mask = np.isin(ink.labels[g.r0 : g.r1, g.c0 : g.c1], g.labels)
        full = np.zeros_like(ink.mask)
        full[g.r0 : g.r1, g.c0 : g.c1] = mask
        if g.width >= (_SPLIT_ASPECT + lone) * height:
            count = max(2, round(g.width / (_DIGIT_ASPECT * height)))
            cuts = _even_cuts(mask, count, height)
        elif g.width >= (_TOUCH_ASPECT + lone) * height:
            cut = _touch_cut(mask, height)
            cuts = [] if cut is None else [cut]
        else:
            cuts = []
        if not cuts:
            pieces.append(full)
            continue
        bounds = [0, *cuts, g.width]
        for a, b in zip(bounds[:-1], bounds[1:]):
            part = np.zeros_like(ink.mask)
            part[g.r0 : g.r1, g.c0 + a : g.c0 + b] = mask[:, a:b]
            if part.any():
                pieces.append(part)
    if len(pieces) > max_digits:
        raise ImageError(
            f"found {len(pieces)} digits, more than max_digits={max_digits}; "
            "crop the image to the number or raise max_digits"
        )

    # Give every soft-ink pixel to the nearest piece, so anti-aliased fringes follow.
    owner = np.zeros(ink.mask.shape, np.int32)
    for i, part in enumerate(pieces, start=1):
        owner[part] = i
    if len(pieces) > 1:
        _, (iy, ix) = ndimage.distance_transform_edt(owner == 0, return_indices=True)
        owner = owner[iy, ix]
    digits = []
    for i, part in enumerate(pieces, start=1):
        soft = np.where(owner == i, ink.soft, 0.0).astype(np.float32)
        digits.append(_layout(soft, part))
    return digits
