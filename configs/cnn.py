"""The classic convnet (Conv32-MaxPool-Conv64-MaxPool-Dense64-Dense10) on MNIST.

  python launch.py --config=configs/cnn.py --workdir=runs/cnn
  python launch.py --config=configs/cnn.py:smoke --workdir=/tmp/cnn_smoke
"""

import ml_collections

from configs import default


def get_config(arg: str = ""):
    c = default.get_config()
    c.model = ml_collections.ConfigDict(dict(
        name="convnet", conv_widths=(32, 64), dense_widths=(64,), kernel_size=3, activation="relu",
        pooling="max", dropout_rate=0.0, batch_norm=False))
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.weight_decay = 1e-4
    c.optimizer.weight_decay_mode = "decoupled"
    c.num_epochs = 6
    if arg == "smoke":
        default.smoke(c)
        c.dataset.test_split = "test[:1000]"
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/cnn.py; use '' or 'smoke'")
    return c
