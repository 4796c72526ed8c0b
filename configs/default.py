"""Defaults for every hwrjax config field; each recipe imports this and overrides.

Run a recipe:  python launch.py --config=configs/resnet.py --workdir=runs/resnet
Override:      --config.optimizer.learning_rate=0.05 --config.num_epochs=5
Tiny variant:  --config=configs/resnet.py:smoke
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Root of all randomness: init, data order, augmentation and dropout keys derive from it.
    c.seed = 0

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "mnist"  # any tfds dataset of 28x28x1 images: mnist, fashion_mnist, kmnist, emnist/digits
    c.dataset.data_dir = ""  # tfds data dir; empty means $TFDS_DATA_DIR, else ~/tensorflow_datasets
    c.dataset.download = True  # try to download a missing dataset (fails cleanly without network)
    c.dataset.validation_size = 5000  # last N examples of the official train split, used for model selection
    c.dataset.test_split = "test"  # reported at the end, never used for selection
    c.dataset.limit_train = 0  # >0: use only the first N training examples (smoke tests, quick looks)

    # Model, chosen by name; the other fields are passed to its constructor.
    #   mlp:     hidden_sizes, activation, dropout_rate
    #   convnet: conv_widths, dense_widths, kernel_size, activation, pooling, dropout_rate, batch_norm,
    #            space_to_depth, pool_before_norm (Conv-Pool-BN-Act instead of Conv-BN-Act-Pool), crop_border
    #   resnet:  stage_sizes, stage_widths, stem_width, block (basic|preact), activation, pooling,
    #            dropout_rate, space_to_depth, crop_border
    # activation: relu | leaky_relu (slope 0.01) | prelu (a learned negative slope per channel, from 0.25;
    #             not weight-decayed) | elu | gelu;  pooling: max | avg
    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet"
    c.model.stage_sizes = (2, 2, 2)  # residual blocks per stage; stages after the first halve the size
    c.model.stage_widths = (16, 32, 64)  # channels per stage
    c.model.stem_width = 16
    c.model.block = "basic"
    c.model.activation = "relu"
    c.model.pooling = "avg"  # global pooling before the classifier
    c.model.dropout_rate = 0.0
    c.model.space_to_depth = False  # fold 2x2 pixel blocks into channels first: every stage at half resolution
    c.model.crop_border = 0  # pixels cut from each image edge before the first layer (convnet, resnet)

    c.loss = ml_collections.ConfigDict()
    # cross_entropy (softmax) | bce (binary cross-entropy: one sigmoid per class against the one-hot
    # target, summed over classes; its sigmoids are normalized to sum to 1 when read as probabilities)
    # | mse | hinge | huber (the last three are read through a softmax)
    c.loss.name = "cross_entropy"
    c.loss.label_smoothing = 0.0  # cross_entropy and bce only
    c.loss.hinge_margin = 1.0  # hinge only
    c.loss.huber_delta = 1.0  # huber only

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # sgd | adam | adamw | rmsprop
    c.optimizer.learning_rate = 0.1  # peak learning rate of the schedule
    c.optimizer.momentum = 0.9  # sgd and rmsprop; 0 disables
    c.optimizer.nesterov = True  # sgd and rmsprop momentum
    c.optimizer.b1 = 0.9  # adam, adamw
    c.optimizer.b2 = 0.999  # adam, adamw
    c.optimizer.eps = 1e-8  # adam, adamw, rmsprop
    c.optimizer.rms_decay = 0.9  # rmsprop
    c.optimizer.weight_decay = 5e-4  # applied to kernels only, never biases or norm scales
    c.optimizer.weight_decay_mode = "l2"  # l2 (as if added to the loss) | decoupled (AdamW-style); adamw forces decoupled
    c.optimizer.l1 = 0.0  # L1 penalty strength on kernels
    c.optimizer.grad_clip_norm = 0.0  # global-norm clipping; 0 disables

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "cosine"  # constant | piecewise | exponential | cosine | onecycle
    c.schedule.warmup_epochs = 1.0  # linear warmup from 0 (not used by onecycle)
    c.schedule.final_lr_fraction = 0.0  # cosine: final lr as a fraction of the peak
    c.schedule.decay_factor = 0.1  # piecewise: factor at each boundary; exponential: factor per epoch
    c.schedule.boundaries_epochs = (5.0, 8.0)  # piecewise only
    c.schedule.onecycle_pct_start = 0.3  # onecycle: share of training spent rising

    c.augment = ml_collections.ConfigDict()
    c.augment.enabled = True
    c.augment.rotation_deg = 10.0
    c.augment.scale = 0.1  # zoom in [1 - s, 1 + s]
    c.augment.translate_px = 2.0
    c.augment.shear_deg = 5.0  # slant: horizontal shear angle drawn in [-s, s]
    c.augment.elastic_alpha = 0.0  # elastic distortion magnitude in pixels; 0 disables
    c.augment.elastic_sigma = 4.0  # smoothness (Gaussian sigma, pixels) of the elastic displacement
    # How writers and capture differ (each example draws its own; 0 turns a transform off):
    c.augment.stroke_thicken_px = 0.0  # strokes grown by up to this many pixels a side (grey dilation); <= 3
    c.augment.stroke_thin_px = 0.0  # or thinned by up to this many (grey erosion): change drawn in [-thin, thicken]
    c.augment.aspect = 0.0  # width scaled by a factor drawn log-uniformly in [1/(1+a), 1+a]
    c.augment.stretch_prob = 0.0  # chance a digit is stretched to fill a square box (shorter side to the longer)
    c.augment.resolution_prob = 0.0  # chance a digit is rendered at a low resolution (box averaged) and back up
    c.augment.resolution_min_px = 8.0  # that resolution: the digit's 20 px box drawn in [min, max] px (<= 20)
    c.augment.resolution_max_px = 16.0
    c.augment.binarize_prob = 0.0  # chance of binarizing at a threshold drawn in [0.25, 0.75]
    c.augment.quantize_prob = 0.0  # chance of rounding to a number of grey levels drawn in 3..16

    # Exponential moving average of the weights (and BatchNorm statistics), updated after every step;
    # when > 0 it is what is validated, selected as best, reported and delivered. 0 keeps none.
    # The decay after step t is min(ema_decay, (1+t)/(10+t)): the average spans roughly the last
    # t/9 steps until that exceeds 1/(1-ema_decay) steps (t > 8990 for 0.999).
    c.ema_decay = 0.0
    # BatchNorm statistics of the weights above recomputed before each validation, for the best
    # checkpoint and the report: each layer's batch mean and variance in train mode, averaged over
    # the first N training images in batches of eval_batch_size, unaugmented (the running averages
    # follow the last ~10 augmented batches, or average statistics of other weights). 0 keeps the
    # running averages; N > 0 must be at least eval_batch_size.
    c.batch_stats_examples = 0

    c.batch_size = 128  # global batch over all devices and processes
    c.eval_batch_size = 1000  # padded and masked: every example counts
    c.num_epochs = 10

    c.log_every_steps = 100  # train metrics (and the only host sync) every N steps
    c.progress = True  # a progress display when stderr is a terminal
    c.report_plots = True  # training curves, confusion matrix and mistakes as PNG in WORKDIR/report at the end

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # also saved at every epoch end; 0 means epoch ends only
    c.checkpoint.keep = 3  # latest checkpoints kept for resuming (the best is kept apart)
    c.checkpoint.async_save = True

    c.early_stopping = ml_collections.ConfigDict()
    c.early_stopping.patience_epochs = 0  # stop after N epochs without validation improvement; 0 disables
    c.early_stopping.min_delta = 0.0  # improvement in validation accuracy that counts

    c.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.parallel = "jit"  # jit: one program sharded over a ('data',) mesh | pmap: the same step under jax.pmap
    return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks any recipe to a run of a few seconds (tests, quick looks)."""
    c.dataset.validation_size = 500
    c.dataset.limit_train = 2048
    c.num_epochs = 2
    c.batch_size = 64
    c.eval_batch_size = 256  # divides over 1, 2, 4 or 8 devices
    c.log_every_steps = 8
    c.checkpoint.every_steps = 10
    c.schedule.warmup_epochs = 0.5
    return c
