"""ResNet on MNIST: the headline recipe, tuned for accuracy on the validation split.

  python launch.py --config=configs/resnet.py --workdir=runs/resnet
  python launch.py --config=configs/resnet.py:smoke --workdir=/tmp/resnet_smoke

The 24x24 centre of each image (crop_border=2) folded into 12x12x4 (space_to_depth), then a
stem and three stages of two basic blocks, 32/64/128 wide, on 12x12, 6x6 and 3x3 maps; label
smoothing 0.1, cosine schedule, 20 epochs, and a moving average of the weights (ema_decay),
which is what is validated, selected as best and reported. Folding quarters the positions, so
twice the width still trains 1.6x faster than the 16/32/64 network on the 24x24 centre (678 vs
426 img/s here), which buys 20 epochs in the time of 12. Measured here (seeds 0 / 1 / 2), with
the average: best validation 99.68 / 99.66 / 99.68%, test 99.68 / 99.65 / 99.70% (mean
99.68%), the three together 99.70%; without it (the same training, raw weights): validation
99.66 / 99.68 / 99.66%, test 99.63 / 99.59 / 99.68% (mean 99.63%), 28.8 min a run (the
average costs 0.6% more per step).
"""

from configs import default


def get_config(arg: str = ""):
    c = default.get_config()
    c.model.name = "resnet"
    c.model.crop_border = 2
    c.model.space_to_depth = True
    c.model.stem_width = 32
    c.model.stage_widths = (32, 64, 128)
    c.loss.label_smoothing = 0.1
    c.num_epochs = 20
    c.schedule.warmup_epochs = 0.5
    c.ema_decay = 0.999
    if arg == "smoke":
        default.smoke(c)
        c.model.stage_sizes = (1, 1)
        c.model.stage_widths = (8, 16)
        c.model.stem_width = 8
        c.dataset.test_split = "test[:1000]"
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/resnet.py; use '' or 'smoke'")
    return c
