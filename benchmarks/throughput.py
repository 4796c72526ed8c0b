"""Train-step throughput of each recipe's model at its batch size, and the input pipeline's share.

  python benchmarks/throughput.py                       # resnet, cnn, mlp
  python benchmarks/throughput.py --configs=resnet --repeats=7 --steps=10

For each recipe: compile time of the training step, images/s of the step on a batch already
on device, and images/s of what the trainer runs on the whole dataset held on device: the
batch program (gather by index + augmentation) for the next step dispatched ahead of each
train step; the difference is the input pipeline's share.
Figures are medians over --repeats timed runs of --steps steps each; the two variants are
timed in alternation so that machine noise does not land on one of them.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import time_alternating  # noqa: E402
from hwrjax import models  # noqa: E402
from hwrjax.core import augment, losses, optim, rng, train_state  # noqa: E402
from hwrjax.core import steps as steps_lib  # noqa: E402
from hwrjax.training import loop, parallel  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["resnet", "cnn", "mlp"], "Recipes under configs/ to measure.")
flags.DEFINE_integer("steps", 10, "Steps per timed run.")
flags.DEFINE_integer("repeats", 5, "Timed runs; the median is reported.")
flags.DEFINE_integer("num_train", 55_000, "Size of the on-device training set the input pipeline draws from.")
flags.DEFINE_string("output", "", "Optional JSON file for the figures.")


def measure(name: str) -> dict:
    config = importlib.import_module(f"configs.{name}").get_config()
    mesh = parallel.make_mesh()
    b = config.batch_size
    model = models.create_model(config.model, 10, dtype=config.dtype)
    tx = optim.make_optimizer(config, optim.make_schedule(config, FLAGS.num_train // b, config.num_epochs))
    keys = rng.RunKeys.from_seed(0)
    loss_fn = losses.get_loss(config.loss)
    state = train_state.create_train_state(model, tx, keys.init)
    data_rng = np.random.default_rng(0)
    images = jnp.asarray(data_rng.integers(0, 256, (FLAGS.num_train, 28, 28, 1), dtype=np.uint8))
    labels = jnp.asarray(data_rng.integers(0, 10, FLAGS.num_train).astype(np.int32))
    batch = {"image": steps_lib.to_float_images(images[:b]), "label": labels[:b]}

    plain = jax.jit(lambda s, bt, k: steps_lib.train_step(s, bt, k, loss_fn=loss_fn), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = plain.lower(state, batch, keys.dropout).compile()
    compile_s = time.perf_counter() - start
    batch_fn, step_fn = steps_lib.make_batch_fn(augment.AugmentParams.from_config(config.augment), keys,
                                                FLAGS.num_train, b, mesh), steps_lib.make_step_fn(loss_fn, keys)
    steps_per_epoch = FLAGS.num_train // b
    pipeline = loop.InputPipeline(batch_fn, images, labels, keys.order, FLAGS.num_train, steps_per_epoch,
                                  total_steps=2**30)
    calls = {"n": 0}

    def pipelined(s):
        # What the trainer runs: the batch program (gather + augmentation) for the next step is
        # dispatched ahead of each step. The last step of a timed run also waits for the batch it
        # prepared ahead, so no work of this run spills into the next variant's timing.
        step = calls["n"]
        calls["n"] += 1
        s, metrics = step_fn(s, pipeline.batch(step))
        if calls["n"] % FLAGS.steps == 0:
            jax.block_until_ready(pipeline.pending())
        return s, metrics

    fns = {"step": lambda s: compiled(s, batch, keys.dropout), "train": pipelined}
    states = {"step": state, "train": train_state.create_train_state(model, tx, keys.init)}
    for key, fn in fns.items():  # the first calls of each compile / warm up
        for _ in range(FLAGS.steps if key == "train" else 1):
            states[key], metrics = fn(states[key])
        jax.block_until_ready(metrics)
    medians, states = time_alternating(fns, states, FLAGS.steps, FLAGS.repeats)
    step_s, train_s = medians["step"], medians["train"]
    return {"config": name, "model": config.model.name, "batch_size": b, "compile_s": compile_s,
            "step_images_per_s": b / step_s, "pipeline_images_per_s": b / train_s,
            "input_pipeline_share": max(0.0, (train_s - step_s) / train_s),
            "params": int(sum(x.size for x in jax.tree.leaves(states["train"].params)))}


def main(argv):
    del argv
    rows = [measure(name) for name in FLAGS.configs]
    print(f"{'config':<8} {'batch':>5} {'params':>9} {'compile s':>9} {'step img/s':>10} {'train img/s':>11} "
          f"{'input share':>11}   (jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s), "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
    for r in rows:
        print(f"{r['config']:<8} {r['batch_size']:>5} {r['params']:>9,} {r['compile_s']:>9.1f} "
              f"{r['step_images_per_s']:>10.0f} {r['pipeline_images_per_s']:>11.0f} {r['input_pipeline_share']:>10.1%}")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
