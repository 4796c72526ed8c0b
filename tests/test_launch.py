"""End to end through launch.py: the files a run writes, and one-line errors for bad input."""

import glob
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(workdir, *extra, env=None, config="configs/mlp.py:smoke"):
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--config={os.path.join(ROOT, config)}",
           f"--workdir={workdir}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env or dict(os.environ))


def _error_line(proc):
    lines = [l for l in proc.stderr.splitlines() if l.startswith("hwrjax: error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_smoke_run_writes_every_promised_file(tmp_path, require_mnist):
    workdir = str(tmp_path / "run")
    cache = tmp_path / "cache"
    proc = _launch(workdir, "--config.seed=3", f"--compilation_cache_dir={cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The compiled train step and batch program were kept for the next run of this recipe.
    for program in ("jit_step_fn", "jit_batch_of"):
        assert any(name.startswith(program) for name in os.listdir(cache)), (program, os.listdir(cache))
    assert "test accuracy" in proc.stdout
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["seed"] == 3 and config["model"]["name"] == "mlp"
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert all("step" in r for r in rows)
    train_rows = [r for r in rows if "train_loss" in r]
    assert {"train_loss", "train_accuracy", "learning_rate", "steps_per_sec", "images_per_sec",
            "time_left_s"} <= set(train_rows[0])
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"]
    assert [r["epoch"] for r in rows if "val_accuracy" in r] == [1, 2]
    report = json.load(open(os.path.join(workdir, "report", "test_metrics.json")))
    assert report["num_examples"] == 1000 and 0.5 < report["accuracy"] <= 1.0 and report["loss"] > 0
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    for name in ("training_curves.png", "test_confusion_matrix.png", "test_mistakes.png"):
        with Image.open(os.path.join(workdir, "report", name)) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    assert os.listdir(os.path.join(workdir, "best")) and os.listdir(os.path.join(workdir, "checkpoints"))


# Each name and range check is unit-tested in test_train.py; these check the path to the user.
@pytest.mark.parametrize("override,message", [
    ("--config.model.name=vgg", "unknown model 'vgg'"),
    ("--config.dataset.name=not_a_dataset", "unknown dataset 'not_a_dataset'"),
    ("--config.optimizer.learning_rat=0.1", "no field 'learning_rat'"),
    ("--config.batch_size=abc", "batch_size=abc"),
])
def test_bad_config_is_one_line_before_training(tmp_path, override, message):
    workdir = str(tmp_path / "run")
    line = _error_line(_launch(workdir, override))
    assert message in line
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_batch_that_does_not_divide_over_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    line = _error_line(_launch(str(tmp_path / "run"), "--config.batch_size=100", env=env))
    assert "does not divide over 8 devices" in line


def test_workdir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = _error_line(_launch(str(blocker / "run")))
    assert "cannot be written" in line


def test_missing_dataset_names_tfds_data_dir(tmp_path):
    # Downloads turned off: the same answer with or without network.
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "empty"))
    line = _error_line(_launch(str(tmp_path / "run"), "--config.dataset.download=False", env=env))
    assert "TFDS_DATA_DIR" in line and "not prepared" in line


def test_missing_dataset_without_network_is_refused_before_a_download(tmp_path, monkeypatch):
    from configs import mlp
    from hwrjax.core.errors import DataError
    from hwrjax.training import data

    # Whatever this machine's network, the offline case is made offline here.
    monkeypatch.setattr(data, "_network_reachable", lambda *a, **k: False)
    c = mlp.get_config("smoke")
    c.dataset.data_dir = str(tmp_path / "empty")
    with pytest.raises(DataError, match="no network to download it; set TFDS_DATA_DIR"):
        data.ensure_prepared(c)
    assert not os.path.exists(tmp_path / "empty" / "mnist")


def test_compilation_cache_folder_that_cannot_be_used_does_not_stop_the_run(tmp_path, monkeypatch):
    import jax

    from hwrjax.training import cache as cache_lib

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    before = jax.config.jax_compilation_cache_dir
    try:
        assert cache_lib.enable_compilation_cache(str(blocker / "cache")) is None
        assert cache_lib.enable_compilation_cache("") is None
        assert jax.config.jax_compilation_cache_dir == before  # left untouched
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
        assert cache_lib.default_cache_dir() == ""  # set but empty: no cache
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert cache_lib.default_cache_dir() == str(tmp_path / "xdg" / "hwrjax" / "jax")
        assert cache_lib.enable_compilation_cache(None) == str(tmp_path / "xdg" / "hwrjax" / "jax")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xdg" / "hwrjax" / "jax")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_tensorboard_writer_does_not_import_torch(tmp_path):
    # A stand-in torch package on the path: importing it leaves a trace in sys.modules.
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("FAKE = True\n")
    code = ("import sys; from hwrjax.training import logs; W = logs.summary_writer_class(); "
            "imported = 'torch' in sys.modules; "
            f"w = W({str(tmp_path / 'tb')!r}); w.add_scalar('loss', 0.5, 1); w.close(); "
            "import torch; print(imported, getattr(torch, 'FAKE', False))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), ROOT]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    # Not imported by the writer, and still importable afterwards.
    assert out.stdout.split() == ["False", "True"]
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
