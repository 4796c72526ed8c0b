"""Checkpoints and resume: killed runs end bit for bit where uninterrupted runs end."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import resnet as resnet_config
from hwrjax import checkpoint, train
from hwrjax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A smoke ResNet long enough (4 epochs x 32 steps) to be killed part way through.
EPOCHS = 4
OVERRIDES = [f"--config.num_epochs={EPOCHS}", "--config.checkpoint.every_steps=12", "--config.log_every_steps=4",
             "--config.dataset.test_split=test[:500]", "--config.report_plots=False"]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _command(workdir: str, *extra: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "launch.py"), "--config=" + os.path.join(ROOT, "configs/resnet.py:smoke"),
            f"--workdir={workdir}", *OVERRIDES, *extra]


def _run(workdir: str, devices: int = 1, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(workdir, *extra), env=_env(devices), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _last_logged_step(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(line)["step"] for line in open(path) if line.strip().endswith("}")]
    return max(steps, default=0)


def _start_and_interrupt(workdir: str, sig: int, devices: int = 1, after_step: int = 40) -> subprocess.Popen:
    """Starts a run and sends `sig` once it has logged `after_step` (mid-epoch, past a checkpoint)."""
    proc = subprocess.Popen(_command(workdir), env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while _last_logged_step(workdir) < after_step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "run did not reach the kill step"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def _digest(workdir: str) -> str:
    variables, _ = checkpoint.load_variables(workdir, "latest")
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(variables):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Digests of uninterrupted runs, per device count."""
    if not os.environ.get("TFDS_DATA_DIR"):
        pytest.skip("set TFDS_DATA_DIR to a tfds data dir holding mnist")
    cache = {}

    def get(devices: int) -> str:
        if devices not in cache:
            workdir = str(tmp_path_factory.mktemp(f"reference{devices}"))
            _run(workdir, devices)
            cache[devices] = _digest(workdir)
            print(f"reference parameter sha256 on {devices} device(s): {cache[devices]}")
        return cache[devices]

    return get


@pytest.mark.parametrize("devices", [1, 8])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, reference, devices):
    workdir = str(tmp_path / "run")
    proc = _start_and_interrupt(workdir, signal.SIGKILL, devices)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint.Checkpointer(workdir).latest_step() < EPOCHS * 32  # it really was cut short
    _run(workdir, devices)
    digest = _digest(workdir)
    print(f"resumed parameter sha256 on {devices} device(s): {digest}")
    assert digest == reference(devices)


@pytest.mark.parametrize("devices", [1, 8])
def test_sigterm_saves_exits_cleanly_and_resume_is_identical(tmp_path, reference, devices):
    workdir = str(tmp_path / "run")
    proc = _start_and_interrupt(workdir, signal.SIGTERM, devices)
    err = proc.stderr.read()
    assert proc.returncode == 0, err[-2000:]
    assert "rerun the same command to resume" in err
    stopped_at = _last_logged_step(workdir)
    saved = checkpoint.Checkpointer(workdir).latest_step()
    assert saved is not None and stopped_at <= saved < EPOCHS * 32  # saved where it stopped, before the end
    _run(workdir, devices)
    assert _digest(workdir) == reference(devices)
    # A finished run is not retrained: it says so and reports again.
    lines_before = open(os.path.join(workdir, "metrics.jsonl")).read().count("train_loss")
    again = _run(workdir, devices)
    assert "already finished" in again.stderr
    assert open(os.path.join(workdir, "metrics.jsonl")).read().count("train_loss") == lines_before
    assert "test accuracy" in again.stdout


def test_damaged_checkpoint_falls_back_to_an_older_one(tmp_path, reference):
    workdir = str(tmp_path / "run")
    _start_and_interrupt(workdir, signal.SIGKILL, after_step=60)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
    assert len(steps) >= 2
    newest = os.path.join(ckpt_dir, str(steps[-1]))
    # Truncate every data file of the newest checkpoint's model item.
    damaged = 0
    for root, _, files in os.walk(os.path.join(newest, "model")):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 0:
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 3)
                damaged += 1
    assert damaged
    proc = _run(workdir)
    assert f"step {steps[-1]}" in proc.stderr and "damaged" in proc.stderr and newest in proc.stderr
    assert _digest(workdir) == reference(1)


def test_no_readable_checkpoint_never_silently_restarts(tmp_path, untrained_workdir):
    # Wipe the metadata of the only checkpoint: resume must refuse, not start from scratch.
    ckpt_dir = os.path.join(untrained_workdir, "checkpoints", "0")
    for item in ("model", "opt"):
        shutil.rmtree(os.path.join(ckpt_dir, item))
    config = checkpoint.load_config(untrained_workdir)
    state = train.create_train_state(*_model_and_tx(config), jax.random.key(0))
    with pytest.raises(Exception, match="no readable checkpoint"):
        checkpoint.Checkpointer(untrained_workdir).restore_latest(state)


def _model_and_tx(config):
    from hwrjax import models, optim

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
