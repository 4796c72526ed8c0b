"""Two real OS processes on jax.distributed (localhost, CPU collectives): train, checkpoint,
resume, and match the one-process run."""

import hashlib
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import conftest

from hwrjax.training import checkpoint, preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Without space-to-depth or the weight average this smoke run's best validation checkpoint is
# usually an earlier step than its last, so the final report places a checkpoint other than the
# live state on the devices of both processes.
OVERRIDES = ["--config.num_epochs=2", "--config.dataset.limit_train=1024", "--config.dataset.test_split=test[:256]",
             "--config.checkpoint.every_steps=8", "--config.report_plots=False", "--config.model.space_to_depth=False",
             "--config.ema_decay=0.0"]


def _reserved_port() -> int:
    """A localhost port for the coordinator that no other program is handed meanwhile.

    Bound, connected to and closed here, the port sits in TIME_WAIT for a minute: the kernel
    then gives it to no other bind(0) or outgoing connection, while a server that sets
    SO_REUSEADDR (gRPC, which runs jax.distributed's coordinator, does) can still listen on it.
    """
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = server.accept()
            accepted.close()  # this side closes first, so the TIME_WAIT is on the port
    return port


def _launch(workdir: str, env: dict, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "--config=" + os.path.join(ROOT, "configs/resnet.py:smoke"),
           f"--workdir={workdir}", *OVERRIDES, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _start_two_processes(workdir: str, signal_at: dict[int, str] | None = None) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one run; `signal_at` {process: "STEP:SIGNAL"} makes a process signal itself."""
    port = _reserved_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.pop(preemption.SIGNAL_AT_STEP_ENV, None)
    envs = [dict(env, **({preemption.SIGNAL_AT_STEP_ENV: signal_at[i]} if i in (signal_at or {}) else {}))
            for i in range(2)]
    return [_launch(workdir, envs[i], f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={i}") for i in range(2)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [o[0] for o in outs]


def _digest(workdir: str) -> tuple[str, list]:
    variables, _ = checkpoint.load_variables(workdir, "latest")
    leaves = [np.asarray(x) for x in jax.tree.leaves(variables)]
    return hashlib.sha256(b"".join(x.tobytes() for x in leaves)).hexdigest(), leaves


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """An uninterrupted two-process run, started at once in the background: a callable that waits
    for it and returns (workdir, the outputs of both processes, its final weights)."""
    if not conftest.mnist_available():
        conftest.skip_or_fail_without_mnist()
    workdir = str(tmp_path_factory.mktemp("two") / "run")
    procs = _start_two_processes(workdir)
    done = {}

    def get():
        if not done:
            outs = _finish(procs)
            done.update(outs=outs, leaves=_digest(workdir)[1])
        return workdir, done["outs"], done["leaves"]

    yield get
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_two_processes_train_checkpoint_and_match_one_process(tmp_path, two_process_run):
    # Meanwhile (the two-process run started with the fixture), one process with two devices: the
    # same global computation.
    one = str(tmp_path / "one")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    _finish([_launch(one, env)])
    two, outs, two_leaves = two_process_run()
    assert "test accuracy" in outs[0] and "test accuracy" not in outs[1]  # reports from process 0 only
    ckpt_dir = os.path.join(two, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
    assert steps[-1] == 32
    # Whichever epoch validated best is the best checkpoint, and the report is that checkpoint's.
    rows = [json.loads(line) for line in open(os.path.join(two, "metrics.jsonl"))]
    val = [(r["val_accuracy"], -r["step"]) for r in rows if "val_accuracy" in r]
    assert len(val) == 2
    best_step = -max(val)[1]  # the first step reaching the highest accuracy
    assert os.listdir(os.path.join(two, "best")) == [str(best_step)]
    with open(os.path.join(two, "report", "test_metrics.json")) as f:
        report = json.load(f)
    assert report["checkpoint_step"] == best_step and report["num_examples"] == 256
    with open(os.path.join(one, "report", "test_metrics.json")) as f:
        one_report = json.load(f)
    assert one_report["checkpoint_step"] == best_step
    assert report["accuracy"] == pytest.approx(one_report["accuracy"], abs=1 / 256)
    _, one_leaves = _digest(one)
    for a, b in zip(two_leaves, one_leaves):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Resuming both processes from a checkpoint and ending bit for bit as this run: the SIGTERM test
    # below (one relaunch of two processes serves both tests).


def test_sigterm_on_one_process_stops_both_at_the_same_step_and_resumes_bitwise(tmp_path, two_process_run):
    """Only process 1 is preempted (SIGTERM after step 5): both processes agree to stop at the next
    step where they meet anyway (step 8, logged and checkpointed), both save it and exit as preempted
    runs do, and the resumed run ends bit for bit as the uninterrupted one."""
    workdir = str(tmp_path / "run")
    procs = _start_two_processes(workdir, signal_at={1: "5:SIGTERM"})
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]  # launch.py's status for a preempted, saved run
        assert "stopped by signal 15 (received by process 1) at step 8;" in err, err[-3000:]
        assert "rerun the same command to resume" in err and "test accuracy" not in out
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [8]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert max(r["step"] for r in rows) == 8

    outs = _finish(_start_two_processes(workdir))
    assert "test accuracy" in outs[0]
    _, resumed = _digest(workdir)
    _, _, reference = two_process_run()
    for a, b in zip(resumed, reference):
        np.testing.assert_array_equal(a, b)


def test_processes_that_disagree_on_the_config_stop_before_training(tmp_path):
    port = _reserved_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    workdir = str(tmp_path / "run")
    procs = [_launch(workdir, env, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                     f"--process_id={i}", f"--config.seed={i}") for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err[-2000:]
        assert "hwrjax: error: the processes of this run were given different configs" in err
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
