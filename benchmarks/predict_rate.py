"""How fast `hwrjax predict --mode=digit --format=json` reads a folder of small images after start-up.

  python benchmarks/predict_rate.py --workdir=runs/fast                       # this tree, 3 repeats
  python benchmarks/predict_rate.py --workdir=runs/fast --tree=../main --tree=.   # two trees side by side
  python benchmarks/predict_rate.py --workdir=runs/fast --tree=.::--workers=0 --tree=.::--workers=2

A folder of --files small PNGs is made from MNIST test digits, captured the ways small digit
images come (`tests/support/forms.py`): 28x28 dark ink on light, tight crops of 16-32 px in either
polarity, binarized, few grey levels, stretched, stained scans, a few 64x64 hard-pixel
enlargements and digits inside a form's box (~50-80 px). The real command runs in a
subprocess on the whole folder and on its first --few files; the difference of the two
(wall time and CPU time of the process and everything it started) is the cost of the
extra files with start-up (importing JAX, loading the model, compiling) taken out:

  images/s after start-up = (files - few) / (wall(files) - wall(few))
  CPU ms per image        = (cpu(files) - cpu(few)) / (files - few)

Each --tree (a source tree put first on PYTHONPATH, with predict's options after '::') is run
--repeats times, the trees interleaved so a busy machine slows them alike; medians are
reported, with the accuracy of the readings and a digest of every row's text, so two trees
that read alike show one digest. CPU time counts every process predict starts, worker
processes and a multiprocessing fork server included (this process adopts orphans on Linux).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir whose best checkpoint reads the images.", required=True)
flags.DEFINE_integer("files", 5000, "Images in the folder.")
flags.DEFINE_integer("few", 500, "Images in the short run whose time is subtracted (start-up).")
flags.DEFINE_integer("repeats", 3, "Runs of each tree (medians are reported).")
flags.DEFINE_multi_string("tree", None, "Source tree(s) to run (PYTHONPATH), each optionally followed by options "
                          "for `hwrjax predict` after '::', e.g. --tree=.::--workers=0; default: this tree.")
flags.DEFINE_string("folder", "", "Keep the images here (made when missing) instead of a temporary folder.")

# Capture forms and their share of the folder: most small images are tight crops or 28x28 scans.
_MIX = (
    ("dark28", 0.25),  # the MNIST digit itself, dark ink on light paper
    ("tight", 0.35),  # a tight crop of 16-32 px, half of them dark ink on light
    ("binary16", 0.06),
    ("levels16", 0.06),
    ("stretched16_dark_ink", 0.06),
    ("stained", 0.1),
    ("pixelated64", 0.06),
    ("form_box", 0.06),
)


def make_folder(folder: str, count: int, seed: int = 0) -> list[int]:
    """Writes `count` PNGs NNNNN_<form>.png to `folder`; returns their labels in file order."""
    from configs import default
    from hwrjax.training import data
    from tests.support import forms

    test = data.load_split(data.ensure_prepared(default.get_config()), "test")
    rng = np.random.default_rng(seed)
    names = [n for n, _ in _MIX]
    share = np.array([s for _, s in _MIX])
    picks = rng.choice(len(names), size=count, p=share / share.sum())
    os.makedirs(folder, exist_ok=True)
    labels = []
    for i in range(count):
        j = i % len(test.images)
        digit, name = test.images[j, ..., 0], names[picks[i]]
        if name == "dark28":
            img = 255 - digit
        elif name == "tight":
            img = (np.clip(forms.tight_crop(digit, int(rng.integers(16, 33))), 0, 1) * 255).round().astype(np.uint8)
            if rng.random() < 0.5:
                img = 255 - img
        else:
            img = forms.render_form(name, digit, rng)
        Image.fromarray(img).save(os.path.join(folder, f"{i:05d}_{name}.png"))
        labels.append(int(test.labels[j]))
    with open(os.path.join(folder, "labels.json"), "w") as fh:
        json.dump(labels, fh)
    return labels


def _adopt_orphans() -> None:
    """Makes this process the reaper of its orphaned descendants (Linux), so that the CPU time of a
    process that predict starts but does not wait for (a multiprocessing fork server) is counted too."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        print("note: cannot adopt orphaned processes; CPU time of a fork server may be missed", file=sys.stderr)


def _reap() -> None:
    """Waits for every remaining child (adopted orphans), so that their CPU time is counted."""
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


def _run(tree: str, args: list[str], folder: str, workdir: str) -> tuple[float, float, list[dict]]:
    """Wall seconds, CPU seconds (the process and all its descendants) and the rows of one predict run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "hwrjax.cli", "predict", f"--workdir={workdir}", "--mode=digit", "--format=json",
           *args, folder]
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=tree, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    _reap()
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    return wall, cpu, json.loads(out.stdout)


def main(argv: list[str]) -> None:
    del argv
    if not 0 < FLAGS.few < FLAGS.files:
        raise app.UsageError("--few must be between 0 and --files")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    variants = {}  # label -> (tree, predict options)
    for spec in FLAGS.tree or [here]:
        path, _, options = spec.partition("::")
        variants[spec] = (os.path.abspath(path), options.split())
    _adopt_orphans()
    with tempfile.TemporaryDirectory() as tmp:
        root = FLAGS.folder or tmp
        many, few = os.path.join(root, f"all{FLAGS.files}"), os.path.join(root, f"first{FLAGS.few}")
        if not os.path.exists(os.path.join(many, "labels.json")):
            make_folder(many, FLAGS.files)
        if not os.path.isdir(few):
            os.makedirs(few)
            for name in sorted(os.listdir(many))[: FLAGS.few]:
                os.link(os.path.join(many, name), os.path.join(few, name))
        with open(os.path.join(many, "labels.json")) as fh:
            labels = json.load(fh)
        results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        digests: dict[str, set[str]] = {v: set() for v in variants}
        accuracy: dict[str, float] = {}
        for r in range(FLAGS.repeats):
            for tree, (path, options) in variants.items():
                wf, cf, _ = _run(path, options, few, FLAGS.workdir)
                wm, cm, rows = _run(path, options, many, FLAGS.workdir)
                n = FLAGS.files - FLAGS.few
                rate, cpu_ms = n / max(wm - wf, 1e-9), 1e3 * (cm - cf) / n
                results[tree].append((rate, cpu_ms))
                texts = [(os.path.basename(row["path"]), row["text"], row["error"]) for row in rows]
                digests[tree].add(hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:12])
                accuracy[tree] = float(np.mean([row["text"] == str(y) for row, y in zip(rows, labels)]))
                print(f"repeat {r + 1} {tree}: {FLAGS.files} files {wm:.1f} s, {FLAGS.few} files {wf:.1f} s -> "
                      f"{rate:.0f} images/s, {cpu_ms:.2f} CPU ms/image", flush=True)
        print(f"load average {os.getloadavg()[0]:.1f} (1 min) at the end; {os.cpu_count()} cores")
        for tree in variants:
            rates, cpus = zip(*results[tree])
            print(f"{tree}: median {statistics.median(rates):.0f} images/s after start-up "
                  f"(runs {', '.join(f'{x:.0f}' for x in rates)}), {statistics.median(cpus):.2f} CPU ms/image "
                  f"(all processes), accuracy {100 * accuracy[tree]:.2f}%, readings digest {','.join(sorted(digests[tree]))}")


if __name__ == "__main__":
    app.run(main)
