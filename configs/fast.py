"""The speed recipe: a batch-normalised convnet trained for 3 epochs (~3.6 min launch to report on
2 CPU cores, 99.38% test accuracy, mean of seeds 0-2; the issue's aim is 99.5% in 3 minutes).

  python launch.py --config=configs/fast.py --workdir=runs/fast
  python benchmarks/time_to_accuracy.py --config=configs/fast.py --seeds=0,1,2 --target=0.995

Conv32-BN-ReLU-MaxPool, Conv64-BN-ReLU-MaxPool, Dense128, Dense10 (421,738 parameters), SGD with
Nesterov momentum under a one-cycle schedule, light affine augmentation.
"""

import ml_collections

from configs import default


def get_config(arg: str = ""):
    c = default.get_config()
    c.model = ml_collections.ConfigDict(dict(
        name="convnet", conv_widths=(32, 64), dense_widths=(128,), kernel_size=3, activation="relu",
        pooling="max", dropout_rate=0.0, batch_norm=True, space_to_depth=False, pool_before_norm=False))
    c.optimizer.learning_rate = 0.1
    c.schedule.name = "onecycle"
    c.schedule.onecycle_pct_start = 0.25
    c.loss.label_smoothing = 0.1
    c.augment.rotation_deg = 8.0
    c.augment.scale = 0.08
    c.augment.translate_px = 2.0
    c.augment.shear_deg = 0.0
    c.num_epochs = 3
    c.checkpoint.every_steps = 0
    if arg == "smoke":
        default.smoke(c)
        c.dataset.test_split = "test[:1000]"
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/fast.py; use '' or 'smoke'")
    return c
