"""What reading one image costs in preprocessing: decoding included, medians over repeats.

  python benchmarks/preprocess_speed.py                          # per-image medians

Per image (PNG or JPEG bytes -> `load_image` -> `to_mnist`, the path of `hwrjax predict
--mode=digit`): an 8x8 scan, a 28x28 digit, a 64x64 tight crop, a 640x480 photo, a
12-megapixel phone photo (4000x3000 JPEG of a digit on lit, noisy paper), and hostile
inputs (a 1-px line 5000 px long, a 2800x2800 RGBA PNG, a 16x16 noise image). Reported as
the median of --repeats runs each, so a busy machine moves the figures less; CPU time
beside wall time, since a shared machine moves the wall figure most; and a digest of what was
read (the 28x28 array's bytes, or the refusal), so two trees that read alike show the same
one. `hwrjax predict` on a folder of small images is timed by benchmarks/predict_rate.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import statistics
import sys
import time

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 30, "Timed runs per input (the median is reported).")


def _encode(a: np.ndarray | Image.Image, fmt: str = "PNG", **kw) -> bytes:
    im = a if isinstance(a, Image.Image) else Image.fromarray(a)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A digit written on paper, photographed: lighting gradient, blur, sensor noise."""
    im = Image.new("L", (width, height), 215)
    s = min(width, height)
    ImageDraw.Draw(im).line([(0.55 * width, 0.2 * height), (0.48 * width, 0.8 * height)],
                            fill=40, width=max(2, s // 40))
    ImageDraw.Draw(im).line([(0.4 * width, 0.2 * height), (0.55 * width, 0.2 * height)],
                            fill=40, width=max(2, s // 40))
    a = np.asarray(im, np.float32) * np.linspace(1.0, 0.8, width)[None, :]
    a += rng.normal(0, 6, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def _inputs() -> dict[str, bytes]:
    from tests.support import forms

    rng = np.random.default_rng(0)
    seven = np.zeros((28, 28), np.uint8)
    im = Image.fromarray(seven)
    ImageDraw.Draw(im).line([(8, 6), (20, 6), (12, 23)], fill=255, width=3)
    seven = np.asarray(im)
    line = Image.new("L", (5000, 2), 255)
    ImageDraw.Draw(line).line([(0, 1), (4999, 1)], fill=0)
    rgba = Image.new("RGBA", (2400, 2400), (255, 255, 255, 255))
    ImageDraw.Draw(rgba).line([(1400, 300), (1300, 2500)], fill=(0, 0, 0, 255), width=40)
    return {
        "8x8 scan": _encode(forms.render_form("tight8", seven, rng)),
        "28x28 digit": _encode(seven),
        "64x64 tight crop": _encode(np.asarray(Image.fromarray(seven[5:25, 6:22]).resize((52, 64)))),
        "640x480 photo (JPEG)": _encode(_photo(640, 480, rng), "JPEG", quality=90),
        "4000x3000 photo (JPEG)": _encode(_photo(4000, 3000, rng), "JPEG", quality=90),
        "hostile: 5000x2 line": _encode(line),
        "hostile: 2400x2400 RGBA": _encode(rgba),
        "hostile: 16x16 noise": _encode((rng.random((16, 16)) * 255).astype(np.uint8)),
    }


def _time_one(data: bytes) -> tuple[float, float, str]:
    """Wall and CPU milliseconds of one reading (CPU time moves less on a shared machine), and what was read."""
    from hwrjax.apps import preprocess

    t0, c0 = time.perf_counter(), time.process_time()
    try:
        out: np.ndarray | str = preprocess.to_mnist(preprocess.load_image(data))
    except preprocess.ImageError as e:
        out = str(e)
    wall, cpu = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
    outcome = f"refused: {out[:60]}" if isinstance(out, str) else "read"
    digest = hashlib.sha256(out.encode() if isinstance(out, str) else out.tobytes()).hexdigest()[:8]
    return wall, cpu, f"{outcome}, digest {digest}"


def main(argv: list[str]) -> None:
    del argv
    for name, data in _inputs().items():
        _time_one(data)  # warm caches and imports
        runs = [_time_one(data) for _ in range(FLAGS.repeats)]
        wall = statistics.median(t for t, _, _ in runs)
        cpu = statistics.median(c for _, c, _ in runs)
        print(f"{name:26s} {len(data):>9,} bytes  median {wall:8.2f} ms wall, {cpu:8.2f} ms CPU  ({runs[0][2]})",
              flush=True)


if __name__ == "__main__":
    app.run(main)
