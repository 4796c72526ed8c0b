"""Accuracy of trained runs on real handwriting other than MNIST: scikit-learn's digits.

  python benchmarks/dev_digits.py --workdir=runs/resnet
  python benchmarks/dev_digits.py --workdir=runs/a --workdir=runs/b --recognizer   # also through hwrjax's reading

scikit-learn ships 1,797 digits of 13 writers (UCI "optdigits", its test part: 32x32 binary scans counted in
4x4 blocks to 8x8 images of 0..16, ink bright) with the package: a development set for choosing
training augmentation, never for training. `hand` normalizes them here the classic MNIST way
(the box of the ink scaled bilinearly so its longer side is 20 px, the centre of mass moved
to (14, 14) of a 28x28 field), so the figure measures the network, not a preprocessing. With
--recognizer, each digit is also read file-like through `Recognizer.read(mode="digit")` (the
same path as `hwrjax predict --mode=digit`): as scikit-learn gives it (a float array of 0..16,
`as_given`), as an 8-bit file at its native 8x8, upscaled 4x (32x32, nearest neighbour), and
both with dark ink on a light ground.
Needs scikit-learn (pip install -e ".[bench]").
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags, logging
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hwrjax.apps.recognize import Recognizer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", [], "Workdir of a training run to measure; repeat for several.")
flags.DEFINE_string("checkpoint", "best", "best, latest, or a step number.")
flags.DEFINE_bool("recognizer", False, "Also read each digit through Recognizer.read(mode='digit'): native, "
                  "upscaled 4x, and both inverted.")
flags.DEFINE_string("output", "", "Optional JSON file for the figures.")

_BOX = 20  # MNIST's digits fit a 20x20 box ...
_CENTRE = 14  # ... whose centre of mass is moved to pixel (14, 14) of the 28x28 field (MNIST's mean).


def mnist_form(digit: np.ndarray) -> np.ndarray:
    """One 8x8 digit of 0..16, ink bright -> 28x28 float32 in [0, 1], normalized as MNIST was."""
    x = np.asarray(digit, np.float32) / 16.0
    rows, cols = np.nonzero(x.any(axis=1))[0], np.nonzero(x.any(axis=0))[0]
    if rows.size == 0:
        return np.zeros((28, 28), np.float32)
    crop = x[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    size = (max(1, round(w * _BOX / max(h, w))), max(1, round(h * _BOX / max(h, w))))
    box = np.asarray(Image.fromarray(crop, mode="F").resize(size, Image.BILINEAR), np.float32).clip(0, 1)
    mass = box.sum()
    com_r = (box.sum(axis=1) * np.arange(box.shape[0])).sum() / mass
    com_c = (box.sum(axis=0) * np.arange(box.shape[1])).sum() / mass
    top, left = int(round(_CENTRE - com_r)), int(round(_CENTRE - com_c))
    top, left = min(max(top, 0), 28 - box.shape[0]), min(max(left, 0), 28 - box.shape[1])
    out = np.zeros((28, 28), np.float32)
    out[top:top + box.shape[0], left:left + box.shape[1]] = box
    return out


def file_like(digit: np.ndarray, upscale: int, inverted: bool) -> np.ndarray:
    """One 8x8 digit as the 8-bit grey image a file would hold, optionally upscaled and inverted."""
    grey = np.round(np.asarray(digit, np.float64) * 255.0 / 16.0).astype(np.uint8)
    if upscale > 1:
        grey = np.kron(grey, np.ones((upscale, upscale), np.uint8))
    return 255 - grey if inverted else grey


def measure(workdir: str, images: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy of one run on the digits, per variant, with the per-class accuracy of `hand`."""
    recognizer = Recognizer.from_workdir(workdir, checkpoint=FLAGS.checkpoint)
    hand = recognizer.classify(np.stack([mnist_form(d) for d in images])).argmax(axis=1)
    result = {"workdir": workdir, "n": int(len(labels)), "hand": float((hand == labels).mean()),
              "hand_per_class": [float((hand[labels == k] == k).mean()) for k in range(10)]}
    if FLAGS.recognizer:
        for name, upscale, inverted in (("as_given", 1, False), ("native", 1, False), ("native_inverted", 1, True),
                                        ("upscaled", 4, False), ("upscaled_inverted", 4, True)):
            inputs = list(images) if name == "as_given" else [file_like(d, upscale, inverted) for d in images]
            readings = recognizer.recognize(inputs, mode="digit")
            got = np.array([int(r.text) if r.text.isdigit() else -1 for r in readings])
            result[name] = float((got == labels).mean())
            errors = [r.error for r in readings if r.error]
            if errors:
                result[name + "_first_error"] = errors[0]
    return result


def main(argv):
    del argv
    if not FLAGS.workdir:
        raise app.UsageError("pass --workdir of a training run (repeat for several)")
    from sklearn.datasets import load_digits  # the bench extra; imported late so --help works without it

    logging.set_verbosity(logging.WARNING)  # checkpoint loading is chatty at INFO

    digits = load_digits()
    images, labels = digits.images, digits.target.astype(np.int64)
    rows = [measure(w, images, labels) for w in FLAGS.workdir]
    variants = [k for k in ("hand", "as_given", "native", "native_inverted", "upscaled", "upscaled_inverted")
                if k in rows[0]]
    print(f"scikit-learn digits, {len(labels)} images: accuracy (errors)")
    print(f"{'workdir':<40} " + " ".join(f"{v:>18}" for v in variants))
    for r in rows:
        cells = [f"{r[v]:>9.2%} ({round((1 - r[v]) * r['n']):>4})" for v in variants]
        print(f"{r['workdir']:<40} " + " ".join(f"{c:>18}" for c in cells))
        print(f"{'  hand, per class 0..9':<40} " + " ".join(f"{a:.1%}" for a in r["hand_per_class"]))
        for v in variants:
            if v + "_first_error" in r:
                print(f"  {v}: some digits unreadable, e.g. {r[v + '_first_error']}")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
