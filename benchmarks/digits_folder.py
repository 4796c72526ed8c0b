"""Writes scikit-learn's handwritten digits as a labelled folder of PNG files (DIR/<digit>/<n>.png).

  python benchmarks/digits_folder.py --output=/tmp/sk_digits
  hwrjax evaluate --workdir=runs/fast --split=/tmp/sk_digits        # accuracy, ECE, coverage on them
  hwrjax predict --workdir=runs/fast --labelled /tmp/sk_digits      # file by file, with a summary

scikit-learn ships 1,797 digits by 13 writers (UCI "optdigits", its test part: 32x32 binary scans counted in
4x4 blocks into 8x8 images of 0..16). They are written as files a user would have: `--scale`
times their 8x8 size (nearest neighbour), dark ink on white paper unless `--light_ink`, so every
reading goes through the Recognizer's own preprocessing. A development set for measuring only,
never for training. Needs scikit-learn (pip install -e ".[bench]").
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This program's flags; defined only when it runs, so other benchmarks can import `write_folder`."""
    flags.DEFINE_string("output", None, "Folder to write (must not exist, or be empty).", required=True)
    flags.DEFINE_integer("scale", 4, "Each 8x8 digit is written this many times larger (nearest neighbour).")
    flags.DEFINE_bool("light_ink", False, "Bright ink on a black ground (as the data are) instead of dark on white.")


def write_folder(output: str, scale: int = 4, light_ink: bool = False) -> int:
    """Writes the digits to OUTPUT/<label>/<index>.png; returns how many."""
    from sklearn.datasets import load_digits

    if scale < 1 or scale > 64:
        raise ValueError(f"--scale must be in 1..64, got {scale}")
    if os.path.exists(output) and os.listdir(output):
        raise ValueError(f"{output} exists and is not empty; pass a new --output")
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = np.round(np.asarray(image, np.float64) / 16.0 * 255.0).astype(np.uint8)
        if not light_ink:
            pixels = 255 - pixels
        pixels = np.kron(pixels, np.ones((scale, scale), np.uint8))
        folder = os.path.join(output, str(int(label)))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(os.path.join(folder, f"{i:04d}.png"))
    return len(digits.target)


def main(argv: list[str]) -> int:
    del argv
    try:
        n = write_folder(FLAGS.output, FLAGS.scale, FLAGS.light_ink)
    except (ValueError, ModuleNotFoundError) as e:
        sys.stderr.write(f"digits_folder: error: {e}\n")
        return 2
    sys.stdout.write(f"wrote {n} digits to {FLAGS.output}/<digit>/\n")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
