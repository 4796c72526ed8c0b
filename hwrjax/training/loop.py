"""The training loop: `train_and_evaluate(config, workdir)` runs a whole recipe.

Data on device, batches gathered by index inside the jitted step (hwrjax.core.steps), the next
batch prepared while the current step runs, periodic validation and checkpoints, resume,
preemption, and a final test report. Work a caller adds at the end of a run (calibration,
pictures) comes in as a `RunReport`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from hwrjax import models as models_lib
from hwrjax.core import augment as augment_lib
from hwrjax.core import batch_stats as batch_stats_lib
from hwrjax.core import losses as losses_lib
from hwrjax.core import optim as optim_lib
from hwrjax.core import rng as rng_lib
from hwrjax.core.errors import ConfigError, Diverged, Preempted, WorkdirBusy
from hwrjax.core.steps import (PMAP_AXIS, epoch_order, eval_step, make_batch_fn, make_fused_pmap_step, make_step_fn,
                               summarize_eval, to_float_images)
from hwrjax.core.train_state import TrainState, averaged, create_train_state, init_ema, with_delivered_batch_stats
from hwrjax.training import parallel, runlock, storage
from hwrjax.training import checkpoint as checkpoint_lib
from hwrjax.training import data as data_lib
from hwrjax.training.config_checks import check_workdir, config_as_dict, config_differences, validate_config
from hwrjax.training.logs import MetricLogger
from hwrjax.training.preemption import StopSignal, agreed_stop, signal_at_step_hook


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    """A finished run as its `RunReport` sees it: the reported weights (the best validation checkpoint,
    else the last state; moving averages when kept) and the data they were trained and measured on."""

    workdir: str
    config: ml_collections.ConfigDict
    state: TrainState
    step: int  # the last training step
    checkpoint_step: int  # the step of the reported weights
    splits: data_lib.Splits


class RunReport:
    """End-of-run work a caller adds to the loop, on process 0 only; this base adds nothing.

    The loop calls `metrics` before it writes report/test_metrics.json (its fields join the test
    metrics there), then writes the test metrics to the log, closes it, and calls `files`.
    """

    def metrics(self, run: FinishedRun) -> dict:
        """Extra fields of test_metrics.json."""
        return {}

    def files(self, run: FinishedRun) -> None:
        """Writes files that need the finished log (metrics.jsonl complete)."""


@dataclasses.dataclass(frozen=True)
class SourceContext:
    """What the loop hands a batch source's factory: the run's config, mesh, keys, augmentation,
    splits, and the training split already on device (replicated)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    keys: rng_lib.RunKeys
    augment: augment_lib.AugmentParams
    splits: data_lib.Splits
    train_images: jax.Array
    train_labels: jax.Array


@dataclasses.dataclass(frozen=True)
class BatchSource:
    """Where a run's training batches come from: `make(step)` dispatches the (jitted) program that
    gathers and augments the batch of training step `step` from device-resident arrays, as a
    function of (seed, step) only, so a resumed run sees the batches of the uninterrupted one;
    an epoch is `steps_per_epoch` steps (the run is config.num_epochs of them)."""

    steps_per_epoch: int
    make: Callable[[int], dict]


def epoch_batches(ctx: SourceContext) -> BatchSource:
    """The recipe's own source: each epoch one pass over the training split in the order
    `epoch_order(keys.order, epoch)`, batches made by `make_batch_fn` (launch.py's batches)."""
    num_train, batch_size = len(ctx.splits.train), ctx.config.batch_size
    steps_per_epoch = num_train // batch_size
    batch_fn = make_batch_fn(ctx.augment, ctx.keys, num_train, batch_size, ctx.mesh)
    orders = EpochOrders(ctx.keys.order, num_train, steps_per_epoch)
    return BatchSource(steps_per_epoch, lambda step: batch_fn(ctx.train_images, ctx.train_labels, orders(step),
                                                              np.int32(step)))


class EpochOrders:
    """`orders(step)`: the epoch order of `step` (epoch_order of its epoch), the last two kept."""

    def __init__(self, order_key: jax.Array, num_train: int, steps_per_epoch: int):
        self._order_key, self._num_train, self._steps_per_epoch = order_key, num_train, steps_per_epoch
        self._orders: dict[int, jax.Array] = {}

    def __call__(self, step: int) -> jax.Array:
        epoch = step // self._steps_per_epoch
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = epoch_order(self._order_key, epoch, self._num_train)
        return self._orders[epoch]


class LookAhead:
    """Hands the training loop the batch of each step of a `BatchSource`, with the next one already on its way.

    `batch(step)` dispatches the batch program for step + 1 before returning batch `step`, so
    the caller's train step is queued behind it and the two programs (which share no buffers)
    run side by side: on a 2-core CPU the gather and augmentation then hide under the step
    instead of adding to it (the speed recipe's input share went from ~16% to ~4%). Batch
    `step` is the same with or without the look-ahead, hence the same after a resume.
    """

    def __init__(self, make: Callable[[int], dict], total_steps: int):
        self._make, self._total_steps = make, total_steps
        self._ahead: tuple[int, dict] | None = None

    def pending(self) -> dict | None:
        """The batch prepared ahead (or None): what a caller blocks on to wait for all input work."""
        return None if self._ahead is None else self._ahead[1]

    def batch(self, step: int) -> dict:
        if self._ahead is not None and self._ahead[0] == step:
            current = self._ahead[1]
        else:
            current = self._make(step)
        self._ahead = (step + 1, self._make(step + 1)) if step + 1 < self._total_steps else None
        return current


class InputPipeline(LookAhead):
    """`LookAhead` over the epoch-ordered batches of `batch_fn` (`make_batch_fn`'s program) on
    device-resident `images` and `labels`: the recipe's input pipeline (see `epoch_batches`)."""

    def __init__(self, batch_fn: Callable, images: jnp.ndarray, labels: jnp.ndarray, order_key: jax.Array,
                 num_train: int, steps_per_epoch: int, total_steps: int):
        orders = EpochOrders(order_key, num_train, steps_per_epoch)
        super().__init__(lambda step: batch_fn(images, labels, orders(step), np.int32(step)), total_steps)


class EvalSet:
    """A split padded to a multiple of the eval batch, on device, with a mask of real examples."""

    def __init__(self, split: data_lib.Split, batch_size: int, mesh: jax.sharding.Mesh):
        n = len(split)
        self.num_examples = n
        self.batch_size = batch_size
        self.num_batches = max(1, math.ceil(n / batch_size))
        padded = self.num_batches * batch_size
        images = np.zeros((padded,) + split.images.shape[1:], np.uint8)
        images[:n] = split.images
        labels = np.zeros((padded,), np.int32)
        labels[:n] = split.labels
        mask = np.zeros((padded,), np.float32)
        mask[:n] = 1.0
        replicated = NamedSharding(mesh, P())
        self.images = parallel.put_replicated(images, replicated)
        self.labels = parallel.put_replicated(labels, replicated)
        self.mask = parallel.put_replicated(mask, replicated)


def make_evaluate(loss_fn: Callable, mesh: jax.sharding.Mesh) -> Callable[[TrainState, EvalSet], dict]:
    """Builds evaluate(state, eval_set) -> {'loss', 'accuracy', 'num_examples'} over the whole split."""
    batch_sharding = NamedSharding(mesh, P("data"))

    @functools.partial(jax.jit, static_argnames=("batch_size",))
    def batch_sums(state, images, labels, mask, index, batch_size):
        take = lambda a: jax.lax.with_sharding_constraint(
            jax.lax.dynamic_slice_in_dim(a, index * batch_size, batch_size), batch_sharding)
        batch = {"image": to_float_images(take(images)), "label": take(labels), "mask": take(mask)}
        return eval_step(state, batch, loss_fn=loss_fn)

    def evaluate(state: TrainState, eval_set: EvalSet) -> dict:
        total = None
        for b in range(eval_set.num_batches):
            sums = batch_sums(state, eval_set.images, eval_set.labels, eval_set.mask, b,
                              batch_size=eval_set.batch_size)
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        return summarize_eval(jax.device_get(total))

    return evaluate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False,
                       report: RunReport | None = None, batches: Callable[[SourceContext], BatchSource] | None = None,
                       init_variables: dict | None = None, validate: bool = True) -> dict:
    """Trains the recipe in `config`, resuming from `workdir` if it holds a run; returns the test metrics.

    `report` adds work at the end of the run on process 0 (None: the test metrics only;
    `hwrjax.train_and_evaluate` passes the one that fits the temperature and draws the pictures).

    Everything that trains runs this loop (launch.py, `hwrjax finetune`) and differs only in:
    `batches`, the factory of its `BatchSource` (None: `epoch_batches`, the recipe's passes over
    the training split; config.parallel="pmap" needs it); `init_variables`, {"params",
    "batch_stats"} to start from instead of a fresh init (a warm start: the optimizer, step and
    moving average start fresh, the average at these weights); and `validate` (False: no
    validation or selection; the last weights are reported, and saved as the best checkpoint).
    Resume, preemption, the moving average, checkpoints and process-0 gating are the same for all.

    One run at a time per workdir: the run holds the workdir's lock (hwrjax.training.runlock) from
    before its config check to its end, and a second launch raises WorkdirBusy. Raises
    Diverged when the loss or gradient norm stops being finite (nothing non-finite is saved).
    """
    start_time = time.time()
    mesh = parallel.make_mesh()
    validate_config(config, mesh.devices.size)
    signal_at_step_hook()  # a malformed test hook is refused before any work
    check_workdir(workdir)
    lock = None
    busy = None
    try:
        if jax.process_index() == 0:  # the other processes of a run are part of the same run
            lock = runlock.acquire(workdir)
    except WorkdirBusy as e:
        busy = e
    if parallel.any_process(busy is not None):
        raise busy or WorkdirBusy(f"{workdir} is in use by another run (process 0 was refused its lock)")
    try:
        return _train_and_evaluate(config, workdir, allow_config_change, mesh, start_time, report,
                                   batches, init_variables, validate)
    finally:
        if lock is not None:
            lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool,
                        mesh: jax.sharding.Mesh, start_time: float, report: RunReport | None,
                        batches: Callable[[SourceContext], BatchSource] | None, init_variables: dict | None,
                        validate: bool) -> dict:
    num_devices = mesh.devices.size
    is_main = jax.process_index() == 0

    config_path = storage.join(workdir, "config.json")
    current = config_as_dict(config)
    rewrite_config = not storage.exists(config_path)
    if not rewrite_config:
        saved = checkpoint_lib.read_config_json(config_path)
        diffs = config_differences(saved, current)
        if diffs and not allow_config_change:
            raise ConfigError(f"{workdir} holds a run with a different config ({'; '.join(diffs)}); "
                              "use a new --workdir, or pass --allow_config_change to continue anyway")
        if diffs:
            # config.json then says how the run goes on; the change is in the log.
            logging.warning("Continuing %s with a changed config: %s", workdir, "; ".join(diffs))
            rewrite_config = True
    parallel.check_same_config_across_processes(config.to_json())

    use_pmap = config.parallel == "pmap"
    if use_pmap and batches is not None:
        raise ConfigError("this run's batch source runs under jit only; set config.parallel='jit'")
    splits = data_lib.load_splits(config)
    if batches is None and len(splits.train) < config.batch_size:
        raise ConfigError(f"config.batch_size={config.batch_size} is larger than the {len(splits.train)} "
                          "training examples; lower it")
    keys = rng_lib.RunKeys.from_seed(config.seed)
    aug = augment_lib.AugmentParams.from_config(config.augment)
    replicated = NamedSharding(mesh, P())
    train_images = parallel.put_replicated(splits.train.images, replicated)
    train_labels = parallel.put_replicated(splits.train.labels, replicated)
    source = (batches or epoch_batches)(SourceContext(config, mesh, keys, aug, splits, train_images, train_labels))
    steps_per_epoch = source.steps_per_epoch
    total_steps = steps_per_epoch * config.num_epochs

    model = models_lib.create_model(config.model, splits.num_classes, dtype=config.dtype,
                                    bn_axis_name=PMAP_AXIS if use_pmap else None)
    loss_fn = losses_lib.get_loss(config.loss)
    schedule = optim_lib.make_schedule(config, steps_per_epoch, config.num_epochs)
    tx = optim_lib.make_optimizer(config, schedule)
    ema_decay = float(config.ema_decay)

    def init(k):
        state_ = create_train_state(model, tx, k, (1,) + data_lib.IMAGE_SHAPE)
        return init_ema(state_) if ema_decay else state_

    def warm(variables):
        state_ = TrainState.create(apply_fn=model.apply, tx=tx, params=variables["params"],
                                   batch_stats=variables.get("batch_stats") or {})
        return init_ema(state_) if ema_decay else state_

    if init_variables is None:
        state = jax.jit(init, out_shardings=replicated)(keys.init)
    else:
        host = {"params": init_variables["params"], "batch_stats": init_variables.get("batch_stats") or {}}
        state = jax.jit(warm, out_shardings=replicated)(
            jax.tree.map(lambda x: parallel.put_replicated(np.asarray(x), replicated), host))

    ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    meta = {"best_val_accuracy": -1.0, "best_step": -1, "epochs_without_improvement": 0, "stopped_early": False,
            "wall_time_s": 0.0}
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, saved_meta = restored
        meta.update(saved_meta)
        logging.info("Resuming from step %d of %d in %s.", int(state.step), total_steps, workdir)
    step = int(jax.device_get(state.step))

    # Written only now, under the lock, once the workdir's checkpoints are known to fit this config:
    # a launch that fails earlier leaves a workdir's config.json (or its absence) as it was.
    if is_main and rewrite_config:
        storage.write_atomic(config_path, config.to_json(indent=2))

    val_set = EvalSet(splits.validation, config.eval_batch_size, mesh) if splits.validation and validate else None
    test_set = EvalSet(splits.test, config.eval_batch_size, mesh)
    if use_pmap:
        local = jax.local_devices()
        pmapped = make_fused_pmap_step(loss_fn, aug, keys, len(splits.train), config.batch_size, ema_decay)
        images_p = parallel.replicate_for_pmap(splits.train.images, local)
        labels_p = parallel.replicate_for_pmap(splits.train.labels, local)
        order_cache: dict = {}

        def run_step(s, step_):
            epoch = step_ // steps_per_epoch
            if order_cache.get("epoch") != epoch:  # the order changes once per epoch
                order = epoch_order(keys.order, epoch, len(splits.train))
                order_cache.update(epoch=epoch, value=parallel.replicate_for_pmap(order, local))
            return pmapped(s, images_p, labels_p, order_cache["value"])

        to_run_state = lambda s: parallel.replicate_for_pmap(s, local)
        from_run_state = lambda s: jax.device_put(jax.tree.map(lambda x: x[0], s), replicated)
        fetch_metrics = lambda ms: [jax.tree.map(lambda x: x[0], m) for m in jax.device_get(ms)]
    else:
        step_fn = make_step_fn(loss_fn, keys, ema_decay)
        pipeline = LookAhead(source.make, total_steps)

        def run_step(s, step_):
            return step_fn(s, pipeline.batch(step_))

        to_run_state = from_run_state = lambda s: s
        fetch_metrics = jax.device_get
    evaluate = make_evaluate(loss_fn, mesh)
    stats_images = (parallel.put_replicated(splits.train.images[:config.batch_stats_examples], replicated)
                    if config.batch_stats_examples else None)

    def delivered(state_: TrainState) -> TrainState:
        """The weights a run validates, selects, reports and delivers: the moving average when one
        is kept, with BatchNorm statistics recomputed on clean training images when asked."""
        state_ = averaged(state_)
        if not config.batch_stats_examples or not state_.batch_stats:
            return state_
        return state_.replace(batch_stats=batch_stats_lib.recompute_batch_stats(
            state_.apply_fn, state_.params, state_.batch_stats, stats_images, config.eval_batch_size,
            batch_sharding=NamedSharding(mesh, P("data"))))

    logger = MetricLogger(workdir, enabled=is_main, total_steps=total_steps,
                          progress=config.progress and sys.stderr.isatty(), resume_step=step)
    logging.info("Training %s (%d parameters) on %d device(s) in %d process(es): %d steps of batch %d.",
                 config.model.name, sum(x.size for x in jax.tree.leaves(state.params)), num_devices,
                 jax.process_count(), total_steps, config.batch_size)

    def diverged(at_step: int, what: str) -> Diverged:
        last = ckpt.latest_step()
        again = f"resume from step {last}, the last saved" if last is not None else "start again"
        return Diverged(f"training diverged at step {at_step} ({what}); nothing non-finite was saved; rerun with a "
                        f"lower --config.optimizer.learning_rate and --allow_config_change to {again}")

    def check_finite(fetched: list[dict], last_step: int) -> None:
        """Raises Diverged at the first of the steps ending at `last_step` whose loss or grad norm is not finite."""
        for i, m in enumerate(fetched):
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise diverged(last_step - len(fetched) + 1 + i, f"loss {loss}, gradient norm {grad_norm}")

    def save(step_: int, run_state_: TrainState) -> None:
        if pending:  # every step up to a saved one is checked: non-finite weights are never saved
            check_finite(fetch_metrics(pending), step_)
        try:
            ckpt.save(step_, from_run_state(run_state_),
                      dict(meta, wall_time_s=meta["wall_time_s"] + time.time() - session_start))
        except Diverged as e:
            raise diverged(step_, str(e).split("; ")[0]) from None

    session_start = time.time()
    finished = meta["stopped_early"] or step >= total_steps
    if finished:
        logging.info("The run in %s already finished at step %d; reporting its test metrics.", workdir, step)
    pending: list[dict] = []
    signal_at = signal_at_step_hook()
    last_log_time, last_log_step = time.time(), step
    single_process = jax.process_count() == 1
    state = to_run_state(state)
    try:
        with StopSignal() as stop, logger:
            while step < total_steps and not meta["stopped_early"]:
                state, metrics = run_step(state, step)
                step += 1
                pending.append(metrics)
                logged = step % config.log_every_steps == 0 or step % steps_per_epoch == 0
                if logged:
                    fetched = fetch_metrics(pending)
                    check_finite(fetched, step)
                    pending = []
                    now = time.time()
                    row = {f"train_{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                    rate = (step - last_log_step) / max(now - last_log_time, 1e-9)
                    row.update(learning_rate=float(schedule(step - 1)), steps_per_sec=rate,
                               images_per_sec=rate * config.batch_size,
                               time_left_s=(total_steps - step) / max(rate, 1e-9))
                    logger.write(step, row)
                    last_log_time, last_log_step = now, step
                epoch_end = step % steps_per_epoch == 0
                if epoch_end and val_set is not None:
                    chosen = delivered(from_run_state(state))
                    val = evaluate(chosen, val_set)
                    logger.write(step, {"val_loss": val["loss"], "val_accuracy": val["accuracy"],
                                        "epoch": step // steps_per_epoch})
                    improved = val["accuracy"] > meta["best_val_accuracy"] + config.early_stopping.min_delta
                    if improved:
                        meta.update(best_val_accuracy=val["accuracy"], best_step=step, epochs_without_improvement=0)
                        try:
                            ckpt.save_best(step, with_delivered_batch_stats(from_run_state(state), chosen.batch_stats),
                                           dict(meta))
                        except Diverged:
                            raise diverged(step, "non-finite weights") from None
                    else:
                        meta["epochs_without_improvement"] += 1
                    patience = config.early_stopping.patience_epochs
                    if patience and meta["epochs_without_improvement"] >= patience:
                        meta["stopped_early"] = True
                        logging.info("Early stop at epoch %d: no validation gain for %d epochs.",
                                     step // steps_per_epoch, patience)
                every = config.checkpoint.every_steps
                checkpointed = epoch_end or (every and step % every == 0) or meta["stopped_early"]
                if checkpointed:
                    save(step, state)
                if signal_at is not None and step == signal_at[0]:
                    signal.raise_signal(signal_at[1])
                # Processes agree on stopping where they wait for each other anyway (logged metrics,
                # validation, checkpoints), so all save the same step and none is left in a collective;
                # a lone process decides at every step.
                stop_here = agreed_stop(stop.received) if single_process or logged or checkpointed else None
                if stop_here is not None:
                    save(step, state)
                    ckpt.wait()
                    raise Preempted(f"stopped by {stop_here.describe()} at step {step}; checkpoint saved in "
                                    f"{workdir}; rerun the same command to resume")
            if step >= total_steps or meta["stopped_early"]:
                save(step, state)
                if not validate:  # no selection: the last weights, as delivered, are the best
                    last = from_run_state(state)
                    try:
                        ckpt.save_best(step, with_delivered_batch_stats(last, delivered(last).batch_stats),
                                       dict(meta, best_step=step))
                    except Diverged:
                        raise diverged(step, "non-finite weights") from None
    finally:
        ckpt.close()
    state = from_run_state(state)

    # The final report uses the best validation checkpoint when there is one (selection
    # never looks at test), else the last state; with ema_decay > 0, their moving averages (and
    # with batch_stats_examples > 0, the statistics recomputed for them, which `best` holds).
    report_step = step
    if val_set is None or meta["best_step"] < 0 or meta["best_step"] == step:
        report_state = delivered(state)  # recomputed statistics only when the last state is reported
    else:
        report_step = int(meta["best_step"])
        variables, _ = checkpoint_lib.load_variables(workdir, "best")
        # Every process loaded the same checkpoint: place it on all devices of the run, including
        # those of other processes (a plain device_put cannot reach them).
        to_run = lambda tree: jax.tree.map(lambda x: parallel.put_replicated(np.asarray(x), replicated), tree)
        report_state = state.replace(params=to_run(variables["params"]), batch_stats=to_run(variables["batch_stats"]),
                                     ema={})
    test = evaluate(report_state, test_set)
    wall = meta["wall_time_s"] + (0.0 if finished else time.time() - session_start)
    test.update(step=step, checkpoint_step=report_step,
                split=config.dataset.test_split, dataset=config.dataset.name,
                probabilities=losses_lib.describe_probabilities(config.loss.name), wall_time_s=wall,
                total_time_s=time.time() - start_time,
                best_val_accuracy=meta["best_val_accuracy"], num_params=int(sum(
                    x.size for x in jax.tree.leaves(state.params))))
    if is_main:
        finished_run = FinishedRun(workdir=workdir, config=config, state=report_state, step=step,
                                   checkpoint_step=report_step, splits=splits)
        report = report or RunReport()
        test.update(report.metrics(finished_run))
        logger.write_report("test_metrics.json", test)
        logger.write(step, {"test_accuracy": test["accuracy"], "test_loss": test["loss"]})
        logger.close()
        report.files(finished_run)
    logging.info("Test accuracy %.4f (loss %.4f) on %d examples.", test["accuracy"], test["loss"],
                 test["num_examples"])
    return test
