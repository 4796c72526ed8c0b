"""ResNet on MNIST: the headline recipe.

  python launch.py --config=configs/resnet.py --workdir=runs/resnet
  python launch.py --config=configs/resnet.py:smoke --workdir=/tmp/resnet_smoke
"""

from configs import default


def get_config(arg: str = ""):
    c = default.get_config()
    c.model.name = "resnet"
    c.num_epochs = 8
    c.schedule.warmup_epochs = 0.5
    if arg == "smoke":
        default.smoke(c)
        c.model.stage_sizes = (1, 1)
        c.model.stage_widths = (8, 16)
        c.model.stem_width = 8
        c.dataset.test_split = "test[:1000]"
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/resnet.py; use '' or 'smoke'")
    return c
