"""How well a trained model reads MNIST test digits rendered as photos, and written numbers.

  python benchmarks/read_photos.py --workdir=runs/resnet                  # whole test set
  python benchmarks/read_photos.py --workdir=runs/resnet --limit=2000 --numbers=500

Digits: every test image (or the first --limit) is rendered by `tests.support.synth.render_photo`
(8x upscale, dark ink on light paper of random tone, off centre on a sheet 1.5x larger,
lighting gradient, blur, noise; every other one in colour with a black or blue pen) and
read twice by the model of --workdir (best checkpoint):

  * through the full preprocessing path (`Recognizer.prepare(..., mode="digit")`), and
  * naively: the photo converted to grey and resized to 28x28, nothing else, which is what
    a user gets without hwrjax.apps.preprocess.

Numbers: --numbers photos of 2 to 6 test digits side by side (`synth.render_number`,
touching strokes in 10% of the gaps) are split and read left to right; a number counts
as read only when every digit is right. Reported per length and overall, together with
how often the digit count came out right.

Photos are rendered from a fixed seed, so the figures are reproducible. Rendering and
preprocessing run in --workers processes; the model runs in this one.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import multiprocessing
import os
import sys
import time

import numpy as np
from absl import app, flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir whose best checkpoint is read.", required=True)
flags.DEFINE_integer("limit", 0, "Read only the first N test digits (0 = all 10,000).")
flags.DEFINE_integer("numbers", 1000, "Number photos (2-6 digits each) to read.")
flags.DEFINE_integer("seed", 0, "Seed of the rendering.")
flags.DEFINE_integer("workers", 0, "Processes for rendering and preprocessing (0 = one per CPU).")
flags.DEFINE_string("data_dir", None, "tfds data dir (default: TFDS_DATA_DIR).")
flags.DEFINE_string("output", "", "Optional JSON file for the figures.")

_CHUNK = 250
# Workers are spawned, not forked: forking a process that has started JAX can deadlock.
_SPAWN = multiprocessing.get_context("spawn")


def _load_test(data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    from hwrjax.training.data import hide_accelerators_from_tensorflow

    hide_accelerators_from_tensorflow()
    import tensorflow_datasets as tfds
    try:
        builder = tfds.builder("mnist", data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(builder.data_dir)
        data = tfds.as_numpy(builder.as_dataset(split="test", batch_size=-1))
    except Exception as e:  # noqa: BLE001 - any tfds failure means the same thing here
        sys.exit(f"read_photos: MNIST is not prepared ({e}); set TFDS_DATA_DIR or --data_dir "
                 "to a tfds data dir holding mnist")
    return data["image"][..., 0], data["label"].astype(np.int64)


def _naive(photo: np.ndarray) -> np.ndarray:
    """The photo as a user without preprocessing would feed it: grey, resized, scaled to [0, 1]."""
    im = Image.fromarray(photo).convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    return np.asarray(im, np.float32) / 255.0


def _png(photo: np.ndarray) -> bytes:
    """The photo as the PNG file a user would hand over (the timed path decodes it)."""
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    return buf.getvalue()


def _digit_job(args: tuple[np.ndarray, int, int]) -> tuple[np.ndarray, np.ndarray, float]:
    """Renders and prepares a chunk of digits; returns (prepared, naive, preprocess seconds)."""
    from hwrjax.apps import preprocess
    from tests.support import synth

    digits, seed, start = args
    prepared, naive, spent = [], [], 0.0
    for i, d in enumerate(digits):
        rng = np.random.default_rng([seed, start + i])
        photo = synth.render_photo(d, rng, rgb=bool((start + i) % 2))
        naive.append(_naive(photo))
        t0 = time.perf_counter()
        prepared.append(preprocess.to_mnist(preprocess.load_image(_png(photo))))
        spent += time.perf_counter() - t0
    return np.stack(prepared), np.stack(naive), spent


def _number_job(args: tuple[list[np.ndarray], int, int]) -> list[np.ndarray | None]:
    """Renders and splits one chunk of numbers; None where the splitter raised."""
    from hwrjax.apps import preprocess
    from tests.support import synth

    numbers, seed, start = args
    out = []
    for i, digits in enumerate(numbers):
        rng = np.random.default_rng([seed, 1_000_003, start + i])
        photo = synth.render_number(digits, rng)
        try:
            out.append(np.stack(preprocess.split_digits(preprocess.load_image(_png(photo)))))
        except preprocess.ImageError:
            out.append(None)
    return out


def main(argv: list[str]) -> None:
    del argv
    from hwrjax.apps.recognize import Recognizer
    from hwrjax.training.logs import library_logs_quieted

    workers = FLAGS.workers or os.cpu_count() or 1
    images, labels = _load_test(FLAGS.data_dir or os.environ.get("TFDS_DATA_DIR"))
    if FLAGS.limit:
        images, labels = images[:FLAGS.limit], labels[:FLAGS.limit]
    with library_logs_quieted():
        recognizer = Recognizer.from_workdir(FLAGS.workdir)

    t0 = time.perf_counter()
    jobs = [(images[s:s + _CHUNK], FLAGS.seed, s) for s in range(0, len(images), _CHUNK)]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=_SPAWN) as pool:
        parts = list(pool.map(_digit_job, jobs))
    prepared = np.concatenate([p[0] for p in parts])
    naive = np.concatenate([p[1] for p in parts])
    prep_s = sum(p[2] for p in parts)
    render_wall = time.perf_counter() - t0

    clean = recognizer.classify(images.astype(np.float32) / 255.0).argmax(-1)
    read = recognizer.classify(prepared).argmax(-1)
    plain = recognizer.classify(naive).argmax(-1)
    result: dict = {
        "workdir": FLAGS.workdir,
        "model": recognizer.name,
        "checkpoint_step": recognizer.step,
        "digits": int(len(labels)),
        "accuracy_mnist_as_is": float(np.mean(clean == labels)),
        "accuracy_photo_preprocessed": float(np.mean(read == labels)),
        "accuracy_photo_plain_resize": float(np.mean(plain == labels)),
        "preprocess_ms_per_photo": 1e3 * prep_s / max(1, len(labels)),
    }

    rng = np.random.default_rng(FLAGS.seed)
    lengths = rng.integers(2, 7, size=FLAGS.numbers)
    picks = [rng.integers(0, len(labels), size=int(n)) for n in lengths]
    numbers = [[images[j] for j in p] for p in picks]
    jobs = [(numbers[s:s + 50], FLAGS.seed, s) for s in range(0, len(numbers), 50)]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=_SPAWN) as pool:
        crops = [c for part in pool.map(_number_job, jobs) for c in part]
    whole = np.zeros(len(picks), bool)
    count_ok = np.zeros(len(picks), bool)
    for k, (pick, c) in enumerate(zip(picks, crops)):
        if c is None or len(c) != len(pick):
            continue
        count_ok[k] = True
        whole[k] = bool(np.all(recognizer.classify(c).argmax(-1) == labels[pick]))
    if len(picks):
        result["numbers"] = int(len(picks))
        result["numbers_read_whole"] = float(whole.mean())
        result["numbers_digit_count_right"] = float(count_ok.mean())
        result["numbers_read_whole_by_length"] = {
            str(n): float(whole[lengths == n].mean()) for n in range(2, 7) if np.any(lengths == n)
        }
    result["wall_s"] = time.perf_counter() - t0
    result["render_and_preprocess_wall_s"] = render_wall

    print(f"model {result['model']} (step {result['checkpoint_step']}) from {FLAGS.workdir}")
    print(f"{result['digits']} test digits: MNIST as is {100 * result['accuracy_mnist_as_is']:.2f}%  "
          f"photo + preprocessing {100 * result['accuracy_photo_preprocessed']:.2f}%  "
          f"photo, plain resize {100 * result['accuracy_photo_plain_resize']:.2f}%  "
          f"({result['preprocess_ms_per_photo']:.1f} ms/photo preprocessing)")
    if len(picks):
        by_len = "  ".join(f"{n} digits {100 * v:.1f}%" for n, v in result["numbers_read_whole_by_length"].items())
        print(f"{result['numbers']} numbers of 2-6 digits: read whole {100 * result['numbers_read_whole']:.2f}%, "
              f"digit count right {100 * result['numbers_digit_count_right']:.2f}%  ({by_len})")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
