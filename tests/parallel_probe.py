"""Runs a few training steps with a given parallel mode and prints losses, BN statistics and
the moving average of the weights.

Used by test_parallel.py in subprocesses with different simulated device counts:
  python tests/parallel_probe.py jit|pmap STEPS
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import resnet  # noqa: E402
from hwrjax import models  # noqa: E402
from hwrjax.core import augment, losses, optim, rng, train_state  # noqa: E402
from hwrjax.core import steps as steps_lib  # noqa: E402
from hwrjax.training import parallel  # noqa: E402


EARLY_STEPS = 3  # BN statistics are also recorded after this many steps, before rounding drift compounds
EMA_DECAY = 0.9


def main(mode: str, steps: int) -> None:
    c = resnet.get_config("smoke")
    num_train, batch = 512, 32
    data = np.random.default_rng(0)
    labels = data.integers(0, 10, num_train).astype(np.int32)
    images = np.zeros((num_train, 28, 28, 1), np.uint8)
    for i, y in enumerate(labels):  # a learnable pattern per class, plus noise
        images[i, 2 * y:2 * y + 4, 4:24, 0] = 200
    images = np.clip(images + data.integers(0, 60, images.shape), 0, 255).astype(np.uint8)
    keys = rng.RunKeys.from_seed(0)
    model = models.create_model(c.model, 10, bn_axis_name=steps_lib.PMAP_AXIS if mode == "pmap" else None)
    tx = optim.make_optimizer(c, optim.make_schedule(c, num_train // batch, 4))
    state = train_state.init_ema(train_state.create_train_state(model, tx, keys.init))
    aug = augment.AugmentParams.from_config(c.augment)
    order = steps_lib.epoch_order(keys.order, 0, num_train)
    losses_out, early = [], None
    if mode == "pmap":
        devices = jax.local_devices()
        step = steps_lib.make_fused_pmap_step(losses.cross_entropy, aug, keys, num_train, batch, EMA_DECAY)
        state = parallel.replicate_for_pmap(state, devices)
        args = [parallel.replicate_for_pmap(a, devices) for a in (images, labels, np.asarray(order))]
        for _ in range(steps):
            state, m = step(state, *args)
            losses_out.append(float(m["loss"][0]))
            if len(losses_out) == EARLY_STEPS:
                early = jax.tree.map(lambda x: np.asarray(x[0]), (state.batch_stats, state.ema, state.params))
        copies = [np.asarray(x) for x in jax.tree.leaves(state.batch_stats)]  # [devices, ...] each
    else:
        mesh = parallel.make_mesh()
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        step = steps_lib.make_fused_train_step(losses.cross_entropy, aug, keys, num_train, batch, mesh, EMA_DECAY)
        state = jax.device_put(state, sharding)
        args = [parallel.put_replicated(a, sharding) for a in (images, labels, np.asarray(order))]
        for _ in range(steps):
            state, m = step(state, *args)
            losses_out.append(float(m["loss"]))
            if len(losses_out) == EARLY_STEPS:
                early = jax.tree.map(np.asarray, (state.batch_stats, state.ema, state.params))
        # The replicated statistics as every device holds them.
        copies = [np.stack([np.asarray(s.data) for s in x.addressable_shards]) for x in jax.tree.leaves(state.batch_stats)]
    # How far any device's copy of the BatchNorm statistics is from device 0's.
    spread = max(float(np.max(np.abs(c - c[0:1]))) for c in copies)
    assert all(len(c) == jax.device_count() for c in copies)
    flat = lambda tree: {"/".join(str(k.key) for k in path): v.tolist()
                         for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    print(json.dumps({"devices": jax.device_count(), "losses": losses_out, "early_batch_stats": flat(early[0]),
                      "early_ema": flat(early[1]), "early_params": flat(early[2]), "device_spread": spread}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
