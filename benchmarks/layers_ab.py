"""What hwrjax.models.layers buy: each recipe's train step with hwrjax's Conv and pools against the same
step with flax's / XLA's own (`layers.flax_reference()`), compiled in one process and timed in
alternation.

  python benchmarks/layers_ab.py                        # fast, cnn, resnet
  python benchmarks/layers_ab.py --configs=resnet --repeats=7

Same parameters, same batch; the first step's losses are compared so a speedup never hides a
different computation. Figures are medians over --repeats timed runs of --steps steps.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import jax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import RecipeStep, time_alternating  # noqa: E402
from hwrjax.models import layers  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["fast", "cnn", "resnet"], "Recipes under configs/ to measure.")
flags.DEFINE_integer("steps", 5, "Steps per timed run.")
flags.DEFINE_integer("repeats", 5, "Timed runs per variant; medians are reported.")
flags.DEFINE_string("output", "", "Optional JSON file for the figures.")


def measure(name: str) -> dict:
    config = importlib.import_module(f"configs.{name}").get_config()
    setup = RecipeStep(config)
    b = setup.batch_size
    compiled = {"hwrjax": setup.compile()}
    with layers.flax_reference():
        compiled["flax"] = setup.compile()
    texts = {key: c.as_text() for key, c in compiled.items()}
    if texts["hwrjax"] == texts["flax"]:
        sys.exit("layers_ab: both variants compiled to the same program; nothing to compare")
    states, first_loss = {}, {}
    for key, fn in compiled.items():
        states[key], metrics = setup.bind(fn)(setup.new_state())
        first_loss[key] = float(metrics["loss"])
    fns = {key: setup.bind(fn) for key, fn in compiled.items()}
    medians, _ = time_alternating(fns, states, FLAGS.steps, FLAGS.repeats)
    return {"config": name, "batch_size": b, "hwrjax_images_per_s": b / medians["hwrjax"],
            "flax_images_per_s": b / medians["flax"], "speedup": medians["flax"] / medians["hwrjax"],
            "first_step_loss_diff": abs(first_loss["hwrjax"] - first_loss["flax"])}


def main(argv):
    del argv
    rows = [measure(name) for name in FLAGS.configs]
    print(f"{'config':<8} {'batch':>5} {'hwrjax img/s':>12} {'flax img/s':>10} {'speedup':>8} {'loss diff':>9}"
          f"   (jax {jax.__version__}, {jax.default_backend()})")
    for r in rows:
        print(f"{r['config']:<8} {r['batch_size']:>5} {r['hwrjax_images_per_s']:>12.0f} {r['flax_images_per_s']:>10.0f} "
              f"{r['speedup']:>7.2f}x {r['first_step_loss_diff']:>9.1e}")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
