"""Orbax checkpoints of a training run: the latest K for resuming, the best by validation
accuracy for inference, and loading parameters without building an optimizer.

Layout under a workdir:
  checkpoints/<step>/{model,opt,meta}   latest K saves (resume)
  best/<step>/{model,opt,meta}          the best validation checkpoint (inference)
`model` holds params and batch statistics (and, for runs that keep one, their moving
average under `ema`), `opt` the step and optimizer state, and
`meta` (JSON) the early-stopping bookkeeping. The data position is not saved: it follows
from the step (see hwrjax.train).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from hwrjax.errors import CheckpointError

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


def _options(max_to_keep: int, async_save: bool, name: str) -> ocp.CheckpointManagerOptions:
    # Distinct barrier names: both managers may save the same step at once in multi-process runs.
    return ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name))


def _handlers() -> dict:
    # Named handlers (not just item names) let a manager read an item's metadata before restoring it.
    return {"model": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()}


def absolute_path(path: str) -> str:
    """`path` made absolute (Orbax reads checkpoint metadata only from absolute paths); URLs
    such as gs://bucket/run are returned as they are."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _model_tree(state: Any) -> dict:
    tree = {"params": state.params, "batch_stats": state.batch_stats}
    if getattr(state, "ema", None):
        tree["ema"] = state.ema
    return tree


def _opt_tree(state: Any) -> dict:
    return {"step": state.step, "opt_state": state.opt_state}


class Checkpointer:
    """Saves and restores a TrainState plus JSON metadata in a workdir."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.workdir = absolute_path(workdir)
        self.latest = ocp.CheckpointManager(os.path.join(self.workdir, LATEST_DIR),
                                            options=_options(keep, async_save, "latest"),
                                            item_handlers=_handlers())
        self.best = ocp.CheckpointManager(os.path.join(self.workdir, BEST_DIR),
                                          options=_options(1, async_save, "best"),
                                          item_handlers=_handlers())

    @staticmethod
    def _args(state: Any, meta: dict) -> ocp.args.Composite:
        return ocp.args.Composite(model=ocp.args.StandardSave(_model_tree(state)),
                                  opt=ocp.args.StandardSave(_opt_tree(state)),
                                  meta=ocp.args.JsonSave(meta))

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Saves a resumable checkpoint at `step` (asynchronously when enabled)."""
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=self._args(state, meta), force=True)

    def save_best(self, step: int, state: Any, meta: dict) -> None:
        """Replaces the best checkpoint with the state at `step`."""
        if step in self.best.all_steps():
            return
        self.best.save(step, args=self._args(state, meta), force=True)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore_latest(self, target_state: Any) -> tuple[Any, dict] | None:
        """Restores the newest readable checkpoint into `target_state`'s structure and shardings.

        Returns None when there is no checkpoint. A damaged checkpoint is reported with its
        step and path and the next older one is tried; if none can be read, raises.
        """
        steps = sorted(self.latest.all_steps(), reverse=True)
        if not steps:
            return None
        target_model = _model_tree(target_state)
        abstract_opt = jax.tree.map(ocp.utils.to_shape_dtype_struct, _opt_tree(target_state))
        for step in steps:
            path = os.path.join(self.workdir, LATEST_DIR, str(step))
            try:
                # A run that starts (or stops) keeping a moving average part way (a changed
                # config.ema_decay) resumes from checkpoints saved without (or with) one.
                saved_has_ema = "ema" in self.latest.item_metadata(step)["model"]
                model_tree = dict(target_model)
                if not saved_has_ema:
                    model_tree.pop("ema", None)
                elif "ema" not in model_tree:
                    model_tree["ema"] = {"params": target_model["params"], "batch_stats": target_model["batch_stats"]}
                abstract_model = jax.tree.map(ocp.utils.to_shape_dtype_struct, model_tree)
                restored = self.latest.restore(step, args=ocp.args.Composite(
                    model=ocp.args.StandardRestore(abstract_model),
                    opt=ocp.args.StandardRestore(abstract_opt),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # Orbax raises many types for damaged files.
                logging.error("Checkpoint at step %d in %s is damaged (%s: %s); trying an older one.",
                              step, path, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                continue
            model = restored["model"]
            state = target_state.replace(step=restored["opt"]["step"], opt_state=restored["opt"]["opt_state"],
                                         params=model["params"], batch_stats=model["batch_stats"])
            if "ema" in target_model:
                ema = model.get("ema")
                if "ema" not in model:
                    ema = jax.tree.map(jax.numpy.copy, {"params": model["params"], "batch_stats": model["batch_stats"]})
                    logging.warning("The checkpoint at step %d keeps no moving average; it starts from the "
                                    "restored weights.", step)
                state = state.replace(ema=ema)
            return state, dict(restored["meta"] or {})
        raise CheckpointError(f"no readable checkpoint in {os.path.join(self.workdir, LATEST_DIR)} "
                              f"(tried steps {steps}); move the directory away to start over")

    def wait(self) -> None:
        """Blocks until every pending asynchronous save has finished."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()


def load_config(workdir: str):
    """Reads the ConfigDict saved in `workdir/config.json`."""
    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{workdir} holds no config.json; pass the workdir of a training run")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_variables(workdir: str, which: str | int = "best", average: bool = True) -> tuple[dict, int]:
    """Restores {"params", "batch_stats"} of the best, latest, or a given step's checkpoint.

    For a run that kept a moving average of its weights (config.ema_decay > 0) these are the
    averaged ones, which it validated and selected on, unless `average` is False. The arrays
    land on this process's first device, whatever devices the run was saved from. No
    optimizer is built. Returns (variables, step).
    """
    workdir = absolute_path(workdir)
    if which == "best":
        subdir = BEST_DIR
    else:
        subdir = LATEST_DIR
    directory = epath.Path(workdir) / subdir
    if not directory.exists() and which == "best":
        directory = epath.Path(workdir) / LATEST_DIR
        which = "latest"
    if not directory.exists():
        raise CheckpointError(f"{workdir} has no checkpoint; train first with "
                              f"`python launch.py --config=... --workdir={workdir}`")
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_handlers={"model": ocp.StandardCheckpointHandler()})
    try:
        steps = mngr.all_steps()
        if not steps:
            raise CheckpointError(f"{directory} holds no finished checkpoint; train first")
        if which in ("best", "latest"):
            step = max(steps)
        else:
            step = int(which)
            if step not in steps:
                raise CheckpointError(f"no checkpoint at step {step} in {directory}; available: {sorted(steps)}")
        try:
            # Restore onto this process's first device, whatever devices the run was saved from.
            metadata = mngr.item_metadata(step)["model"]
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
            restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
        except Exception as e:
            raise CheckpointError(f"checkpoint at step {step} in {directory} cannot be read "
                                  f"({type(e).__name__}); it may be damaged") from e
    finally:
        mngr.close()
    model = restored["model"]
    if average and model.get("ema"):
        model = model["ema"]
    return {"params": model["params"], "batch_stats": model.get("batch_stats") or {}}, step
