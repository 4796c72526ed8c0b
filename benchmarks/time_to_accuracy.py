"""Wall time and test accuracy of a recipe run end to end, over several seeds.

  python benchmarks/time_to_accuracy.py --config=configs/fast.py --seeds=0,1,2 --target=0.995
  python benchmarks/time_to_accuracy.py --config=configs/resnet.py --seeds=0,1,2 --root=runs/tta

Each seed is a fresh `python launch.py --config=CONFIG --workdir=ROOT/seedN --config.seed=N`
in its own process, timed from launch to exit (imports, data loading, compilation,
training, checkpointing and the final test report all included), one seed after the
other so they do not share the CPU. Accuracy is read from the run's
report/test_metrics.json. Prints each seed, then mean, standard deviation and range, and
with --target how many seeds reached it and whether the mean did. Extra `--config.*`
overrides go after `--`, e.g. `-- --config.num_epochs=3`.

Workdirs are kept (evaluate or ensemble them afterwards); an existing seed workdir is
refused rather than resumed, so every figure is a run from scratch.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/fast.py", "Config file (optionally :variant) passed to launch.py.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run, one after the other.")
flags.DEFINE_string("root", "", "Folder for the seed workdirs (default: runs/time_to_accuracy/<config name>).")
flags.DEFINE_float("target", 0.0, "Test accuracy to report against, e.g. 0.995 (0 = none).")
flags.DEFINE_string("output", "", "Optional JSON file for the figures.")


def _run_seed(config: str, workdir: str, seed: int, extra: list[str]) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={config}", f"--workdir={workdir}",
           f"--config.seed={seed}", *extra]
    log_path = workdir.rstrip("/") + ".log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"time_to_accuracy: seed {seed} failed with exit code {proc.returncode}; see {log_path}")
    report_path = os.path.join(workdir, "report", "test_metrics.json")
    if not os.path.exists(report_path):  # launch.py exits 0 when stopped by a signal (resumable)
        sys.exit(f"time_to_accuracy: seed {seed} stopped before its report (interrupted?); see {log_path}")
    with open(report_path) as f:
        report = json.load(f)
    return {"seed": seed, "workdir": workdir, "wall_s": wall, "test_accuracy": float(report["accuracy"]),
            "best_val_accuracy": report.get("best_val_accuracy"), "steps": report.get("step")}


def main(argv: list[str]) -> None:
    extra = argv[1:]
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        sys.exit(f"time_to_accuracy: only --config.* overrides may follow '--', got {bad}")
    config_path = FLAGS.config.split(":")[0]
    if not os.path.isfile(config_path):
        sys.exit(f"time_to_accuracy: no config file {config_path!r}; pass e.g. --config=configs/fast.py")
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        sys.exit(f"time_to_accuracy: --seeds must be integers, got {FLAGS.seeds}")
    name = os.path.splitext(os.path.basename(config_path))[0] + FLAGS.config[len(config_path):].replace(":", "_")
    root = FLAGS.root or os.path.join("runs", "time_to_accuracy", name)
    workdirs = {s: os.path.join(root, f"seed{s}") for s in seeds}
    existing = [w for w in workdirs.values() if os.path.exists(w)]
    if existing:
        sys.exit(f"time_to_accuracy: {existing[0]} exists; pass another --root or remove it "
                 "(every figure must be a run from scratch)")
    os.makedirs(root, exist_ok=True)

    rows = []
    for s in seeds:
        row = _run_seed(FLAGS.config, workdirs[s], s, extra)
        rows.append(row)
        print(f"seed {s}: test accuracy {100 * row['test_accuracy']:.2f}%  wall {row['wall_s']:.1f} s  "
              f"(best val {100 * (row['best_val_accuracy'] or 0):.2f}%, {row['steps']} steps)", flush=True)

    acc = [r["test_accuracy"] for r in rows]
    wall = [r["wall_s"] for r in rows]
    summary = {
        "config": FLAGS.config, "overrides": extra, "seeds": rows,
        "test_accuracy_mean": statistics.fmean(acc),
        "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "test_accuracy_range": [min(acc), max(acc)],
        "wall_s_mean": statistics.fmean(wall), "wall_s_median": statistics.median(wall),
        "wall_s_range": [min(wall), max(wall)],
    }
    print(f"{FLAGS.config} over {len(rows)} seed(s): test accuracy {100 * summary['test_accuracy_mean']:.3f}% "
          f"+- {100 * summary['test_accuracy_std']:.3f} (range {100 * min(acc):.2f}-{100 * max(acc):.2f}%), "
          f"wall time mean {summary['wall_s_mean']:.1f} s (range {min(wall):.1f}-{max(wall):.1f} s)")
    if FLAGS.target:
        reached = sum(a >= FLAGS.target for a in acc)
        summary["target"] = FLAGS.target
        summary["seeds_reaching_target"] = reached
        summary["mean_reaches_target"] = summary["test_accuracy_mean"] >= FLAGS.target
        print(f"target {100 * FLAGS.target:.2f}%: {reached}/{len(acc)} seeds reached it; "
              f"the mean {'did' if summary['mean_reaches_target'] else 'did not'}")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    app.run(main)
