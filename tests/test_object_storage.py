"""A workdir in object storage (gs://) end to end: train, preempt, resume and evaluate with every file of
the run in a local Google Cloud Storage emulator (in memory), and nothing written to the local disk
under a folder named after the scheme.

The emulator (gcp-storage-emulator) runs in its own process. hwrjax reaches it the way it would reach
GCS: Orbax's arrays through TensorStore's gcs driver ($TENSORSTORE_GCS_HTTP_URL), everything else
through etils.epath over fsspec's gcsfs ($STORAGE_EMULATOR_HOST; EPATH_USE_TF=false because
TensorFlow's own GCS client knows no emulator).
"""

import json
import os
import subprocess
import sys

import pytest

from hwrjax.training import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "hwrjax-test"
# A smoke MLP: 2 epochs x 32 steps, logged every 8, checkpointed at each epoch end (and at the
# preemption). Every save to the emulator costs seconds, so none on a step count: a save is a save
# whichever step asks for it, and the preempted one at step 20 is off the epoch ends.
TOTAL_STEPS = 64
OVERRIDES = ["--config.checkpoint.every_steps=0"]
# The emulator, with the one header of GCS that TensorStore needs and it leaves out: a download's
# x-goog-generation (TensorStore's gcs driver refuses a read without it: "Malformed StorageGeneration").
SERVER = f"""
import time
from gcp_storage_emulator.handlers import objects

emulator_download = objects.download

def download(request, response, storage, *args, **kwargs):
    emulator_download(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])

objects.download = download  # before the server's routes are built
from gcp_storage_emulator.server import create_server
server = create_server("127.0.0.1", 0, in_memory=True, default_bucket={BUCKET!r})
server.start()
print(server._api._httpd.server_address[1], flush=True)
while True:
    time.sleep(60)
"""


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """(environment for hwrjax processes, a gcsfs filesystem on the emulator, the local folder they run in)."""
    import gcp_storage_emulator  # noqa: F401  # test dependencies (pyproject's test extra)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read when gcsfs is imported (see below)
    import gcsfs

    log = open(tmp_path / "emulator.log", "w")
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        port = int(server.stdout.readline())
        url = f"http://127.0.0.1:{port}"
        # GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs would first ask GCS's control API (gRPC, which
        # the emulator lacks) for the bucket's type, a minute's timeout per process.
        env = dict(os.environ, EPATH_USE_TF="false", STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                   GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", JAX_PLATFORMS="cpu")
        env.pop(preemption.SIGNAL_AT_STEP_ENV, None)
        env.pop("XLA_FLAGS", None)
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        yield env, gcsfs.GCSFileSystem(endpoint_url=url, token="anon"), cwd
    finally:
        server.kill()
        server.wait()
        log.close()


def _run(cmd: list[str], env: dict, cwd, signal_at: str = "") -> subprocess.CompletedProcess:
    if signal_at:
        env = dict(env, **{preemption.SIGNAL_AT_STEP_ENV: signal_at})
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def _train_command(workdir: str, *extra: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "launch.py"), "--config=" + os.path.join(ROOT, "configs/mlp.py:smoke"),
            f"--workdir={workdir}", *OVERRIDES, *extra]


def _train(workdir: str, env: dict, cwd, signal_at: str = "") -> subprocess.CompletedProcess:
    return _run(_train_command(workdir), env, cwd, signal_at)


def test_gs_workdir_trains_resumes_and_evaluates_with_nothing_on_local_disk(gcs, tmp_path, require_mnist, request):
    env, fs, cwd = gcs
    workdir = f"gs://{BUCKET}/runs/mlp"
    # The same run on a local disk, never interrupted, to compare with at the end: started now, as it
    # runs while the bucket's runs wait on the emulator (its plots are not compared: none drawn).
    local_log = open(tmp_path / "local.log", "w+")  # a file, not a pipe: a full pipe would stall the run
    local = subprocess.Popen(_train_command(str(tmp_path / "local"), "--config.report_plots=False"), env=env,
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=local_log)
    request.addfinalizer(lambda: (local.kill(), local.wait(), local_log.close()))

    # Preempted (SIGTERM after step 20): a checkpoint of step 20 and the log up to it, in the bucket.
    first = _train(workdir, env, cwd, signal_at="20:SIGTERM")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "at step 20; checkpoint saved in gs://" in first.stderr
    # The run lock cannot be had in object storage: said in one line, not a crash.
    assert "is in object storage, which has no file locks" in first.stderr
    assert fs.exists(f"{BUCKET}/runs/mlp/checkpoints/20")
    first_rows = [json.loads(line) for line in fs.cat(f"{BUCKET}/runs/mlp/metrics.jsonl").decode().splitlines()]
    assert max(r["step"] for r in first_rows) == 16  # logged every 8 steps

    # Resumed to the end: config.json read back (no config change reported), the log rewritten whole.
    second = _train(workdir, env, cwd)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Resuming from step 20 of {TOTAL_STEPS}" in second.stderr
    assert "test accuracy" in second.stdout
    rows = [json.loads(line) for line in fs.cat(f"{BUCKET}/runs/mlp/metrics.jsonl").decode().splitlines()]
    train_steps = [r["step"] for r in rows if "train_loss" in r]
    assert train_steps == list(range(8, TOTAL_STEPS + 1, 8))  # each logged step once, across the resume
    assert [r["step"] for r in rows if "val_accuracy" in r] == [32, 64]
    config = json.loads(fs.cat(f"{BUCKET}/runs/mlp/config.json"))
    assert config["model"]["name"] == "mlp"
    test = json.loads(fs.cat(f"{BUCKET}/runs/mlp/report/test_metrics.json"))
    assert test["step"] == TOTAL_STEPS and "temperature" in test
    calibration = json.loads(fs.cat(f"{BUCKET}/runs/mlp/calibration.json"))
    assert str(test["checkpoint_step"]) in calibration["checkpoints"]
    for picture in ("training_curves", "test_confusion_matrix", "test_mistakes"):
        assert fs.cat(f"{BUCKET}/runs/mlp/report/{picture}.png")[:8] == b"\x89PNG\r\n\x1a\n"
    events = fs.ls(f"{BUCKET}/runs/mlp/tensorboard")
    assert events and all("events.out.tfevents" in e for e in events)
    assert max(fs.size(e) for e in events) > 1000  # scalars of every logged row, then the report's images
    assert fs.exists(f"{BUCKET}/runs/mlp/best/{test['checkpoint_step']}")

    # The same run on a local disk, never interrupted, reports the same test metrics bit for bit.
    local.wait(timeout=600)
    local_log.seek(0)
    assert local.returncode == 0, local_log.read()[-3000:]
    local_test = json.loads((tmp_path / "local" / "report" / "test_metrics.json").read_text())
    assert (test["loss"], test["accuracy"], test["temperature"]) == \
        (local_test["loss"], local_test["accuracy"], local_test["temperature"])

    # hwrjax evaluate reads the run back from the bucket and adds its report there.
    evaluated = _run([sys.executable, "-m", "hwrjax.cli", "evaluate", f"--workdir={workdir}",
                      "--split=test[:300]"], env, cwd)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"report: {workdir}/report/test_0-300_metrics.json" in evaluated.stdout
    report = json.loads(fs.cat(f"{BUCKET}/runs/mlp/report/test_0-300_metrics.json"))
    assert report["num_examples"] == 300 and report["checkpoint_steps"] == [test["checkpoint_step"]]

    # Nothing of the run reached the local disk: no folder named after the scheme ("gs:"), anywhere.
    local_names = [p.name for p in tmp_path.rglob("*")]
    assert not [n for n in local_names if n.startswith("gs:")], local_names
    assert sorted(os.listdir(cwd)) == []
