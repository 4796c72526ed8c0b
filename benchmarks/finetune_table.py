"""What `hwrjax finetune` buys on real handwriting it was not trained on: scikit-learn's digits.

  python benchmarks/finetune_table.py --workdir=runs/fast
  python benchmarks/finetune_table.py --workdir=runs/resnet --per_class=10 --draws=1 --learning_rate=0.01

scikit-learn ships 1,797 digits (UCI "optdigits", its test part: 13 writers, scanned 32x32
binary and counted in 4x4 blocks into 8x8 images of 0..16). They are written here as 8x8 PNG
files of dark ink on white, as a user would have them (`digits_folder.write_folder`), and read
at that native size by the Recognizer in digit mode (the path of `hwrjax predict --mode=digit`,
which upsamples). For each k in --per_class and each of --draws draws, k files of each digit
are chosen at random (split by sample), put in a samples folder (sub-folders 0..9) and given to
`hwrjax.apps.finetune.finetune` with holdout 0; every other file is held out and read before (the
base run) and after (the fine-tuned run). Draw d takes the first k of one permutation per class,
so the 5 are among the 10 and the 10 among the 20. MNIST test accuracy before and after comes
from the fine-tune's own report (its base run's test split).

A split by sample mixes writers: the fine-tuning samples and the held-out ones share the 13
writers and the capture (binary scan, 8x8 counts), so the figure is how well the recognizer
adapts to a collection, not to one new person. scikit-learn does not say which digit is whose.
With --split=order the samples are drawn from the first third of the files (in the order
scikit-learn gives them) and only the last two thirds are read; if the files are in the order
they were scanned, that separates writers at least in part (not documented, so not a claim).

Unset fine-tune settings are `hwrjax finetune`'s defaults. Needs scikit-learn
(pip install -e ".[bench]").
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits_folder import write_folder  # noqa: E402
from hwrjax.apps import finetune as finetune_lib  # noqa: E402
from hwrjax.apps.recognize import Recognizer  # noqa: E402
from hwrjax.core.errors import HwrjaxError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of the trained base run (read only).", required=True)
flags.DEFINE_list("per_class", ["5", "10", "20"], "Samples of each digit to fine-tune on; one row each.")
flags.DEFINE_integer("draws", 3, "Random draws of the samples for each row.")
flags.DEFINE_integer("seed", 0, "Seed of the draws (the fine-tune's own seed is the base run's unless --ft_seed).")
flags.DEFINE_enum("split", "sample", ["sample", "order"], "sample: hold out every file not drawn; order: draw "
                  "from the first third in scikit-learn's order, read only the last two thirds.")
flags.DEFINE_integer("epochs", None, "Fine-tune epochs (default: hwrjax finetune's).")
flags.DEFINE_float("mix", None, "Share of each batch from the samples (default: hwrjax finetune's).")
flags.DEFINE_float("learning_rate", None, "Peak learning rate (default: hwrjax finetune's).")
flags.DEFINE_integer("batch_size", None, "Batch size (default: hwrjax finetune's).")
flags.DEFINE_integer("ft_seed", None, "The fine-tune's seed (default: hwrjax finetune's).")
flags.DEFINE_string("output", "", "Optional JSON file for every draw's figures and the table.")

_MAX_DRAWS = 20


def _read(workdir: str, paths: list[str]) -> np.ndarray:
    """The digit `hwrjax predict --mode=digit` reads in each file (-1 when it reads none)."""
    readings = Recognizer.from_workdir(workdir).recognize(paths, mode="digit")
    return np.array([int(r.text) if r.text.isdigit() else -1 for r in readings])


def draw_samples(labels: np.ndarray, pool: np.ndarray, per_class: int, draw: int, seed: int) -> np.ndarray:
    """Indices of the first `per_class` files of each digit in draw `draw`'s permutation of `pool`."""
    chosen = []
    for c in range(10):
        candidates = pool[labels[pool] == c]
        if len(candidates) <= per_class:
            raise ValueError(f"only {len(candidates)} files of digit {c} to draw {per_class} from; lower --per_class")
        order = np.random.default_rng([seed, draw, c]).permutation(len(candidates))
        chosen.extend(candidates[order[:per_class]].tolist())
    return np.sort(np.asarray(chosen, np.int64))


def _copy_samples(folder: str, paths: list[str], labels: np.ndarray, index: np.ndarray) -> None:
    for i in index:
        os.makedirs(os.path.join(folder, str(labels[i])), exist_ok=True)
        shutil.copy(paths[i], os.path.join(folder, str(labels[i]), os.path.basename(paths[i])))


def _options() -> finetune_lib.FinetuneOptions:
    given = {"epochs": FLAGS.epochs, "mix": FLAGS.mix, "learning_rate": FLAGS.learning_rate,
             "batch_size": FLAGS.batch_size, "seed": FLAGS.ft_seed}
    return finetune_lib.FinetuneOptions(holdout=0.0, **{k: v for k, v in given.items() if v is not None})


def run_draw(workdir: str, paths: list[str], labels: np.ndarray, base: np.ndarray, chosen: np.ndarray,
             read_index: np.ndarray, scratch: str, options: finetune_lib.FinetuneOptions) -> dict:
    """One fine-tune on `chosen`; accuracy on `read_index` before and after, MNIST test, seconds."""
    held = np.setdiff1d(read_index, chosen)
    samples, output = os.path.join(scratch, "samples"), os.path.join(scratch, "tuned")
    shutil.rmtree(samples, ignore_errors=True)
    shutil.rmtree(output, ignore_errors=True)
    _copy_samples(samples, paths, labels, chosen)
    report = finetune_lib.finetune(workdir, samples, output, options)
    after = _read(output, [paths[i] for i in held])
    shutil.rmtree(output)
    shutil.rmtree(samples)
    return {"num_samples": int(len(chosen)), "num_held_out": int(len(held)),
            "held_out_before": float(np.mean(base[held] == labels[held])),
            "held_out_after": float(np.mean(after == labels[held])),
            "samples_after": float(report["after"]["train_samples"]["accuracy"]),
            "mnist_before": float(report["before"]["mnist_test"]["accuracy"]),
            "mnist_after": float(report["after"]["mnist_test"]["accuracy"]),
            "mnist_examples": int(report["after"]["mnist_test"]["num_examples"]),
            "steps": int(report["steps"]), "learning_rate": float(report["learning_rate"]),
            "epochs": int(report["epochs"]), "mix": float(report["mix"]),
            "seconds": float(report["total_time_s"]), "train_seconds": float(report["train_time_s"])}


def format_table(rows: dict[int, list[dict]]) -> str:
    """Medians and means over draws of each row's figures, in points of accuracy."""
    lines = [f"{'per digit':>9} {'draws':>5} {'held out':>8} | {'before':>14} {'after':>14} {'errors':>11} | "
             f"{'MNIST before':>12} {'after':>14} {'worst':>7} | {'steps':>5} {'s/finetune':>10}",
             f"{'':>9} {'':>5} {'':>8} | {'median (mean)':>14} {'median (mean)':>14} {'median':>11} | "
             f"{'':>12} {'median (mean)':>14} {'change':>7} |"]
    for k, draws in rows.items():
        def col(key):
            return np.array([d[key] for d in draws]) * 100.0
        before, after, mb, ma = col("held_out_before"), col("held_out_after"), col("mnist_before"), col("mnist_after")
        n = int(np.median([d["num_held_out"] for d in draws]))
        errors = f"{np.median((100 - before) * n / 100):.0f} -> {np.median((100 - after) * n / 100):.0f}"
        lines.append(
            f"{k:>9} {len(draws):>5} {n:>8} | {np.median(before):>6.2f} ({np.mean(before):.2f}) "
            f"{np.median(after):>6.2f} ({np.mean(after):.2f}) {errors:>11} | {np.median(mb):>12.2f} "
            f"{np.median(ma):>6.2f} ({np.mean(ma):.2f}) {np.min(ma - mb):>+7.2f} | "
            f"{int(np.median([d['steps'] for d in draws])):>5} {np.median([d['seconds'] for d in draws]):>10.1f}")
    return "\n".join(lines)


def main(argv) -> int:
    del argv
    try:
        measure()
    except (HwrjaxError, ValueError, ModuleNotFoundError) as e:
        sys.stderr.write(f"finetune_table: error: {e}\n")
        return 2
    return 0


def measure() -> None:
    """Writes the digits, reads them with the base, fine-tunes each draw, prints the table."""
    from sklearn.datasets import load_digits  # the bench extra; imported late so --help works without it

    logging.set_verbosity(logging.ERROR)  # checkpoint loading warns about read-only options
    if not 1 <= FLAGS.draws <= _MAX_DRAWS:
        raise app.UsageError(f"--draws must be in 1..{_MAX_DRAWS}")
    try:
        per_class = [int(k) for k in FLAGS.per_class]
    except ValueError:
        raise app.UsageError(f"--per_class takes whole numbers, got {','.join(FLAGS.per_class)}") from None
    if not per_class or min(per_class) < 1:
        raise app.UsageError("--per_class takes numbers >= 1")
    options = _options()
    labels = load_digits().target.astype(np.int64)
    pool = np.arange(len(labels)) if FLAGS.split == "sample" else np.arange(len(labels) // 3)
    read_index = np.arange(len(labels)) if FLAGS.split == "sample" else np.arange(len(labels) // 3, len(labels))
    with tempfile.TemporaryDirectory(prefix="finetune_table-") as scratch:
        folder = os.path.join(scratch, "digits")
        write_folder(folder, scale=1)  # written in scikit-learn's order, named by index
        paths = [os.path.join(folder, str(int(y)), f"{i:04d}.png") for i, y in enumerate(labels)]
        base = _read(FLAGS.workdir, paths)
        print(f"{FLAGS.workdir}: {np.mean(base == labels):.2%} of the {len(labels)} scikit-learn digits read right "
              f"at 8x8 before fine-tuning; split by {FLAGS.split}", flush=True)
        rows: dict[int, list[dict]] = {}
        for k in per_class:
            for d in range(FLAGS.draws):
                chosen = draw_samples(labels, pool, k, d, FLAGS.seed)
                result = run_draw(FLAGS.workdir, paths, labels, base, chosen, read_index, scratch, options)
                rows.setdefault(k, []).append(dict(result, per_class=k, draw=d))
                print(f"k={k} draw {d}: held out {result['held_out_before']:.2%} -> {result['held_out_after']:.2%}, "
                      f"MNIST {result['mnist_before']:.2%} -> {result['mnist_after']:.2%}, "
                      f"{result['steps']} steps, {result['seconds']:.1f} s", flush=True)
    first = rows[per_class[0]][0]
    print(f"\nhwrjax finetune, lr {first['learning_rate']:g}, {first['epochs']} epochs, mix {first['mix']:g}; "
          f"accuracy in %, held out = scikit-learn digits not fine-tuned on (split by {FLAGS.split})")
    table = format_table(rows)
    print(table)
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump({"workdir": os.path.abspath(FLAGS.workdir), "split": FLAGS.split,
                       "draws": [d for ds in rows.values() for d in ds], "table": table}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
