"""ResNet on MNIST: the headline recipe, tuned for accuracy on the validation split.

  python launch.py --config=configs/resnet.py --workdir=runs/resnet
  python launch.py --config=configs/resnet.py:smoke --workdir=/tmp/resnet_smoke

The 24x24 centre of each image (crop_border=2) folded into 12x12x4 (space_to_depth), then a
stem and three stages of two basic blocks, 32/64/128 wide, on 12x12, 6x6 and 3x3 maps; label
smoothing 0.1, cosine schedule, 20 epochs, and a moving average of the weights (ema_decay),
which is what is validated, selected as best and reported. Folding quarters the positions, so
twice the width still trains 1.5x faster than the 16/32/64 network on the 24x24 centre (742 vs
504 img/s here), which buys 20 epochs in the time of 13. Measured here (seeds 0 / 1 / 2): best
validation 99.66 / 99.56 / 99.72%, test 99.64 / 99.67 / 99.69% (mean 99.67%), the three
together 99.68%; 26.7 min a run. With every kernel gradient as one patch-matrix product (before
layers.PATCH_MATRIX_LIMIT) the same recipe gave test 99.68 / 99.65 / 99.70%: the two differ only
in summation order, so the gap is run-to-run noise. Without the average (raw weights, patch
matrices): test 99.63 / 99.59 / 99.68% (mean 99.63%). BatchNorm statistics recomputed on 5,000 clean
training images (--config.batch_stats_examples=5000) were measured and not adopted: on the same
averaged weights validation moved +0.04 / -0.08 / +0.04 / +0.02% and test 0 / 0 / +0.01 / -0.01%
(three seeds part way, seed 0 at the end), and seed 0 selected with them reports the same 99.64%.

Other writers (issue 22): the recipe also draws, per example, strokes up to 1 px a side thicker,
widths scaled within [1/1.2, 1.2], 5% of digits stretched to fill a square box, 30% rendered at
8-16 px and back, 20% binarized and 20% at 3-16 grey levels (config.augment). Chosen on validation
and scikit-learn's digits (benchmarks/dev_digits.py), never on test, with fast-recipe-sized runs:
there this set moved validation 99.58 -> 99.50% and the development set 86.5 -> 98.1%. The figures
above are of the recipe before it. With it, seed 0 (finished, 20 epochs): best validation 99.74%
at epoch 15, the checkpoint selected, which reads MNIST test 99.59% and the development set
98.50%. That test figure is below the old seed 0's 99.64% and the 99.65% goal. Seeds 1 and 2
are still to be measured: until then the 3-seed mean >= 99.65% on test is unverified (if it falls
short, lower the capture probabilities first: slant and aspect cost no validation on the fast net).
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
    if arg == "smoke":
        default.smoke(c)
        c.model.stage_sizes = (1, 1)
        c.model.stage_widths = (8, 16)
        c.model.stem_width = 8
        c.dataset.test_split = "test[:1000]"
    elif arg:
        raise ValueError(f"unknown variant {arg!r} of configs/resnet.py; use '' or 'smoke'")
    return c
