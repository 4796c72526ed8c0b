"""Fine-tune a trained run on a user's own digit images, mixed with MNIST so nothing is forgotten.

    report = finetune("runs/resnet", "my_digits/", "runs/resnet_mine")

`my_digits/` holds one sub-folder per class, named 0..9, of images in any format
`hwrjax.apps.preprocess.load_image` reads; each goes through `to_mnist`. A deterministic share of
each class (`holdout`) is held out to measure the gain; the rest is used for training.

Training continues from the base run's best checkpoint (params and BatchNorm statistics)
with a fresh optimizer of the base recipe's kind and a learning rate (default: a tenth of the
base peak) decayed by a cosine to zero. Each batch takes a `mix` share of the user's
training samples, a pass over them per epoch in an order keyed by fold_in(order key, epoch)
(small sets are thus oversampled), and fills the rest with MNIST training examples drawn
with fold_in(key, step); the base recipe's augmentation and dropout keys are
fold_in(key, step) as in `hwrjax.core.steps`, so a fine-tune is reproducible from its seed.

The defaults (30 epochs, mix 1/8, a tenth of the base peak) were chosen with
benchmarks/finetune_table.py on scikit-learn's real digits (13 writers) from 5, 10 and 20
samples per digit (the README has the tables): the settings tried cut the held-out errors
alike (within the spread of draws), and these kept MNIST test closest to the base run (within
0.04 points on the fast recipe; the headline ResNet lost up to 0.11 at 20 per digit). A larger
share of the user's samples per batch (1/2, 1/4) or the base peak / 3 cost MNIST test up to
0.2 points for no more gain; BatchNorm statistics frozen at the base's did no better.

A fine-tune is a run of the one training loop (`hwrjax.training.loop.train_and_evaluate`) with
its own batch source (`make_mixed_batch_fn`) and a warm start from the base weights: the base
recipe's moving average (when it keeps one; the fine-tune reports and saves the averaged
weights), checkpoints, resume, SIGTERM / Ctrl-C handling and process-0 gating are the loop's.
It runs no validation or selection (the holdout is for reporting): the last weights are best.

The output is a normal workdir (config.json with a `finetune` block naming the base run, the
samples and the options; checkpoints, metrics, calibration.json, report/test_metrics.json) plus
report/finetune.json with the accuracy on the user's held-out and training samples and on
MNIST test, before and after, written last. An interrupted fine-tune (report/finetune.json not
yet written) is resumed by the same command; a finished one is never overwritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from hwrjax.apps import preprocess
from hwrjax.apps import train as train_lib
from hwrjax.core import train_state
from hwrjax.core import augment as augment_lib
from hwrjax.core import losses as losses_lib
from hwrjax.core import rng as rng_lib
from hwrjax.core import steps as steps_lib
from hwrjax.core.errors import ConfigError, DataError, Diverged, HwrjaxError
from hwrjax.inference import loader
from hwrjax.training import loop, parallel
from hwrjax.training import checkpoint as checkpoint_lib
from hwrjax.training import data as data_lib
from hwrjax.training.config_checks import config_as_dict, config_differences
from hwrjax.training.storage import check_new_output, write_json_atomic

__all__ = ["FinetuneError", "FinetuneOptions", "Samples", "check_options", "check_output_workdir", "finetune",
           "load_samples", "split_samples"]

REPORT_NAME = "finetune.json"
# Purpose ids folded into the run's order key: user-sample order and MNIST draws.
_USER_ORDER, _MNIST_DRAW = 0, 1
# The default peak learning rate as a share of the base run's (benchmarks/finetune_table.py).
BASE_LR_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """Settings of a fine-tune; None means "from the base run" (see each field)."""

    epochs: int = 30  # passes over the user's training samples
    mix: float = 0.125  # share of each batch taken from the user's samples; the rest is MNIST
    learning_rate: float | None = None  # peak of the cosine decay; None: BASE_LR_FRACTION of the base peak
    holdout: float = 0.2  # share of each class held out to measure (>= 1 when a class has >= 2)
    batch_size: int | None = None  # None: the base run's batch size
    seed: int | None = None  # None: the base run's seed
    checkpoint: str | int = "best"  # base checkpoint: best, latest or a step
    test_split: str | None = None  # MNIST split reported before/after; None: the base run's


class FinetuneError(HwrjaxError):
    """A fine-tune cannot run as asked; the message says why and what to do."""


# --------------------------------------------------------------------------------------
# The user's samples


@dataclasses.dataclass(frozen=True)
class Samples:
    """A user's images in MNIST form: uint8 [N,28,28,1], labels int32 [N], source paths, skipped files."""

    images: np.ndarray
    labels: np.ndarray
    paths: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (path, why) of files that could not be used
    folder: str = ""  # where they were read from

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> "Samples":
        return Samples(self.images[index], self.labels[index], tuple(self.paths[i] for i in index),
                       folder=self.folder)

    def as_split(self) -> data_lib.Split:
        return data_lib.Split(images=self.images, labels=self.labels)


def _class_folders(folder: str, num_classes: int) -> tuple[list[tuple[int, str]], list[tuple[str, str]]]:
    """(label, path) of each class sub-folder; stray top-level files are returned as skipped."""
    if not os.path.isdir(folder):
        raise FinetuneError(f"{folder} is not a folder; pass --samples=FOLDER holding sub-folders 0..9 of images")
    classes, skipped = [], []
    names = [str(i) for i in range(num_classes)]
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry.startswith("."):
            continue
        if not os.path.isdir(path):
            skipped.append((path, "not in a class sub-folder; put it in a sub-folder named by its digit"))
        elif entry not in names:
            raise FinetuneError(f"{path} is not a class folder: sub-folders of {folder} must be named "
                                f"0..{num_classes - 1} after the digit they hold; rename or move it")
        else:
            classes.append((int(entry), path))
    return classes, skipped


def load_samples(folder: str, num_classes: int = 10) -> Samples:
    """Reads FOLDER/<class>/<image> through `to_mnist`; unusable files are skipped and listed.

    Raises FinetuneError for a missing folder, a sub-folder not named 0..num_classes-1, or no
    usable image at all.
    """
    folder = os.path.abspath(os.path.expanduser(folder))
    classes, skipped = _class_folders(folder, num_classes)
    images, labels, paths = [], [], []
    for label, class_dir in sorted(classes):
        for name in sorted(os.listdir(class_dir)):
            path = os.path.join(class_dir, name)
            if name.startswith("."):
                continue
            if os.path.isdir(path):
                skipped.append((path, "a folder inside a class folder is not read; move its images up"))
                continue
            try:
                digit = preprocess.to_mnist(preprocess.load_image(path))
            except (preprocess.ImageError, OSError) as e:
                skipped.append((path, str(e)))
                continue
            images.append(np.round(np.clip(digit, 0.0, 1.0) * 255.0).astype(np.uint8))
            labels.append(label)
            paths.append(path)
    for path, why in skipped:
        logging.warning("Skipping %s: %s", path, why)
    if not images:
        found = f"{len(skipped)} file(s), none usable" if skipped else "no image files"
        raise FinetuneError(f"{folder} has {found} in sub-folders 0..{num_classes - 1}; put images of each digit "
                            "in the sub-folder named after it")
    return Samples(images=np.stack(images)[..., None], labels=np.asarray(labels, np.int32), paths=tuple(paths),
                   skipped=tuple(skipped), folder=folder)


def split_samples(labels: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: (train indices, holdout indices).

    A class of n >= 2 samples holds out round(holdout * n), at least 1 and at most n - 1;
    a class with a single sample keeps it for training. holdout=0 holds out nothing.
    """
    if not 0.0 <= holdout < 1.0:
        raise FinetuneError(f"holdout must be in [0, 1), got {holdout}")
    train, held = [], []
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        order = index[np.random.default_rng([int(seed), int(label)]).permutation(len(index))]
        k = 0 if holdout == 0 or len(index) < 2 else min(len(index) - 1, max(1, round(holdout * len(index))))
        held.extend(order[:k].tolist())
        train.extend(order[k:].tolist())
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(held, np.int64))


# --------------------------------------------------------------------------------------
# Settings and output checks (all before any expensive work)


def _unfinished_finetune(path: str) -> bool:
    """True when `path` holds a fine-tune that has not finished (config.json with a `finetune`
    block, no report/finetune.json yet): the same command resumes it."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path) or os.path.exists(os.path.join(path, "report", REPORT_NAME)):
        return False
    try:
        return "finetune" in checkpoint_lib.read_config_json(config_path)
    except HwrjaxError:
        return False


def check_output_workdir(output: str, base: str) -> str:
    """The absolute output path; raises FinetuneError unless it is new (or empty) and not the base
    run's, or holds an unfinished fine-tune (which `finetune` then resumes)."""
    path = os.path.abspath(os.path.expanduser(output))
    if path == os.path.abspath(base):
        raise FinetuneError("--output-workdir must differ from --workdir; the base run is never changed")
    if _unfinished_finetune(path):
        return path
    return check_new_output(path, "--output-workdir", FinetuneError, folder_ok=True)


def check_options(o: FinetuneOptions) -> None:
    """Raises FinetuneError (one line naming the fix) for an option out of range, before any work."""
    if isinstance(o.epochs, bool) or not isinstance(o.epochs, int) or o.epochs <= 0:
        raise FinetuneError(f"epochs must be a positive integer, got {o.epochs!r}")
    if not 0.0 < o.mix <= 1.0:
        raise FinetuneError(f"mix (share of each batch from your samples) must be in (0, 1], got {o.mix}")
    if o.learning_rate is not None and not o.learning_rate > 0:
        raise FinetuneError(f"learning_rate must be > 0, got {o.learning_rate}")
    if o.batch_size is not None and (isinstance(o.batch_size, bool) or not isinstance(o.batch_size, int)
                                     or o.batch_size <= 0):
        raise FinetuneError(f"batch_size must be a positive integer, got {o.batch_size!r}")
    if not 0.0 <= o.holdout < 1.0:
        raise FinetuneError(f"holdout must be in [0, 1), got {o.holdout}")


def finetune_config(base: ml_collections.ConfigDict, options: FinetuneOptions) -> ml_collections.ConfigDict:
    """The config of the fine-tune: the base recipe (its model, loss, optimizer kind, augmentation
    and moving average) with the fine-tune's batch, seed and schedule. The fine-tune's batch
    source runs under jit (so `parallel` is "jit") and it draws no pictures (`report_plots` off)."""
    c = ml_collections.ConfigDict(json.loads(base.to_json()))
    c.batch_size = int(options.batch_size or base.batch_size)
    c.seed = int(base.seed if options.seed is None else options.seed)
    c.num_epochs = int(options.epochs)
    c.optimizer.learning_rate = float(options.learning_rate or base.optimizer.learning_rate * BASE_LR_FRACTION)
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 0.0
    c.schedule.final_lr_fraction = 0.0
    c.early_stopping.patience_epochs = 0
    c.parallel = "jit"
    c.report_plots = False
    if options.test_split:
        c.dataset.test_split = options.test_split
    return c


# --------------------------------------------------------------------------------------
# Training: the loop of hwrjax.training with a batch source of its own


def make_mixed_batch_fn(aug: augment_lib.AugmentParams, keys: rng_lib.RunKeys, num_user: int, user_per_batch: int,
                        num_mnist: int, mnist_per_batch: int, mesh: jax.sharding.Mesh):
    """jit(user_images, user_labels, mnist_images, mnist_labels, step) -> the augmented batch of step `step`.

    The batch's user part continues a pass over the user's samples in the order of epoch e
    (a permutation keyed by fold_in(user order key, e)); the MNIST part is drawn uniformly
    with fold_in(MNIST key, step); the augmentation is keyed by fold_in(keys.augment, step).
    All of it is a function of (seed, step), so a resumed fine-tune sees the same batches.
    """
    user_key = jax.random.fold_in(keys.order, _USER_ORDER)
    mnist_key = jax.random.fold_in(keys.order, _MNIST_DRAW)
    batch_sharding = NamedSharding(mesh, P("data"))

    def user_index(position: jnp.ndarray) -> jnp.ndarray:
        epoch, offset = position // num_user, position % num_user
        return jax.random.permutation(jax.random.fold_in(user_key, epoch), num_user)[offset]

    def batch_of(user_images, user_labels, mnist_images, mnist_labels, step):
        positions = step * user_per_batch + jnp.arange(user_per_batch)
        u = jax.vmap(user_index)(positions)
        m = jax.random.randint(jax.random.fold_in(mnist_key, step), (mnist_per_batch,), 0, max(num_mnist, 1))
        images = jnp.concatenate([user_images[u], mnist_images[m]])
        labels = jnp.concatenate([user_labels[u], mnist_labels[m]])
        images = augment_lib.augment_batch(steps_lib.to_float_images(images), jax.random.fold_in(keys.augment, step),
                                           aug)
        return {"image": jax.lax.with_sharding_constraint(images, batch_sharding),
                "label": jax.lax.with_sharding_constraint(labels, batch_sharding)}

    return jax.jit(batch_of)


def _as_state(model: loader.LoadedModel, mesh: jax.sharding.Mesh) -> train_state.TrainState:
    """A loaded model as the state `loop.make_evaluate` reads, replicated over the mesh."""
    replicated = NamedSharding(mesh, P())
    put = lambda tree: jax.tree.map(lambda x: parallel.put_replicated(np.asarray(x), replicated), tree)
    return train_state.TrainState.create(apply_fn=model.apply_fn, tx=optax.identity(),
                                         params=put(model.variables["params"]),
                                         batch_stats=put(model.variables.get("batch_stats", {})))


def _predictions(model: loader.LoadedModel, images: np.ndarray) -> list[int]:
    logits = jax.jit(lambda v, x: model.apply_fn(v, steps_lib.to_float_images(x), train=False))(model.variables,
                                                                                                 images)
    return [int(i) for i in np.argmax(np.asarray(logits), -1)]


def _measure(evaluate, state, sets: dict) -> dict:
    return {name: evaluate(state, eval_set) for name, eval_set in sets.items() if eval_set is not None}


def _samples_digest(samples: Samples) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(samples.images).tobytes())
    h.update(np.ascontiguousarray(samples.labels, np.int32).tobytes())
    return h.hexdigest()


def finetune(workdir: str, samples: str | Samples, output_workdir: str,
             options: FinetuneOptions = FinetuneOptions()) -> dict:
    """Fine-tunes the run in `workdir` on `samples` (a folder or Samples) into `output_workdir`.

    The fine-tune is a run of the training loop (hwrjax.training.loop) with its own batch source
    and a warm start from the base run's weights: it checkpoints, keeps the base recipe's moving
    average, stops cleanly on SIGTERM / Ctrl-C (raising Preempted), and the same call resumes it
    where it stopped, ending bit for bit where an uninterrupted fine-tune ends. Returns the report
    also written to OUTPUT/report/finetune.json.
    """
    start = time.time()
    check_options(options)
    refused = None
    try:
        output = check_output_workdir(output_workdir, workdir)
    except FinetuneError as e:
        refused = e
    # Every process checks OUTPUT before any process writes to it (any_process is a collective).
    if parallel.any_process(refused is not None):
        raise refused or FinetuneError(f"another process of this run refused --output-workdir={output_workdir}; "
                                       "see its error")
    base = loader.load_model(workdir, options.checkpoint)
    config = finetune_config(base.config, options)
    mesh = parallel.make_mesh()
    if config.batch_size % mesh.devices.size:
        raise ConfigError(f"batch size {config.batch_size} does not divide over {mesh.devices.size} devices; "
                          f"use a multiple of {mesh.devices.size}")
    if isinstance(samples, (str, os.PathLike)):
        samples = load_samples(os.fspath(samples), base.num_classes)
    if len(samples) == 0:
        raise FinetuneError("no samples to fine-tune on; pass a folder with images in sub-folders 0..9")
    if int(samples.labels.max()) >= base.num_classes:
        raise FinetuneError(f"sample labels go up to {int(samples.labels.max())} but the model has "
                            f"{base.num_classes} classes")
    train_index, holdout_index = split_samples(samples.labels, options.holdout, config.seed)
    user_train, user_holdout = samples.subset(train_index), samples.subset(holdout_index)
    user_per_batch = int(round(options.mix * config.batch_size))
    if user_per_batch < 1:
        raise FinetuneError(f"mix {options.mix} of batch {config.batch_size} takes no sample of yours; raise --mix")
    mnist_per_batch = config.batch_size - user_per_batch
    steps_per_epoch = math.ceil(len(user_train) / user_per_batch)
    total_steps = steps_per_epoch * config.num_epochs

    settings = {
        "base_workdir": os.path.abspath(workdir), "base_checkpoint_step": base.step,
        "samples": samples.folder, "samples_sha256": _samples_digest(samples),
        "num_samples": len(samples), "num_train_samples": len(user_train),
        "num_holdout_samples": len(user_holdout), "holdout": float(options.holdout), "mix": float(options.mix),
        "user_per_batch": user_per_batch, "epochs": config.num_epochs, "steps": total_steps,
        "learning_rate": float(config.optimizer.learning_rate)}
    config.finetune = settings
    if os.path.isfile(os.path.join(output, "config.json")):
        saved = checkpoint_lib.read_config_json(os.path.join(output, "config.json"))
        diffs = config_differences(saved, config_as_dict(config))
        if diffs:
            raise FinetuneError(f"{output} holds an unfinished fine-tune with other settings ({'; '.join(diffs)}); "
                                "rerun it as it was started to resume, or pass a new --output-workdir")
        logging.info("Resuming the fine-tune in %s.", output)

    seen: dict = {}

    def mixed_batches(ctx: loop.SourceContext) -> loop.BatchSource:
        """The user's training samples mixed with MNIST training examples (see make_mixed_batch_fn)."""
        if mnist_per_batch and len(ctx.splits.train) == 0:
            raise DataError(f"dataset {config.dataset.name!r} has no training examples to mix in; set --mix=1")
        seen["splits"] = ctx.splits
        replicated = NamedSharding(ctx.mesh, P())
        user_images = parallel.put_replicated(user_train.images, replicated)
        user_labels = parallel.put_replicated(user_train.labels, replicated)
        batch_fn = make_mixed_batch_fn(ctx.augment, ctx.keys, len(user_train), user_per_batch,
                                       len(ctx.splits.train), mnist_per_batch, ctx.mesh)
        return loop.BatchSource(steps_per_epoch, lambda step: batch_fn(
            user_images, user_labels, ctx.train_images, ctx.train_labels, np.int32(step)))

    try:
        test = loop.train_and_evaluate(config, output, report=train_lib.TrainingReport(), batches=mixed_batches,
                                       init_variables=base.variables, validate=False)
    except Diverged as e:
        raise Diverged(f"fine-tuning {str(e).split(';')[0].removeprefix('training ')}; nothing non-finite was "
                       f"saved; lower --learning-rate and pass a new --output-workdir") from None
    tuned = loader.load_model(output)

    # Before and after, measured on every process (the evaluation runs over the whole mesh).
    splits = seen["splits"]
    loss_fn = losses_lib.get_loss(config.loss)

    def eval_set(split: data_lib.Split | None) -> loop.EvalSet | None:
        # Small user sets get a small eval batch (padding them to the MNIST eval batch is waste).
        if split is None or len(split) == 0:
            return None
        n = mesh.devices.size
        batch = min(config.eval_batch_size, n * math.ceil(len(split) / n))
        return loop.EvalSet(split, batch, mesh)

    evaluate = loop.make_evaluate(loss_fn, mesh)
    sets = {"holdout": eval_set(user_holdout.as_split()), "train_samples": eval_set(user_train.as_split()),
            "mnist_test": eval_set(splits.test)}
    before = _measure(evaluate, _as_state(base, mesh), sets)
    after = _measure(evaluate, _as_state(tuned, mesh), sets)
    logging.info("Before: %s", {k: round(v["accuracy"], 4) for k, v in before.items()})
    logging.info("After: %s", {k: round(v["accuracy"], 4) for k, v in after.items()})
    holdout_before = _predictions(base, user_holdout.images) if len(user_holdout) else []
    holdout_after = _predictions(tuned, user_holdout.images) if len(user_holdout) else []
    report = {
        "workdir": output, **settings,
        "class_counts": {str(c): int(np.sum(samples.labels == c)) for c in range(base.num_classes)},
        "skipped": [{"path": p, "error": e} for p, e in samples.skipped],
        "before": before, "after": after,
        "holdout_files": [{"path": p, "label": int(y), "before": b, "after": a} for p, y, b, a in
                          zip(user_holdout.paths, user_holdout.labels, holdout_before, holdout_after)],
        "mnist_split": config.dataset.test_split, "train_time_s": float(test["wall_time_s"]),
        "total_time_s": time.time() - start,
    }
    if jax.process_index() == 0:
        # Written last: its presence marks the fine-tune finished (a rerun into OUTPUT is refused).
        write_json_atomic(os.path.join(output, "report", REPORT_NAME), report)
    return report
