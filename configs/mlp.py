"""A 784-256-10 multilayer perceptron on MNIST.

  python launch.py --config=configs/mlp.py --workdir=runs/mlp
  python launch.py --config=configs/mlp.py:smoke --workdir=/tmp/mlp_smoke
"""

import ml_collections

from configs import default


def get_config(arg: str = ""):
    c = default.get_config()
    c.model = ml_collections.ConfigDict(dict(name="mlp", hidden_sizes=(256,), activation="relu", dropout_rate=0.0))
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 1e-4
    c.optimizer.weight_decay_mode = "decoupled"
    # Small shifts and rotations help an MLP; strong ones hurt it.
    c.augment.rotation_deg = 8.0
    c.augment.shear_deg = 0.0
    c.augment.scale = 0.05
    c.augment.translate_px = 1.0
    c.num_epochs = 20
    if arg == "smoke":
        default.smoke(c)
        c.dataset.test_split = "test[:1000]"
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/mlp.py; use '' or 'smoke'")
    return c
