"""Faults and hostile input against training, checkpoints and the commands (issue 18, findings 4-8).

Each test reproduces one finding at smoke scale: damaged checkpoints, two launches on one
workdir, a diverging run, a full disk, damaged config files, FIFOs, metrics after resumes,
a read-only workdir and the coordinator's listening address.
"""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from hwrjax import models
from hwrjax.cli import evaluate as evaluate_cli
from hwrjax.cli import export as export_cli
from hwrjax.cli import finetune as finetune_cli
from hwrjax.cli import predict as predict_cli
from hwrjax.core import train_state
from hwrjax.core.errors import CheckpointError, Diverged, WorkdirBusy
from hwrjax.inference import loader as loader_lib
from hwrjax.training import checkpoint, logs, runlock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A linear model trained by SGD on squared error with learning rate 2 grows its loss ~1000x a step
# and overflows at step 15: after the checkpoint of step 10, before the log of step 16.
DIVERGING = ["--config.optimizer.name=sgd", "--config.loss.name=mse", "--config.schedule.name=constant",
             "--config.schedule.warmup_epochs=0", "--config.model.hidden_sizes=()",
             "--config.optimizer.learning_rate=2.0"]
QUICK = ["--config.report_plots=False", "--config.dataset.test_split=test[:500]"]


def _launch(workdir, *extra, config="configs/mlp.py:smoke", timeout=600):
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={os.path.join(ROOT, config)}",
           f"--workdir={workdir}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def _one_line(stderr: str, code: int, returncode: int) -> str:
    """The one `hwrjax...error:` line of a failed command (no traceback, exactly one such line)."""
    assert returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("hwrjax") and "error:" in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _cli(main, capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def _data_file(workdir: str, which: str = "best") -> str:
    """The largest array data file of the newest `which` checkpoint's model item."""
    steps = sorted(os.listdir(os.path.join(workdir, which)), key=int)
    files = glob.glob(os.path.join(workdir, which, steps[-1], "model", "**", "d", "*"), recursive=True)
    return max(files, key=os.path.getsize)


def _damage(path: str, kind: str) -> None:
    data = bytearray(open(path, "rb").read())
    n = len(data)
    if kind == "zeros":
        data[n // 3: 2 * n // 3] = bytes(2 * n // 3 - n // 3)
    elif kind == "garbage":
        data[n // 3: 2 * n // 3] = np.random.default_rng(0).integers(0, 256, 2 * n // 3 - n // 3, np.uint8).tobytes()
    else:  # one flipped bit
        data[n // 2] ^= 0x10
    with open(path, "wb") as f:
        f.write(bytes(data))


# ----------------------------------------------------------------------------------- checkpoints (finding 4)


def _state(seed: int):
    from conftest import small_resnet_config

    from hwrjax.core import optim

    config = small_resnet_config()
    model = models.create_model(config.model, num_classes=10, dtype=config.dtype)
    tx = optim.make_optimizer(config, optim.make_schedule(config, 10, config.num_epochs))
    return jax.jit(lambda k: train_state.create_train_state(model, tx, k))(jax.random.key(seed))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A workdir (config.json, checkpoints at steps 1 and 2 with different weights, best = 2)."""
    from conftest import make_workdir

    path = make_workdir(str(tmp_path_factory.mktemp("ckpt") / "run"))
    shutil.rmtree(os.path.join(path, "checkpoints"))
    shutil.rmtree(os.path.join(path, "best"))
    meta = {"best_val_accuracy": 0.1, "best_step": 2, "epochs_without_improvement": 0, "stopped_early": False,
            "wall_time_s": 0.0}
    ckpt = checkpoint.Checkpointer(path, keep=3, async_save=False)
    for step in (1, 2):
        state = _state(step).replace(step=jnp.asarray(step, jnp.int32))
        ckpt.save(step, state, meta)
    ckpt.save_best(2, state, meta)
    ckpt.close()
    return path


@pytest.fixture
def run_copy(two_checkpoints, tmp_path):
    return shutil.copytree(two_checkpoints, str(tmp_path / "run"))


@pytest.mark.parametrize("kind", ["zeros", "garbage", "bit"])
def test_damaged_checkpoint_is_refused_by_every_loader(run_copy, kind, capsys, tmp_path):
    intact, _ = checkpoint.load_variables(run_copy, "latest")
    _damage(_data_file(run_copy, "best"), kind)
    with pytest.raises(CheckpointError, match="damaged"):
        checkpoint.load_variables(run_copy, "best")
    # The one model loader of predict, serve, evaluate, export and finetune refuses it in one line.
    code, err = _cli(predict_cli.predict_main, capsys, f"--workdir={run_copy}", str(tmp_path))
    assert "damaged" in _one_line(err, 2, code)
    code, err = _cli(export_cli.export_main, capsys, f"--workdir={run_copy}", "--format=stablehlo",
                     f"--output={tmp_path / 'm'}")
    assert "damaged" in _one_line(err, 2, code)
    code, err = _cli(finetune_cli.finetune_main, capsys, f"--workdir={run_copy}", f"--samples={tmp_path}",
                     f"--output-workdir={tmp_path / 'tuned'}")
    assert "damaged" in _one_line(err, 2, code)
    with pytest.raises(CheckpointError, match="damaged"):
        loader_lib.load_model(run_copy, "best")
    # The other checkpoints are untouched and still load.
    latest, step = checkpoint.load_variables(run_copy, "latest")
    assert step == 2 and all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(latest), jax.tree.leaves(intact)))


@pytest.mark.parametrize("kind", ["zeros", "garbage", "bit"])
def test_resume_falls_back_from_a_damaged_newest_checkpoint(run_copy, kind):
    _damage(_data_file(run_copy, "checkpoints"), kind)
    ckpt = checkpoint.Checkpointer(run_copy, keep=3, async_save=False)
    try:
        state, meta = ckpt.restore_latest(_state(99))
    finally:
        ckpt.close()
    assert int(state.step) == 1 and "checksums" not in meta
    older, _ = checkpoint.load_variables(run_copy, 1)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(older["params"])))


def test_non_finite_weights_are_never_saved(run_copy):
    state = _state(3)
    leaves, treedef = jax.tree.flatten(state.params)
    poisoned = state.replace(params=jax.tree.unflatten(treedef, [leaves[0].at[0].set(jnp.nan)] + leaves[1:]),
                             step=jnp.asarray(5, jnp.int32))
    ckpt = checkpoint.Checkpointer(run_copy, keep=3, async_save=False)
    try:
        with pytest.raises(Diverged, match="not finite"):
            ckpt.save(5, poisoned, {})
        with pytest.raises(Diverged, match="not finite"):
            ckpt.save_best(5, poisoned, {})
        assert ckpt.latest_step() == 2
    finally:
        ckpt.close()
    assert sorted(os.listdir(os.path.join(run_copy, "checkpoints"))) == ["1", "2"]
    assert os.listdir(os.path.join(run_copy, "best")) == ["2"]


def test_checkpoint_removed_while_read_is_read_again_or_one_line(run_copy, monkeypatch):
    """A running training rotates `best` (or the oldest latest) out while a command reads it."""
    import orbax.checkpoint as ocp

    real_restore = ocp.CheckpointManager.restore
    calls = []

    def restore_then_vanish(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 1:  # the training replaces best/2 by best/3 under the reader's feet
            best = os.path.join(run_copy, "best")
            shutil.copytree(os.path.join(best, "2"), os.path.join(best, "3"))
            shutil.rmtree(os.path.join(best, "2"))
        return real_restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore_then_vanish)
    _, step = checkpoint.load_variables(run_copy, "best")
    assert step == 3 and calls == [2, 3]
    # A fixed step that disappears is one line naming the fix.
    calls.clear()
    monkeypatch.setattr(ocp.CheckpointManager, "restore", lambda self, step, *a, **k: (
        shutil.rmtree(os.path.join(run_copy, "checkpoints", str(step))), real_restore(self, step, *a, **k))[1])
    with pytest.raises(CheckpointError, match="removed while it was read"):
        checkpoint.load_variables(run_copy, 1)


# ----------------------------------------------------------------------------------- one run per workdir (finding 5)


def test_second_launch_is_refused_while_the_first_runs(tmp_path, require_mnist):
    workdir = str(tmp_path / "run")
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"),
                              f"--config={os.path.join(ROOT, 'configs/mlp.py:smoke')}", f"--workdir={workdir}",
                              "--config.seed=1", *QUICK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock_file = os.path.join(workdir, runlock.LOCK_NAME)
    deadline = time.time() + 300
    while not (os.path.exists(lock_file) and os.path.getsize(lock_file) > 0):
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.time() < deadline, "the first run never took its lock"
        time.sleep(0.05)
    second = _launch(workdir, "--config.seed=2", "--config.optimizer.learning_rate=0.01", *QUICK)
    line = _one_line(second.stderr, 2, second.returncode)
    assert f"process {first.pid} on host {socket.gethostname()}" in line and "in use" in line
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    # config.json and the report are the first run's alone.
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["seed"] == 1 and saved["optimizer"]["learning_rate"] == 0.001
    # Its lock died with it: a rerun (of a finished run) is let in, and adds no duplicate metrics row.
    rows_before = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    again = _launch(workdir, "--config.seed=1", *QUICK)
    assert again.returncode == 0, again.stderr[-3000:]
    rows_after = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
    assert len(rows_after) == len(rows_before)
    keys = [(json.loads(r)["step"], tuple(sorted(json.loads(r)))) for r in rows_after]
    assert len(keys) == len(set(keys))


def test_lock_of_a_killed_process_is_stale(tmp_path):
    workdir = str(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from hwrjax.training import runlock; "
                               f"runlock.acquire({workdir!r}); print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirBusy, match=f"process {holder.pid} on host"):
        runlock.acquire(workdir)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    with runlock.acquire(workdir):
        with pytest.raises(WorkdirBusy, match=f"process {os.getpid()}"):
            runlock.acquire(workdir)
    runlock.acquire(workdir).release()


def test_failed_launch_leaves_a_missing_config_missing(tmp_path, require_mnist):
    workdir = str(tmp_path / "run")
    first = _launch(workdir, "--config.num_epochs=1", *QUICK)
    assert first.returncode == 0, first.stderr[-3000:]
    os.remove(os.path.join(workdir, "config.json"))
    # Another model cannot read these checkpoints: the launch fails and must not claim the workdir.
    other = _launch(workdir, "--config.num_epochs=1", "--config.model.hidden_sizes=(32,)", *QUICK)
    line = _one_line(other.stderr, 2, other.returncode)
    assert "hold another model than this config" in line and "saved (256,), this config (32,)" in line
    assert not os.path.exists(os.path.join(workdir, "config.json"))
    # The original run is still welcome, and its config.json is back.
    again = _launch(workdir, "--config.num_epochs=2", "--allow_config_change", *QUICK)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.load(open(os.path.join(workdir, "config.json")))["num_epochs"] == 2


# ----------------------------------------------------------------------------------- NaN (finding 6)


def test_diverging_run_stops_keeps_its_last_finite_checkpoint_and_resumes_with_a_lower_rate(tmp_path,
                                                                                           require_mnist):
    workdir = str(tmp_path / "run")
    proc = _launch(workdir, *DIVERGING, *QUICK)
    line = _one_line(proc.stderr, 3, proc.returncode)
    assert "diverged at step 15" in line and "resume from step 10" in line
    assert "--config.optimizer.learning_rate" in line and "--allow_config_change" in line
    ckpt_steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert ckpt_steps == [10]
    variables, _ = checkpoint.load_variables(workdir, "latest")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))
    rows = [json.loads(r) for r in open(os.path.join(workdir, "metrics.jsonl"))]
    assert all(np.isfinite(r["train_loss"]) for r in rows if "train_loss" in r)

    # The advice without the flag is refused in one line naming the changed field...
    lower = [a for a in DIVERGING if "learning_rate" not in a] + ["--config.optimizer.learning_rate=0.005"]
    refused = _launch(workdir, *lower, *QUICK)
    assert "optimizer.learning_rate: 2.0 -> 0.005" in _one_line(refused.stderr, 2, refused.returncode)
    # ...and with it the run resumes from the last finite checkpoint and finishes.
    resumed = _launch(workdir, *lower, *QUICK, "--allow_config_change")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 10 " in resumed.stderr
    assert json.load(open(os.path.join(workdir, "config.json")))["optimizer"]["learning_rate"] == 0.005
    rows = [json.loads(r) for r in open(os.path.join(workdir, "metrics.jsonl"))]
    train_steps = [r["step"] for r in rows if "train_loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 64  # one row per logged step
    assert 8 in train_steps and all(np.isfinite(r["train_loss"]) for r in rows if "train_loss" in r)


def test_metrics_rows_after_the_resume_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train_loss": 1.0} for s in (8, 16, 24)] + [{"step": 16, "val_accuracy": 0.5},
                                                                      {"step": 16, "test_accuracy": 0.4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3')  # a line cut by a kill
    logs.keep_rows_until(str(path), 16)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [rows[0], rows[1], rows[3]]


# ----------------------------------------------------------------------------------- one-line errors (finding 7)


@pytest.mark.parametrize("args,message", [
    (["--config=missing.py"], "cannot load --config=missing.py"),
    (["--config=configs/resnet.py:bogus"], "unknown variant 'bogus'"),
    (["--config.dataset.test_split=test[abc]"], "test_split='test[abc]' is not a split"),
    (["--config.optimizer.learning_rate=nan"], "learning_rate is nan"),
    (["--config.augment.rotation_deg=inf"], "rotation_deg is inf"),
    (["--config.optimizer.momentum=1.5"], "momentum must be in [0.0, 1.0)"),
    (["--coordinator_address=127.0.0.1:1234"], "pass all of --coordinator_address"),
])
def test_bad_launch_is_one_line(tmp_path, args, message):
    config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), "configs/mlp.py:smoke")
    rest = [a for a in args if not a.startswith("--config=")]
    if config == "missing.py":  # relative to the working directory, as a user types it
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), "--config=missing.py",
                               f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)
    else:
        proc = _launch(str(tmp_path / "run"), *rest, config=config, timeout=300)
    assert message in _one_line(proc.stderr, 2, proc.returncode)
    assert not os.path.exists(tmp_path / "run" / "config.json")


@pytest.mark.parametrize("content", ["", "{not json", "[]", "\x00\x00\x00", '{"seed": 0}'])
def test_damaged_config_json_is_one_line_in_every_command(untrained_workdir, tmp_path, capsys, content):
    with open(os.path.join(untrained_workdir, "config.json"), "w") as f:
        f.write(content)
    code, err = _cli(predict_cli.predict_main, capsys, f"--workdir={untrained_workdir}", str(tmp_path))
    assert "config.json" in _one_line(err, 2, code)
    code, err = _cli(evaluate_cli.evaluate_main, capsys, f"--workdir={untrained_workdir}", f"--output={tmp_path}/r.json")
    assert "config.json" in _one_line(err, 2, code)
    code, err = _cli(export_cli.export_main, capsys, f"--workdir={untrained_workdir}", "--format=stablehlo",
                     f"--output={tmp_path / 'm'}")
    assert "config.json" in _one_line(err, 2, code)


def test_damaged_config_json_is_one_line_in_serve_and_launch(untrained_workdir, tmp_path):
    with open(os.path.join(untrained_workdir, "config.json"), "w") as f:
        f.write("{not json")
    serve = subprocess.run([sys.executable, "-m", "hwrjax.cli", "serve", f"--workdir={untrained_workdir}",
                            "--port=0"], capture_output=True, text=True, timeout=300)
    assert "config.json" in _one_line(serve.stderr, 2, serve.returncode)
    launch = _launch(untrained_workdir, timeout=300)
    assert "config.json" in _one_line(launch.stderr, 2, launch.returncode)


def _can_mount_tmpfs(path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_is_one_line_and_keeps_what_was_saved(tmp_path, require_mnist):
    disk = tmp_path / "disk"
    # A smoke ResNet checkpoint takes ~280 KB: two fit, the third (or the best beside them) does not.
    if not _can_mount_tmpfs(disk, "700k"):
        pytest.skip("needs root and mount to make a small full disk (a 700 KB tmpfs)")
    try:
        workdir = str(disk / "run")
        proc = _launch(workdir, *QUICK, config="configs/resnet.py:smoke")
        line = _one_line(proc.stderr, 2, proc.returncode)
        assert "no space left" in line and "rerun the same command to resume" in line
        variables, step = checkpoint.load_variables(workdir, "latest")  # what was saved is intact
        assert step > 0 and f"step {step} is kept" in line
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ----------------------------------------------------------------------------------- odd cases (finding 8)


def test_fifo_is_skipped_not_opened(untrained_workdir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    digit = np.full((80, 60), 255, np.uint8)
    digit[10:70, 26:34] = 0  # a dark "1" on white paper
    Image.fromarray(digit).save(folder / "a.png")
    os.mkfifo(folder / "b.png")
    os.mkfifo(tmp_path / "x.png")
    # A reader that blocks on a FIFO would never return: the timeout guards the test, it measures nothing.
    proc = subprocess.run([sys.executable, "-m", "hwrjax.cli", "predict", f"--workdir={untrained_workdir}",
                           "--format=json", str(tmp_path / "x.png"), str(folder)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {os.path.basename(r["path"]): r for r in json.loads(proc.stdout)}
    assert set(rows) == {"x.png", "a.png", "b.png"}
    assert "FIFO" in rows["x.png"]["error"] and "FIFO" in rows["b.png"]["error"]
    assert rows["a.png"]["error"] is None and len(rows["a.png"]["text"]) == 1


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_predict_onto_a_full_disk_says_so_in_one_line(untrained_workdir, tmp_path):
    # Its table written where there is no room: one line naming the fault and the fix, exit code 1,
    # not a traceback (before: "OSError: [Errno 28]" from sys.stdout.write).
    digit = np.full((80, 60), 255, np.uint8)
    digit[10:70, 26:34] = 0
    Image.fromarray(digit).save(tmp_path / "a.png")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "hwrjax.cli", "predict", f"--workdir={untrained_workdir}",
                               str(tmp_path / "a.png")], stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("hwrjax predict: error")]
    assert ours == ["hwrjax predict: error: cannot write its output: No space left on device; free some space "
                    "there (or send the output elsewhere) and rerun"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


def test_evaluate_of_a_read_only_workdir_writes_beside_output(tmp_path, trained_workdir):
    workdir = trained_workdir  # a copy of the session's trained run (tests/conftest.py)
    if os.geteuid() == 0:  # root writes through permissions: make a read-only mount of a copy instead
        ro = tmp_path / "ro"
        if not _can_mount_tmpfs(ro, "64m"):
            pytest.skip("root needs mount to make a read-only workdir")
        shutil.copytree(workdir, ro / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        workdir = str(ro / "run")
    else:
        for root, dirs, files in os.walk(workdir):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), 0o555)
        os.chmod(workdir, 0o555)
    try:
        out = tmp_path / "out" / "report.json"
        result = subprocess.run([sys.executable, "-m", "hwrjax.cli", "evaluate", f"--workdir={workdir}",
                                 "--split=test[:100]", f"--output={out}"], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(out.read_text())["num_examples"] == 100
        assert (out.parent / "test[:100]_confusion_matrix.png").exists() or glob.glob(str(out.parent / "*.png"))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(tmp_path / "ro")], check=False)


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.append(address)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads the listening sockets from /proc/net/tcp")
def test_coordinator_listens_only_where_it_was_told(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # Process 0 of two: it starts the coordinator, then waits for process 1, which never comes.
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"),
                             f"--config={os.path.join(ROOT, 'configs/mlp.py:smoke')}", f"--workdir={tmp_path}",
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while not _listening(port):
            assert proc.poll() is None and time.time() < deadline, "the coordinator never listened"
            time.sleep(0.1)
        time.sleep(0.5)
        addresses = _listening(port)
        # 127.0.0.1 only, as IPv4 or IPv4-mapped IPv6 (not 0.0.0.0 or [::], every interface).
        assert addresses and all(a in ("0100007F", "0000000000000000FFFF00000100007F") for a in addresses), addresses
    finally:
        proc.kill()
        proc.wait(timeout=60)
