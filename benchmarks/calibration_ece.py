"""ECE and NLL of trained runs before and after calibration: validation, test, real handwriting.

  python benchmarks/calibration_ece.py --workdir=runs/fast
  python benchmarks/calibration_ece.py --workdir=runs/fast --folder=sk_digits/   # also a labelled folder

For each run (its fitted temperature, see hwrjax.inference.calibration; `hwrjax calibrate` fits one for a
run that lacks it) and each set: accuracy, ECE (15 equal-width bins of the top probability) and
NLL with the raw softmax (T = 1) and calibrated. The sets: the run's validation split (where T
was fitted), its test split, scikit-learn's 1,797 digits normalized by hand the classic MNIST
way (benchmarks/dev_digits.py's `mnist_form`), and with --folder a labelled folder read through
the Recognizer (e.g. the one benchmarks/digits_folder.py writes). Needs scikit-learn for the
digits (pip install -e ".[bench]").
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.dev_digits import mnist_form  # noqa: E402
from hwrjax.apps import evaluate  # noqa: E402
from hwrjax.inference import loader, metrics, predict  # noqa: E402

FLAGS = flags.FLAGS
# --workdir (repeatable) and --output are those benchmarks/dev_digits.py defines (importing it defines them).
flags.DEFINE_string("folder", "", "Optional labelled folder (sub-folders 0..9) read through the Recognizer.")
flags.DEFINE_integer("tta", 0, "Test-time augmentation views (0: none).")


def _row(name: str, labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray) -> dict:
    before = metrics.classification_report(labels, raw, num_mistakes=0)
    after = metrics.classification_report(labels, calibrated, num_mistakes=0)
    return {"set": name, "n": int(len(labels)), "accuracy": after["accuracy"], "ece_before": before["ece"],
            "ece_after": after["ece"], "nll_before": before["loss"], "nll_after": after["loss"],
            "coverage": metrics.coverage_table(labels, calibrated, evaluate.COVERAGE_THRESHOLDS)}


def measure(workdir: str) -> dict:
    """The figures of one run on every set."""
    from sklearn.datasets import load_digits  # the bench extra

    rows = []
    for split in ("validation", "test") + ((FLAGS.folder,) if FLAGS.folder else ()):
        result = evaluate.run_evaluation(workdir, split=split, tta=FLAGS.tta)
        c = result.report["calibration"]
        rows.append({"set": "folder" if split == FLAGS.folder else split, "n": result.report["num_examples"],
                     "accuracy": result.report["accuracy"], "ece_before": c["uncalibrated_ece"],
                     "ece_after": result.report["ece"], "nll_before": c["uncalibrated_loss"],
                     "nll_after": result.report["loss"], "coverage": c["coverage"]})
    digits = load_digits()
    hand = np.stack([mnist_form(d) for d in digits.images])[..., None].astype(np.float32)
    raw, calibrated = predict.predict_both(workdir, hand, tta=FLAGS.tta)
    rows.append(_row("sklearn digits (hand)", digits.target.astype(np.int64), raw, calibrated))
    model = loader.load_model(workdir)
    return {"workdir": workdir, "temperature": model.temperature, "fitted": model.calibration is not None,
            "tta": FLAGS.tta, "rows": rows}


def main(argv):
    del argv
    if not FLAGS.workdir:
        raise app.UsageError("pass --workdir of a training run (repeat for several)")
    logging.set_verbosity(logging.WARNING)
    results = [measure(w) for w in FLAGS.workdir]
    for r in results:
        state = f"temperature {r['temperature']:.4g}" if r["fitted"] else "no fitted temperature (T=1)"
        print(f"{r['workdir']}: {state}{f', TTA {FLAGS.tta}' if FLAGS.tta > 1 else ''}")
        print(f"  {'set':<24} {'n':>6} {'accuracy':>9} {'ECE T=1':>8} {'ECE cal':>8} {'NLL T=1':>8} {'NLL cal':>8}"
              "   kept (accuracy) at min confidence 0.9 | 0.99")
        for row in r["rows"]:
            kept = {c["min_confidence"]: c for c in row["coverage"]}
            cover = " | ".join(f"{kept[t]['kept']:.1%} ({kept[t]['accuracy'] or 0:.2%})" for t in (0.9, 0.99))
            print(f"  {row['set']:<24} {row['n']:>6} {row['accuracy']:>9.2%} {row['ece_before']:>8.4f} "
                  f"{row['ece_after']:>8.4f} {row['nll_before']:>8.4f} {row['nll_after']:>8.4f}   {cover}")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
