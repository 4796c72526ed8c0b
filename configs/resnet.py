"""ResNet on MNIST: the headline recipe, tuned for accuracy on the validation split.

  python launch.py --config=configs/resnet.py --workdir=runs/resnet
  python launch.py --config=configs/resnet.py:smoke --workdir=/tmp/resnet_smoke

Three stages of two basic blocks (16/32/64) on the 24x24 centre of each image (crop_border=2,
1.37x the step rate of the full 28x28), label smoothing 0.1, cosine schedule, 12 epochs; the
checkpoint reported is the one best on validation. Measured here (seeds 0 / 1 / 2): best
validation 99.60 / 99.66 / 99.58%, test 99.58 / 99.67 / 99.50% (mean 99.58%), 26 min a run; the
8-epoch uncropped recipe before it had validation 99.56 / 99.54% and test 99.61 / 99.55 / 99.60%.
"""

from configs import default


def get_config(arg: str = ""):
    c = default.get_config()
    c.model.name = "resnet"
    c.model.crop_border = 2
    c.loss.label_smoothing = 0.1
    c.num_epochs = 12
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
