"""ResNet on MNIST: the headline recipe, for reading other people's handwriting.

  python launch.py --config=configs/resnet.py --workdir=runs/resnet
  python launch.py --config=configs/resnet.py:mnist --workdir=runs/resnet-mnist   # MNIST accuracy only
  python launch.py --config=configs/resnet.py:smoke --workdir=/tmp/resnet_smoke

The 24x24 centre of each image (crop_border=2) folded into 12x12x4 (space_to_depth), then a
stem and three stages of two basic blocks, 32/64/128 wide, on 12x12, 6x6 and 3x3 maps; label
smoothing 0.1, cosine schedule, 20 epochs, and a moving average of the weights (ema_decay),
which is what is validated, selected as best and reported. Folding quarters the positions, so
twice the width still trains 1.5x faster than the 16/32/64 network on the 24x24 centre.

Other writers (issue 22): the recipe draws, per example, strokes up to 1 px a side thicker,
widths scaled within [1/1.2, 1.2], 5% of digits stretched to fill a square box, 30% rendered at
8-16 px and back, 20% binarized and 20% at 3-16 grey levels (config.augment). Chosen on validation
and scikit-learn's digits (benchmarks/dev_digits.py), never on test, with fast-recipe-sized runs:
there this set moved validation 99.58 -> 99.50% and the development set 86.5 -> 98.1%.

One recipe does not serve both goals, measured here (same machine kind, 2 CPU cores):
- this recipe (writer and capture augmentation), seeds 0 / 1 / 2: best validation 99.74 / 99.66 /
  99.68%, MNIST test 99.59 / 99.60 / 99.63% (mean 99.61%, under the 99.65% the `mnist` variant
  keeps); scikit-learn's real digits read through the predict path 98.2% (seed 0).
- the `mnist` variant (the same network with the writer and capture transforms off), seeds
  0 / 1 / 2: best validation 99.66 / 99.56 / 99.72%, test 99.64 / 99.67 / 99.69% (mean 99.67%),
  the three together 99.68%; measured before the transforms existed (at strength 0 they draw
  nothing); on scikit-learn's digits the fast network without them reads 86.5%.
The augmented recipe costs about 0.06 points of MNIST test and gains about 12 points on other
writers, so it is the headline and what `hwrjax predict` and `hwrjax serve` are meant to read
with; train the `mnist` variant for MNIST figures alone.
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
    # Other writers and captures (chosen on validation and scikit-learn's digits, see above):
    # thicker strokes, proportions, digits stretched to fill a box, low resolution, two or few grey levels.
    c.augment.stroke_thicken_px = 1.0
    c.augment.aspect = 0.2
    c.augment.stretch_prob = 0.05
    c.augment.resolution_prob = 0.3
    c.augment.binarize_prob = 0.2
    c.augment.quantize_prob = 0.2
    if arg == "mnist":
        # The writer and capture transforms back to their defaults (off): the MNIST-accuracy recipe.
        defaults = default.get_config().augment
        for name in ("stroke_thicken_px", "aspect", "stretch_prob", "resolution_prob", "binarize_prob",
                     "quantize_prob"):
            c.augment[name] = defaults[name]
    elif arg == "smoke":
        default.smoke(c)
        c.model.stage_sizes = (1, 1)
        c.model.stage_widths = (8, 16)
        c.model.stem_width = 8
        c.dataset.test_split = "test[:1000]"
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/resnet.py; use '', 'mnist' or 'smoke'")
    return c
