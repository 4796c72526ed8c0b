"""How well a trained model reads digits captured the ways other collections and forms capture them.

  python benchmarks/read_forms.py --workdir=runs/resnet                # 1,000 test digits per form
  python benchmarks/read_forms.py --workdir=runs/resnet --limit=300 --forms=tight8,binary16

Every form of `tests.support.forms.FORMS` (tight crops at 8-32 px, binarized, few grey levels,
stretched to fill the box, dark or light ink, hard-pixel upscaled, inside a form's box,
stained) is rendered from the first --limit MNIST test digits, written as PNG and read
through the same path as `hwrjax predict --mode=digit` (`Recognizer.recognize`, which
decodes, preprocesses and classifies); an image refused by preprocessing counts as wrong.

Real handwriting that is not MNIST: scikit-learn's 1,797 digits (8x8, 17 grey levels, light
ink on dark; `sklearn.datasets.load_digits`, shipped with scikit-learn) are read the same way
at native size, upscaled 4x (bilinear), and inverted, and, for comparison, normalized by hand
the classic MNIST way (box to 20 px, centre of mass centred) and classified directly.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

import numpy as np
from absl import app, flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("workdir", None, "Training workdir(s) whose best checkpoint is read.", required=True)
flags.DEFINE_integer("limit", 1000, "MNIST test digits rendered per form.")
flags.DEFINE_string("forms", "", "Comma-separated forms (default: all).")
flags.DEFINE_boolean("sklearn", True, "Also read scikit-learn's real 8x8 digits.")
flags.DEFINE_integer("seed", 0, "Seed of the rendering.")
flags.DEFINE_string("output", "", "Optional JSON file for the figures.")


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _read(recognizer, images: list[np.ndarray], labels: np.ndarray) -> dict:
    """Accuracy, refusals and median preprocessing ms of images read as PNG files in digit mode."""
    readings = recognizer.recognize([_png(a) for a in images], mode="digit")
    got = np.array([int(r.text) if r.error is None else -1 for r in readings])
    errors = [r.error for r in readings if r.error]
    return {
        "accuracy": float(np.mean(got == labels)),
        "refused": float(np.mean(got < 0)),
        "n": int(len(labels)),
        "first_error": errors[0] if errors else "",
    }


def main(argv: list[str]) -> None:
    del argv
    from configs import default
    from hwrjax.apps.recognize import Recognizer
    from hwrjax.training import data
    from hwrjax.training.logs import library_logs_quieted
    from tests.support import forms

    test = data.load_split(data.ensure_prepared(default.get_config()), "test")
    images, labels = test.images[: FLAGS.limit, ..., 0], test.labels[: FLAGS.limit].astype(np.int64)
    names = [n for n in FLAGS.forms.split(",") if n] or list(forms.FORMS)
    results: dict = {}
    for workdir in FLAGS.workdir:
        with library_logs_quieted():
            recognizer = Recognizer.from_workdir(workdir)
        res: dict = {"model": recognizer.name, "step": recognizer.step, "forms": {}}
        for name in names:
            rng = np.random.default_rng([FLAGS.seed, sum(map(ord, name))])
            rendered = [forms.render_form(name, d, rng) for d in images]
            t0 = time.perf_counter()
            res["forms"][name] = _read(recognizer, rendered, labels)
            res["forms"][name]["seconds"] = time.perf_counter() - t0
            f = res["forms"][name]
            print(f"{workdir} {name:22s} {100 * f['accuracy']:6.2f}%  refused {100 * f['refused']:5.2f}%  "
                  f"{f['first_error'][:90]}", flush=True)
        if FLAGS.sklearn:
            from sklearn.datasets import load_digits

            d = load_digits()
            raw = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
            y = d.target.astype(np.int64)
            big = [np.asarray(Image.fromarray(a).resize((32, 32), Image.Resampling.BILINEAR)) for a in raw]
            variants = {
                "sklearn8": list(raw),
                "sklearn8_upscaled32": big,
                "sklearn8_dark_ink": [255 - a for a in raw],
                "sklearn8_upscaled32_dark_ink": [255 - a for a in big],
            }
            for name, imgs in variants.items():
                res["forms"][name] = _read(recognizer, imgs, y)
                f = res["forms"][name]
                print(f"{workdir} {name:22s} {100 * f['accuracy']:6.2f}%  refused {100 * f['refused']:5.2f}%  "
                      f"{f['first_error'][:90]}", flush=True)
            classic = np.stack([forms.classic_normalize(a) for a in raw])
            acc = float(np.mean(recognizer.classify(classic).argmax(-1) == y))
            res["forms"]["sklearn8_classic_by_hand"] = {"accuracy": acc, "n": int(len(y))}
            print(f"{workdir} {'sklearn8_classic_by_hand':22s} {100 * acc:6.2f}%", flush=True)
        results[workdir] = res
    if FLAGS.output:
        with open(FLAGS.output, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    app.run(main)
