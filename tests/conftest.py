"""Shared fixtures: an untrained checkpoint (no dataset needed), a small run trained on MNIST once per
session, independent oracles to check inference against, and a summary of what was skipped and why.

The suite runs in pytest-xdist workers (pyproject.toml's addopts; `-n 0` runs it in one process):
the trained run is made once for all of them (`_once_per_run`), and the tests that share a
module- or class-scoped fixture run on one worker (`pytest_collection_modifyitems`)."""

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import warnings

# One persistent compilation cache for this test session (the xdist workers inherit the
# controller's environment, so they share it too), inherited by every launch.py and
# `hwrjax` subprocess: the many smoke runs of one recipe compile their steps once. It starts
# empty, so no run outside the session is reused, and it is removed at the end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="hwrjax-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# Likewise one decoded-dataset cache for the session (hwrjax.training.data), empty at the start.
if "HWRJAX_DATA_CACHE_DIR" not in os.environ:
    _DATA_CACHE = tempfile.mkdtemp(prefix="hwrjax-test-data-cache-")
    os.environ["HWRJAX_DATA_CACHE_DIR"] = _DATA_CACHE
    atexit.register(shutil.rmtree, _DATA_CACHE, ignore_errors=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import default  # noqa: E402
from hwrjax import models  # noqa: E402
from hwrjax.apps import train  # noqa: E402
from hwrjax.core import optim, train_state  # noqa: E402
from hwrjax.training import checkpoint  # noqa: E402


def make_workdir(path: str, config=None, seed: int = 0) -> str:
    """Writes config.json and a best + latest checkpoint of a freshly initialized model to `path`."""
    config = config or small_resnet_config()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    model = models.create_model(config.model, num_classes=10, dtype=config.dtype)
    tx = optim.make_optimizer(config, optim.make_schedule(config, 10, config.num_epochs))
    # One compiled init instead of dozens of op-by-op dispatches.
    state = jax.jit(lambda k: train_state.create_train_state(model, tx, k))(jax.random.key(seed))
    ckpt = checkpoint.Checkpointer(path, keep=2, async_save=False)
    meta = {"best_val_accuracy": 0.1, "best_step": 0, "epochs_without_improvement": 0,
            "stopped_early": False, "wall_time_s": 0.0}
    ckpt.save(0, state, meta)
    ckpt.save_best(0, state, meta)
    ckpt.close()
    return path


def small_resnet_config():
    """The ResNet smoke-sized config used by fixtures."""
    c = default.get_config()
    default.smoke(c)
    c.model.stage_sizes = (1, 1)
    c.model.stage_widths = (8, 16)
    c.model.stem_width = 8
    return c


@pytest.fixture(scope="session")
def _untrained_template(tmp_path_factory):
    return make_workdir(str(tmp_path_factory.mktemp("template") / "run"))


@pytest.fixture
def untrained_workdir(tmp_path, _untrained_template):
    """A workdir of its own with config.json and an untrained small ResNet checkpoint (no data needed)."""
    return shutil.copytree(_untrained_template, str(tmp_path / "run"))


def mnist_data_dir() -> str:
    """Where tfds (and so hwrjax) looks for datasets: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def mnist_available() -> bool:
    """True when the real MNIST is prepared where tfds looks for it."""
    return os.path.isdir(os.path.join(mnist_data_dir(), "mnist"))


def skip_or_fail_without_mnist() -> None:
    """Skips (or in CI, fails) the current test or fixture when the real MNIST is not prepared."""
    if not mnist_available():
        if os.environ.get("CI"):
            pytest.fail("CI needs TFDS_DATA_DIR pointing at a tfds data dir holding mnist")
        pytest.skip(f"needs the real MNIST, not prepared in {mnist_data_dir()}: set TFDS_DATA_DIR to a tfds "
                    "data dir holding it, or run `tfds build mnist` once with network")


@pytest.fixture
def require_mnist():
    """Skips (or in CI, fails) a test that needs the real MNIST when it is not prepared."""
    skip_or_fail_without_mnist()


# ---------------------------------------------------------------- the trained run

# The trained fixture's test split: 1000 examples, not a multiple of its eval batch (256), so a
# dropped or unmasked last batch changes what is counted.
TRAINED_SPLIT = "test[:1000]"
TRAINED_SPLIT_SIZE = 1000
# The speed recipe's convnet (BatchNorm) on 8192 images for 2 epochs with a moving average reads
# about 97-98% of TRAINED_SPLIT (measured on this machine); well below that means a broken run.
ACCURACY_FLOOR = 0.95


# Test hook: a workdir trained with trained_config() to use instead of training one (tests/mutants).
TRAINED_RUN_ENV = "HWRJAX_TEST_TRAINED_RUN"


def trained_config():
    """The configs/fast.py convnet (BatchNorm) shrunk to a run of seconds, keeping a moving average."""
    from configs import fast

    c = fast.get_config()
    c.dataset.limit_train = 8192
    c.dataset.validation_size = 1000
    c.dataset.test_split = TRAINED_SPLIT
    c.num_epochs = 2
    c.batch_size = 128
    c.eval_batch_size = 256
    c.ema_decay = 0.99
    c.log_every_steps = 16
    c.progress = False
    c.report_plots = False
    c.checkpoint.async_save = False
    return c


@contextlib.contextmanager
def _once_per_run(config, tmp_path_factory, name: str):
    """Yields (folder, done): a folder that every xdist worker of this pytest run shares, and whether
    another worker already filled it. The first one to hold the lock fills it while the others wait;
    the folder is marked done only when the block ends without an error, so a failed attempt is made
    again by the next worker (and fails there too, with its own traceback).

    Without xdist the folder is simply a new one of this session's temporary folder: the parent of
    `getbasetemp()` is shared by workers of one run only under xdist (else it holds every past run)."""
    if not hasattr(config, "workerinput"):  # not an xdist worker
        yield tmp_path_factory.mktemp(name), False
        return
    root = tmp_path_factory.getbasetemp().parent  # the run's folder; each worker's basetemp is in it
    folder = root / f"once-{name}"
    marker = root / f"once-{name}.done"
    with open(root / f"once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        done = marker.exists()
        if not done and folder.exists():  # a worker's failed attempt
            shutil.rmtree(folder)
        folder.mkdir(exist_ok=True)
        yield folder, done
        marker.touch()


@pytest.fixture(scope="session")
def trained_run(pytestconfig, tmp_path_factory) -> str:
    """The workdir of a small BatchNorm convnet trained once per session on real MNIST with a moving
    average of its weights (read only: copy it before writing to it)."""
    skip_or_fail_without_mnist()
    with _once_per_run(pytestconfig, tmp_path_factory, "trained") as (folder, done):
        workdir = str(folder / "run")
        if done or os.environ.get(TRAINED_RUN_ENV):
            if not done:
                # Test hook: the mutation check (tests/mutants) trains once for every mutant that cannot
                # change training, and hands the run in; a copy is used, so it is never written to.
                shutil.copytree(os.environ[TRAINED_RUN_ENV], workdir)
            # else trained by another xdist worker of this run: the same files, read only.
            with open(os.path.join(workdir, "report", "test_metrics.json")) as f:
                report = json.load(f)
        else:
            report = train.train_and_evaluate(trained_config(), workdir)
    assert report["num_examples"] == TRAINED_SPLIT_SIZE, report
    assert report["accuracy"] >= ACCURACY_FLOOR, report
    # Label smoothing keeps the raw probabilities below ~0.9: the run is calibrated to sharpen them.
    assert oracle_temperature(workdir) < 1.0
    return workdir


@pytest.fixture
def trained_workdir(tmp_path, trained_run) -> str:
    """A copy of the trained run that a test may write to (reports, edits)."""
    return shutil.copytree(trained_run, str(tmp_path / "trained"))


def averaged_weights(workdir: str) -> tuple[dict, int]:
    """The best checkpoint's moving average (params and BatchNorm statistics) and step, read straight
    from its Orbax files, not through hwrjax's loaders."""
    import orbax.checkpoint as ocp

    best = os.path.join(os.path.abspath(workdir), "best")
    step = max(int(s) for s in os.listdir(best) if s.isdigit())
    with warnings.catch_warnings():  # "sharding info not provided": these are plain host arrays
        warnings.simplefilter("ignore", UserWarning)
        tree = ocp.PyTreeCheckpointer().restore(os.path.join(best, str(step), "model"))
    assert set(tree["ema"]) == {"params", "batch_stats"} and tree["ema"]["batch_stats"], "no averaged BatchNorm"
    return jax.tree.map(np.asarray, tree["ema"]), step


def oracle_logits(workdir: str, images_uint8: np.ndarray) -> np.ndarray:
    """Float64 logits of uint8 images [N, 28, 28(, 1)]: the run's model applied directly to pixels / 255
    with the averaged weights and statistics (the independent reference for inference tests)."""
    import ml_collections

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    model = models.create_model(config.model, num_classes=10, dtype="float32")
    variables, _ = averaged_weights(workdir)
    x = np.asarray(images_uint8, np.float32).reshape(-1, 28, 28, 1) / 255.0
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return np.concatenate([np.asarray(apply(variables, x[i:i + 500]), np.float64) for i in range(0, len(x), 500)])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def oracle_temperature(workdir: str) -> float:
    """The calibration temperature stored for the best checkpoint, read straight from
    WORKDIR/calibration.json (the run's readings divide their logits by it before the softmax)."""
    _, step = averaged_weights(workdir)
    with open(os.path.join(workdir, "calibration.json")) as f:
        return float(json.load(f)["checkpoints"][str(step)]["temperature"])


def oracle_probs(workdir: str, images_uint8: np.ndarray, calibrated: bool = True) -> np.ndarray:
    """Float64 probabilities of `oracle_logits`: at the run's stored temperature, or at T = 1."""
    logits = oracle_logits(workdir, images_uint8)
    return softmax(logits / oracle_temperature(workdir) if calibrated else logits)


@pytest.fixture(scope="session")
def mnist_test_slice() -> tuple[np.ndarray, np.ndarray]:
    """TRAINED_SPLIT's uint8 images [N, 28, 28, 1] and int labels, read by tfds directly."""
    skip_or_fail_without_mnist()
    import tensorflow_datasets as tfds

    data = tfds.as_numpy(tfds.load("mnist", split=TRAINED_SPLIT, batch_size=-1, data_dir=mnist_data_dir(),
                                   download=False))
    return np.asarray(data["image"], np.uint8), np.asarray(data["label"], np.int64)


# ---------------------------------------------------------------- what was skipped, and why


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Lists every skipped test with its reason, so a partial run says what it left out."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons: dict[str, list[str]] = {}
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons.setdefault(reason.removeprefix("Skipped: "), []).append(report.nodeid)
    terminalreporter.section(f"{len(skipped)} tests skipped: this run is not the whole suite")
    for reason, ids in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        files = sorted({i.split("::")[0] for i in ids})
        terminalreporter.write_line(f"{len(ids):4d}  {reason}  ({', '.join(files)})")


# ---------------------------------------------------------------- xdist: what must share a worker

# Where the workers write which tests must share one (nodeid -> group) for the controller's
# scheduler: with pytest 9.2 and pytest-xdist 3.8, xdist's own channel for xdist_group (a suffix
# added to the test ids on the workers) no longer reaches the controller, and loadgroup silently
# spreads a group's tests (pytest-dev/pytest-xdist#1386). Set by the controller, inherited by them.
XDIST_GROUPS_ENV = "HWRJAX_TEST_XDIST_GROUPS"


def pytest_configure(config):
    if (not hasattr(config, "workerinput") and config.pluginmanager.hasplugin("xdist")
            and config.getoption("dist", "no") == "loadgroup" and XDIST_GROUPS_ENV not in os.environ):
        folder = tempfile.mkdtemp(prefix="hwrjax-test-xdist-")
        os.environ[XDIST_GROUPS_ENV] = os.path.join(folder, "groups.json")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks (--dist=loadgroup)
def pytest_collection_modifyitems(config, items):
    """Keeps on one xdist worker the tests of a module that share a module- or class-scoped fixture
    (a trained or fine-tuned run, a server, a browser): spread over two workers, each would build
    it. The module's other tests, and tests that only share session fixtures, are spread freely."""
    groups = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        if any(defs and defs[-1].scope in ("module", "class", "package")
               for defs in (info.name2fixturedefs.get(name) for name in info.names_closure)):
            group = item.module.__name__ if item.module else item.nodeid
            item.add_marker(pytest.mark.xdist_group(group))
            groups[item.nodeid] = group
    if hasattr(config, "workerinput") and os.environ.get(XDIST_GROUPS_ENV):
        path = os.environ[XDIST_GROUPS_ENV]
        tmp = f"{path}.{config.workerinput['workerid']}"
        with open(tmp, "w") as f:
            json.dump(groups, f)
        os.replace(tmp, path)  # every worker collects the same tests: the same map


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist=loadgroup, with the groups the workers wrote (see XDIST_GROUPS_ENV)."""
    if config.getoption("dist", "no") != "loadgroup" or not os.environ.get(XDIST_GROUPS_ENV):
        return None
    from xdist.scheduler import LoadGroupScheduling

    class Scheduling(LoadGroupScheduling):
        _groups = None

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:  # first called once every worker has collected
                try:
                    with open(os.environ[XDIST_GROUPS_ENV]) as f:
                        self._groups = json.load(f)
                except FileNotFoundError:
                    self._groups = {}
            return self._groups.get(nodeid) or super()._split_scope(nodeid)

    return Scheduling(config, log)
