"""Checkpoints and resume: killed runs end bit for bit where uninterrupted runs end."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import conftest
from hwrjax import models
from hwrjax.apps import train
from hwrjax.core import train_state
from hwrjax.core.errors import ConfigError
from hwrjax.training import checkpoint
from hwrjax.training import preemption as preemption_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A smoke ResNet long enough (3 epochs x 32 steps) to be interrupted twice part way through.
EPOCHS = 3
TOTAL_STEPS = EPOCHS * 32
# How far pmap's parameters may drift from jit's after 96 steps, relative to each array's norm
# (worst array, median array; measured: see the test).
PMAP_MAX_DRIFT, PMAP_MEDIAN_DRIFT = 0.05, 0.005
# It keeps a moving average of the weights, which must resume bit for bit too.
OVERRIDES = [f"--config.num_epochs={EPOCHS}", "--config.checkpoint.every_steps=12", "--config.log_every_steps=4",
             "--config.dataset.test_split=test[:500]", "--config.report_plots=False", "--config.ema_decay=0.9"]


def _env(devices: int, signal_at: str = "") -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop(preemption_lib.SIGNAL_AT_STEP_ENV, None)
    if signal_at:
        env[preemption_lib.SIGNAL_AT_STEP_ENV] = signal_at  # the loop signals itself after that step
    return env


def _command(workdir: str, *extra: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "launch.py"), "--config=" + os.path.join(ROOT, "configs/resnet.py:smoke"),
            f"--workdir={workdir}", *OVERRIDES, *extra]


def _run(workdir: str, devices: int = 1, *extra: str, signal_at: str = "") -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(workdir, *extra), env=_env(devices, signal_at), capture_output=True, text=True,
                          timeout=600)
    if not signal_at:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _last_logged_step(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(line)["step"] for line in open(path) if line.strip().endswith("}")]
    return max(steps, default=0)


def _digest(workdir: str) -> str:
    """sha256 of the latest weights and of their moving average (which must differ)."""
    h = hashlib.sha256()
    raw, averaged = (checkpoint.load_variables(workdir, "latest", average=a)[0] for a in (False, True))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(averaged)))
    for leaf in jax.tree.leaves((raw, averaged)):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def _damage_newest_checkpoint(workdir: str) -> tuple[int, str]:
    """Truncates every data file of the newest checkpoint's model item; returns its step and path."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
    assert len(steps) >= 2, steps  # an older one to fall back to
    newest = os.path.join(ckpt_dir, str(steps[-1]))
    damaged = 0
    for root, _, files in os.walk(os.path.join(newest, "model")):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 0:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 3)
                damaged += 1
    assert damaged
    return steps[-1], newest


# The uninterrupted runs each interrupted run must end identical to: (devices, parallel mode).
REFERENCES = [(1, "jit"), (8, "jit"), (8, "pmap")]


def _parallel_flag(mode: str) -> list[str]:
    return [f"--config.parallel={mode}"] if mode != "jit" else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Workdirs and digests of uninterrupted runs (REFERENCES), all started at once in the background."""
    if not conftest.mnist_available():
        conftest.skip_or_fail_without_mnist()
    started = {}
    for devices, mode in REFERENCES:
        root = tmp_path_factory.mktemp(f"reference{devices}{mode}")
        log = open(root / "stderr.log", "w+")  # a file, not a pipe: a full pipe would stall the run
        started[devices, mode] = (str(root / "run"), log, subprocess.Popen(
            _command(str(root / "run"), *_parallel_flag(mode)), env=_env(devices), stdout=subprocess.DEVNULL,
            stderr=log))
    cache = {}

    def get(devices: int, mode: str = "jit") -> tuple[str, str]:
        if (devices, mode) not in cache:
            workdir, log, proc = started[devices, mode]
            proc.wait(timeout=900)
            log.seek(0)
            assert proc.returncode == 0, log.read()[-3000:]
            cache[devices, mode] = workdir, _digest(workdir)
            print(f"reference parameter sha256 on {devices} device(s), {mode}: {cache[devices, mode][1]}")
        return cache[devices, mode]

    yield get
    for _, log, proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.parametrize("devices", [1, 8])
def test_interrupted_three_ways_ends_bitwise_identical(tmp_path, reference, devices):
    """SIGTERM, then SIGKILL, then a damaged newest checkpoint: the run still ends bit for bit as
    the uninterrupted one, and relaunching a finished run does not train again."""
    workdir = str(tmp_path / "run")

    # SIGTERM (a scheduler's preemption notice) after step 28, between checkpoints: saves there and
    # exits 0 with a hint.
    proc = _run(workdir, devices, signal_at="28:SIGTERM")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rerun the same command to resume" in proc.stderr and "at step 28" in proc.stderr
    assert checkpoint.Checkpointer(workdir).latest_step() == 28 == _last_logged_step(workdir)

    # Resume, then SIGKILL (no chance to save) after step 70, in the next epoch.
    proc = _run(workdir, devices, signal_at="70:SIGKILL")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert f"Resuming from step 28 of {TOTAL_STEPS}" in proc.stderr  # the newest checkpoint
    assert 28 < checkpoint.Checkpointer(workdir).latest_step() <= 70  # it resumed and was cut short
    assert _last_logged_step(workdir) == 68  # the last log row (every 4 steps) before the kill

    # The newest checkpoint is damaged (e.g. the disk filled while it was written): resume reports it
    # with its step and path and falls back to the one before.
    step, newest = _damage_newest_checkpoint(workdir)
    proc = _run(workdir, devices)
    assert f"step {step}" in proc.stderr and "damaged" in proc.stderr and newest in proc.stderr
    digest = _digest(workdir)
    print(f"resumed parameter sha256 on {devices} device(s): {digest}")
    assert digest == reference(devices)[1]

    # A finished run is not retrained: it says so and reports again.
    lines_before = open(os.path.join(workdir, "metrics.jsonl")).read().count("train_loss")
    again = _run(workdir, devices)
    assert "already finished" in again.stderr
    assert open(os.path.join(workdir, "metrics.jsonl")).read().count("train_loss") == lines_before
    assert "test accuracy" in again.stdout


def test_pmap_run_killed_and_resumed_is_bitwise_its_own_and_close_to_jit(tmp_path, reference):
    """--config.parallel=pmap on 8 devices end to end: train, checkpoint, SIGKILL, resume."""
    workdir = str(tmp_path / "run")
    proc = _run(workdir, 8, "--config.parallel=pmap", signal_at="40:SIGKILL")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert checkpoint.Checkpointer(workdir).latest_step() in (32, 36)  # epoch end, then every 12 steps
    _run(workdir, 8, "--config.parallel=pmap")
    pmap_dir, pmap_digest = reference(8, "pmap")
    assert _digest(workdir) == pmap_digest
    # The same run under jit agrees to float32 rounding compounded over 96 steps: measured here, the
    # worst parameter array differs by 1.2% of its norm (as much as 1 device against 8 under jit),
    # the median by 0.1%, and the test loss by 2e-5 of itself.
    jit_dir, _ = reference(8, "jit")
    for average in (False, True):
        got = checkpoint.load_variables(pmap_dir, "latest", average=average)[0]
        want = checkpoint.load_variables(jit_dir, "latest", average=average)[0]
        drift = [np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))
                 for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
        assert max(drift) < PMAP_MAX_DRIFT and np.median(drift) < PMAP_MEDIAN_DRIFT, drift
    reports = [json.load(open(os.path.join(d, "report", "test_metrics.json"))) for d in (pmap_dir, jit_dir)]
    assert reports[0]["num_examples"] == reports[1]["num_examples"] == 500
    assert reports[0]["loss"] == pytest.approx(reports[1]["loss"], rel=1e-3)
    assert abs(reports[0]["accuracy"] - reports[1]["accuracy"]) <= 2 / 500


def test_signal_hook_refuses_a_malformed_value(monkeypatch):
    monkeypatch.setenv(preemption_lib.SIGNAL_AT_STEP_ENV, "")
    assert preemption_lib.signal_at_step_hook() is None
    monkeypatch.setenv(preemption_lib.SIGNAL_AT_STEP_ENV, "12:SIGTERM")
    assert preemption_lib.signal_at_step_hook() == (12, signal.SIGTERM)
    for bad in ("SIGTERM", "12", "12:TERM", "x:SIGKILL"):
        monkeypatch.setenv(preemption_lib.SIGNAL_AT_STEP_ENV, bad)
        with pytest.raises(ConfigError, match="STEP:SIGNAL"):
            preemption_lib.signal_at_step_hook()


def test_no_readable_checkpoint_never_silently_restarts(tmp_path, untrained_workdir):
    # Wipe the metadata of the only checkpoint: resume must refuse, not start from scratch.
    ckpt_dir = os.path.join(untrained_workdir, "checkpoints", "0")
    for item in ("model", "opt"):
        shutil.rmtree(os.path.join(ckpt_dir, item))
    config = checkpoint.load_config(untrained_workdir)
    model, tx = _model_and_tx(config)
    state = jax.jit(lambda k: train_state.create_train_state(model, tx, k))(jax.random.key(0))
    with pytest.raises(Exception, match="no readable checkpoint"):
        checkpoint.Checkpointer(untrained_workdir).restore_latest(state)


def _model_and_tx(config):
    from hwrjax.core import optim

    model = models.create_model(config.model, 10)
    tx = optim.make_optimizer(config, optim.make_schedule(config, 10, config.num_epochs))
    return model, tx


def test_changed_config_is_refused_with_the_differences(untrained_workdir):
    config = checkpoint.load_config(untrained_workdir)
    c = type(config)(json.loads(config.to_json()))
    c.optimizer.learning_rate = 0.5
    c.num_epochs = 7
    with pytest.raises(ConfigError, match=r"num_epochs: 2 -> 7; optimizer.learning_rate: 0.1 -> 0.5.*--allow_config_change"):
        train.train_and_evaluate(c, untrained_workdir)


def test_load_variables_for_inference(untrained_workdir):
    variables, step = checkpoint.load_variables(untrained_workdir, "best")
    assert step == 0 and set(variables) == {"params", "batch_stats"}
    assert checkpoint.load_variables(untrained_workdir, 0)[1] == 0
    with pytest.raises(Exception, match="no checkpoint at step 5"):
        checkpoint.load_variables(untrained_workdir, 5)
    with pytest.raises(Exception, match="has no checkpoint"):
        checkpoint.load_variables(os.path.dirname(untrained_workdir) + "/nothing_here")


def test_relative_workdir_saves_restores_and_loads(untrained_workdir, monkeypatch):
    # The README's command passes a relative --workdir (runs/resnet); Orbax reads checkpoint
    # metadata from absolute paths only, so every checkpoint entry point must resolve it.
    monkeypatch.chdir(os.path.dirname(untrained_workdir))
    relative = os.path.basename(untrained_workdir)
    assert checkpoint.load_variables(relative, "best")[1] == 0
    assert checkpoint.load_variables(relative, "latest")[1] == 0
    config = checkpoint.load_config(relative)
    model, tx = _model_and_tx(config)
    state = jax.jit(lambda k: train_state.create_train_state(model, tx, k))(jax.random.key(1))
    ckpt = checkpoint.Checkpointer(relative, keep=2, async_save=False)
    ckpt.save_best(7, state, {"best_step": 7})
    restored, _ = ckpt.restore_latest(state)
    ckpt.close()
    assert int(restored.step) == 0
    variables, step = checkpoint.load_variables(relative, "best")
    assert step == 7
    np.testing.assert_array_equal(variables["params"]["stem"]["kernel"], state.params["stem"]["kernel"])


def test_absolute_path_keeps_urls():
    assert checkpoint.absolute_path("gs://bucket/runs/resnet") == "gs://bucket/runs/resnet"
    assert checkpoint.absolute_path("runs/x") == os.path.join(os.getcwd(), "runs", "x")
