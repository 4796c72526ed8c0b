"""How much checkpointing slows training at the recipe's checkpoint interval.

  python benchmarks/checkpoint_overhead.py --config=resnet

Times the part of an asynchronous Orbax save that blocks the training loop, and the train
step, on the recipe's model; overhead = blocking save time / (every_steps x step time).
Medians over --repeats.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hwrjax import models  # noqa: E402
from hwrjax.core import losses, optim, rng, train_state  # noqa: E402
from hwrjax.core import steps as steps_lib  # noqa: E402
from hwrjax.training import checkpoint  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "resnet", "Recipe under configs/.")
flags.DEFINE_integer("repeats", 5, "Saves and step batches to time.")


def main(argv):
    del argv
    config = importlib.import_module(f"configs.{FLAGS.config}").get_config()
    model = models.create_model(config.model, 10)
    tx = optim.make_optimizer(config, optim.make_schedule(config, 429, config.num_epochs))
    keys = rng.RunKeys.from_seed(0)
    state = jax.jit(lambda k: train_state.create_train_state(model, tx, k))(keys.init)
    b = config.batch_size
    batch = {"image": jnp.zeros((b, 28, 28, 1)), "label": jnp.zeros((b,), jnp.int32)}
    step = jax.jit(lambda s, bt: steps_lib.train_step(s, bt, keys.dropout, loss_fn=losses.get_loss(config.loss)))
    state, m = step(state, batch)
    jax.block_until_ready(m)
    step_times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        for _ in range(5):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        step_times.append((time.perf_counter() - start) / 5)
    with tempfile.TemporaryDirectory() as d:
        ckpt = checkpoint.Checkpointer(d, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
        block_times = []
        for i in range(FLAGS.repeats + 1):
            start = time.perf_counter()
            ckpt.save(i + 1, state, {"best_val_accuracy": 0.0})
            block_times.append(time.perf_counter() - start)
            # Let the background write finish, as it does during the next many steps of training.
            ckpt.wait()
        ckpt.close()
    block = float(np.median(block_times[1:]))  # the first save also creates directories
    step_s = float(np.median(step_times))
    every = config.checkpoint.every_steps
    print(f"{FLAGS.config}: step {step_s * 1000:.1f} ms, blocking part of a save {block * 1000:.1f} ms, "
          f"every {every} steps -> overhead {block / (every * step_s):.2%} "
          f"(async={config.checkpoint.async_save}, {sum(x.size for x in jax.tree.leaves(state.params)):,} params)")


if __name__ == "__main__":
    app.run(main)
