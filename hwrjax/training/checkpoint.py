"""Orbax checkpoints of a training run: the latest K for resuming, the best by validation
accuracy for inference, and loading parameters without building an optimizer.

Layout under a workdir:
  checkpoints/<step>/{model,opt,meta}   latest K saves (resume)
  best/<step>/{model,opt,meta}          the best validation checkpoint (inference)
`model` holds params and batch statistics (and, for runs that keep one, their moving
average under `ema`), `opt` the step and optimizer state, and
`meta` (JSON) the early-stopping bookkeeping and a sha256 of each array item (`checksums`),
checked on every restore: a checkpoint whose arrays do not match is damaged. Non-finite
weights are never saved. The data position is not saved: it follows from the step (see
hwrjax.core.steps).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import os
import sys
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from hwrjax.core.errors import CheckpointError, Diverged
from hwrjax.training import storage
from hwrjax.training.logs import is_library_noise

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
    return storage.absolute(path)


def _model_tree(state: Any) -> dict:
    tree = {"params": state.params, "batch_stats": state.batch_stats}
    if getattr(state, "ema", None):
        tree["ema"] = state.ema
    return tree


def _opt_tree(state: Any) -> dict:
    return {"step": state.step, "opt_state": state.opt_state}


CHECKSUMS = "checksums"  # meta key: {"model": sha256, "opt": sha256} of the saved arrays


def _host(leaf: Any) -> np.ndarray:
    """A leaf as a host array; a replicated array spanning other processes gives its local copy."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = leaf.addressable_shards[0].data
    return np.asarray(leaf)


def tree_checksum(tree: Any) -> str:
    """sha256 of every array of `tree` (dtype, shape and bytes, in leaf order)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = _host(leaf)
        h.update(f"{a.dtype.name}{a.shape};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def non_finite_leaves(tree: Any) -> list[str]:
    """Paths of the floating-point arrays of `tree` that hold a NaN or an infinity."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = _host(leaf)
        if jax.numpy.issubdtype(a.dtype, jax.numpy.floating) and not np.isfinite(a.astype(np.float32)).all():
            bad.append(jax.tree_util.keystr(path))
    return bad


def _verify(items: dict, meta: dict | None) -> str | None:
    """Why the restored `items` cannot be trusted (a checksum mismatch, non-finite weights), or None."""
    sums = (meta or {}).get(CHECKSUMS)
    if isinstance(sums, dict):
        for name, tree in items.items():
            if sums.get(name) != tree_checksum(tree):
                return f"the {name} arrays do not match their checksum"
    else:  # Saved before checkpoints carried checksums: at least refuse non-finite weights.
        logging.warning("This checkpoint carries no checksum (saved by an older hwrjax); it cannot be verified.")
    for name, tree in items.items():
        bad = non_finite_leaves(tree)
        if bad:
            return f"the {name} arrays hold non-finite values ({bad[0]})"
    return None


@contextlib.contextmanager
def _quiet_abandoned_reads() -> Iterator[None]:
    """Keeps the reads Orbax abandons when a restore fails from printing a traceback each.

    They are coroutines never awaited; Python reports each one as it is collected. The failed
    restore itself is reported once, in one line, by the caller.
    """
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not is_library_noise(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


OTHER_MODEL = "another model than this config"


def _other_model(saved: Any, target: dict) -> str | None:
    """The first parameter whose name or shape differs between a checkpoint's model item (its
    metadata) and `target`'s, or None when they match."""
    def shapes(tree: Any) -> dict[str, tuple]:
        part = {k: tree[k] for k in ("params", "batch_stats") if k in tree}
        return {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(part)[0]}

    have, want = shapes(saved), shapes(target)
    for name in sorted(set(have) | set(want)):
        if have.get(name) != want.get(name):
            return f"{name}: saved {have.get(name, 'absent')}, this config {want.get(name, 'absent')}"
    return None


def _is_disk_full(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "os_error_code='28'" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


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
    def _args(step: int, state: Any, meta: dict) -> ocp.args.Composite:
        model, opt = _model_tree(state), _opt_tree(state)
        bad = non_finite_leaves(model) + non_finite_leaves(opt)
        if bad:
            raise Diverged(f"the weights at step {step} are not finite ({bad[0]}); they were not saved")
        meta = dict(meta, **{CHECKSUMS: {"model": tree_checksum(model), "opt": tree_checksum(opt)}})
        return ocp.args.Composite(model=ocp.args.StandardSave(model), opt=ocp.args.StandardSave(opt),
                                  meta=ocp.args.JsonSave(meta))

    def _write(self, what: str, step: int | None, action: Callable[[], Any]) -> Any:
        """Runs an Orbax call that writes; a failed write becomes one CheckpointError line."""
        try:
            return action()
        except Exception as e:  # Orbax and tensorstore raise many types for failed writes.
            saved = self.latest.latest_step()
            kept = (f"the checkpoint of step {saved} is kept" if saved is not None else "no checkpoint was saved yet")
            at = f" of step {step}" if step is not None else ""
            if _is_disk_full(e):
                raise CheckpointError(f"no space left on the device of {self.workdir} while writing {what}{at}; "
                                      f"{kept}: free space and rerun the same command to resume") from None
            reason = (str(e).splitlines() or [type(e).__name__])[0][:300]
            raise CheckpointError(f"writing {what}{at} in {self.workdir} failed ({reason}); {kept}: "
                                  "fix the storage and rerun the same command to resume") from None

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Saves a resumable checkpoint at `step` (asynchronously when enabled); raises Diverged
        instead of saving non-finite weights."""
        if step in self.latest.all_steps():
            return
        args = self._args(step, state, meta)
        self._write("the checkpoint", step, lambda: self.latest.save(step, args=args, force=True))

    def save_best(self, step: int, state: Any, meta: dict) -> None:
        """Replaces the best checkpoint with the state at `step` (never with non-finite weights)."""
        if step in self.best.all_steps():
            return
        args = self._args(step, state, meta)
        self._write("the best checkpoint", step, lambda: self.best.save(step, args=args, force=True))

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def _restore_step(self, step: int, target_model: dict, abstract_opt: Any) -> tuple[dict | None, str | None]:
        """(the restored items, None) of the checkpoint at `step`, or (None, why it cannot be used)."""
        try:
            saved_model = self.latest.item_metadata(step)["model"]
            other = _other_model(saved_model, target_model)
            if other:
                return None, f"{OTHER_MODEL}: {other}"
            # A run that starts (or stops) keeping a moving average part way (a changed
            # config.ema_decay) resumes from checkpoints saved without (or with) one.
            saved_has_ema = "ema" in saved_model
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
            return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        problem = _verify({"model": restored["model"], "opt": restored["opt"]}, restored["meta"])
        return (None, problem) if problem else (restored, None)

    def restore_latest(self, target_state: Any) -> tuple[Any, dict] | None:
        """Restores the newest readable checkpoint into `target_state`'s structure and shardings.

        Returns None when there is no checkpoint. A damaged checkpoint (unreadable, or arrays
        that do not match their checksum) is reported with its step and path and the next older
        one is tried; if none can be read, raises.
        """
        steps = sorted(self.latest.all_steps(), reverse=True)
        if not steps:
            return None
        target_model = _model_tree(target_state)
        abstract_opt = jax.tree.map(ocp.utils.to_shape_dtype_struct, _opt_tree(target_state))
        problems: list[str] = []
        for step in steps:
            path = os.path.join(self.workdir, LATEST_DIR, str(step))
            with _quiet_abandoned_reads():
                restored, problem = self._restore_step(step, target_model, abstract_opt)
            if problem:
                problems.append(problem)
                if not problem.startswith(OTHER_MODEL):
                    logging.error("Checkpoint at step %d in %s is damaged (%s); trying an older one.", step, path,
                                  problem)
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
            meta = dict(restored["meta"] or {})
            meta.pop(CHECKSUMS, None)
            return state, meta
        if all(p.startswith(OTHER_MODEL) for p in problems):
            raise CheckpointError(f"the checkpoints in {os.path.join(self.workdir, LATEST_DIR)} hold {problems[0]}; "
                                  "resume with the config they were saved with, or use a new --workdir")
        raise CheckpointError(f"no readable checkpoint in {os.path.join(self.workdir, LATEST_DIR)} "
                              f"(tried steps {steps}); move the directory away to start over")

    def wait(self) -> None:
        """Blocks until every pending asynchronous save has finished; a failed one raises CheckpointError."""
        self._write("a checkpoint", None, self.latest.wait_until_finished)
        self._write("the best checkpoint", None, self.best.wait_until_finished)

    def close(self) -> None:
        """Finishes pending saves and releases the managers, even when a save failed."""
        try:
            self.wait()
        finally:
            for manager in (self.latest, self.best):
                try:
                    manager.close()
                except Exception as e:  # The failed save was reported by wait().
                    logging.warning("Closing the checkpoint manager of %s: %s", self.workdir,
                                    (str(e).splitlines() or [type(e).__name__])[0][:200])


CHOICES = ("best", "latest")


def parse_choice(value: str | int) -> str | int:
    """A checkpoint choice as `load_variables` takes it: "best", "latest" or a step number (an int, or
    a string of digits); anything else raises CheckpointError."""
    if value in CHOICES:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    raise CheckpointError(f"checkpoint must be 'best', 'latest' or a step number, got {value!r}")


def check_run_workdir(workdir: str) -> str:
    """Returns `workdir`; raises CheckpointError unless it is an existing directory (checked before any work)."""
    if not storage.is_dir(workdir):
        why = "" if storage.exists(workdir) else " (it does not exist)"
        raise CheckpointError(f"{workdir} is not a directory{why}; pass the --workdir of a training run")
    return workdir


def load_config(workdir: str):
    """Reads the ConfigDict saved in `workdir/config.json`; a missing or damaged one is one CheckpointError line."""
    import ml_collections

    check_run_workdir(workdir)
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        raise CheckpointError(f"{workdir} holds no config.json; pass the workdir of a training run")
    saved = read_config_json(path)
    for section in ("model", "dataset"):
        if not isinstance(saved.get(section), dict) or "name" not in saved[section]:
            raise CheckpointError(f"{path} has no {section}.name; it is not the config of a training run "
                                  "(restore it from a copy or pass the workdir of a training run)")
    return ml_collections.ConfigDict(saved)


def read_config_json(path: str) -> dict:
    """The JSON object in a workdir's config.json; raises CheckpointError if it is unreadable or not an object."""
    try:
        saved = json.loads(storage.read_bytes(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is unreadable ({reason}); restore it from a copy "
                              "(or, for a run you are training, delete it to resume with the current config)") from None
    if not isinstance(saved, dict) or not saved:
        raise CheckpointError(f"{path} holds no config (found {type(saved).__name__}); restore it from a copy "
                              "(or, for a run you are training, delete it to resume with the current config)")
    return saved


class _Vanished(Exception):
    """The checkpoint being read was removed meanwhile (a running training rotated it out)."""


def load_variables(workdir: str, which: str | int = "best", average: bool = True) -> tuple[dict, int]:
    """Restores {"params", "batch_stats"} of the best, latest, or a given step's checkpoint.

    For a run that kept a moving average of its weights (config.ema_decay > 0) these are the
    averaged ones, which it validated and selected on, unless `average` is False. The arrays
    land on this process's first device, whatever devices the run was saved from. No
    optimizer is built. The arrays are checked against the checksum saved with them: a
    damaged checkpoint raises CheckpointError. A best or latest checkpoint that a running
    training replaces while it is read is read again at its new step. Returns (variables, step).
    """
    which = parse_choice(which)
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
    for _ in range(5):
        try:
            with _quiet_abandoned_reads():
                model, step = _restore_model(directory, which)
        except _Vanished:
            continue
        if average and model.get("ema"):
            model = model["ema"]
        return {"params": model["params"], "batch_stats": model.get("batch_stats") or {}}, step
    raise CheckpointError(f"the checkpoints in {directory} kept being replaced while they were read; "
                          "try again (or read a fixed --checkpoint step)")


def _restore_model(directory: epath.Path, which: str | int) -> tuple[dict, int]:
    """The verified `model` item of the chosen checkpoint in `directory`, and its step."""
    step = None
    mngr = None
    try:
        mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                     item_handlers={"model": ocp.StandardCheckpointHandler(),
                                                    "meta": ocp.JsonCheckpointHandler()})
        steps = mngr.all_steps()
        if not steps:
            raise CheckpointError(f"{directory} holds no finished checkpoint; train first")
        if which in ("best", "latest"):
            step = max(steps)
        else:
            step = int(which)
            if step not in steps:
                raise CheckpointError(f"no checkpoint at step {step} in {directory}; available: {sorted(steps)}")
        # Restore onto this process's first device, whatever devices the run was saved from.
        metadata = mngr.item_metadata(step)["model"]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target),
                                                              meta=ocp.args.JsonRestore()))
    except CheckpointError:
        raise
    except Exception as e:  # Orbax raises many types for damaged or vanished files.
        gone = isinstance(e, FileNotFoundError) if step is None else not (directory / str(step)).exists()
        if which in ("best", "latest") and gone:
            raise _Vanished() from e
        if step is None:
            raise CheckpointError(f"the checkpoints in {directory} cannot be listed ({type(e).__name__}); "
                                  "pass the workdir of a training run") from None
        if not (directory / str(step)).exists():
            raise CheckpointError(f"the checkpoint at step {step} in {directory} was removed while it was read; "
                                  "pass a step that exists (or best / latest)") from None
        reason = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint at step {step} in {directory} cannot be read ({type(e).__name__}: "
                              f"{reason}); it is damaged: use another --checkpoint, or retrain") from None
    finally:
        if mngr is not None:
            try:
                mngr.close()
            except Exception:  # Closing a read-only manager cannot lose anything.
                pass
    problem = _verify({"model": restored["model"]}, restored["meta"])
    if problem:
        raise CheckpointError(f"checkpoint at step {step} in {directory} is damaged ({problem}); "
                              "use another --checkpoint (best, latest or a step), or retrain")
    return restored["model"], step
