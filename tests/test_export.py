"""Tests for hwrjax.apps.export: each artifact, run by its own runtime, must give JAX's predictions.

The model is the session's trained BatchNorm convnet with a moving average (tests/conftest.py),
checked on MNIST test digits it reads with a clear margin (far above the tolerances): the
artifacts must hold the averaged weights and statistics and read those digits correctly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from configs import mlp as mlp_config
from conftest import make_workdir
from hwrjax.apps import export
from hwrjax.cli import export as export_cli
from hwrjax.core.errors import HwrjaxError
from hwrjax.inference import loader as loader_lib

# Top-two probability gap every test input has under the reference: 500x the loosest tolerance.
MARGIN = 0.05
NUM_IMAGES = 32


@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run


@pytest.fixture(scope="module")
def untrained_dir(tmp_path_factory):
    """An untrained small ResNet: enough for the tests of refusals, which need no dataset."""
    return make_workdir(str(tmp_path_factory.mktemp("export") / "run"))


@pytest.fixture(scope="module")
def clear_digits(trained_run, mnist_test_slice):
    """NUM_IMAGES MNIST test digits (float32 [N, 28, 28, 1] in [0, 1]) with their labels, each read
    correctly by the reference with a top-two gap of at least MARGIN."""
    images, labels = mnist_test_slice
    probs = conftest.oracle_probs(trained_run, images[:200])
    top2 = np.sort(probs, -1)[:, -2:]
    ok = np.flatnonzero((top2[:, 1] - top2[:, 0] > MARGIN) & (probs.argmax(-1) == labels[:200]))[:NUM_IMAGES]
    assert len(ok) == NUM_IMAGES and len(set(labels[ok].tolist())) == 10
    return images[ok].astype(np.float32) / 255.0, labels[ok]


@pytest.fixture(scope="module")
def images(clear_digits):
    return clear_digits[0]


def jax_probs(workdir: str, images: np.ndarray) -> np.ndarray:
    """The reference: the run's model applied in JAX to the averaged weights read straight from the
    checkpoint files (not through hwrjax's loader), softmax at the run's stored temperature."""
    return conftest.oracle_probs(workdir, np.round(images * 255.0)).astype(np.float32)


def check_same(got: np.ndarray, want: np.ndarray, atol: float) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    clear = np.diff(np.sort(want, -1)[:, -2:], axis=-1)[:, 0] > 10 * atol
    np.testing.assert_array_equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_reference_reads_the_digits_with_a_clear_margin(run_dir, clear_digits):
    images, labels = clear_digits
    probs = jax_probs(run_dir, images)
    np.testing.assert_array_equal(probs.argmax(-1), labels)
    top2 = np.sort(probs, -1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > MARGIN)


def test_stablehlo_cli_runs_without_hwrjax(run_dir, images, tmp_path, capsys):
    path = str(tmp_path / "model.stablehlo")
    assert export_cli.export_main([f"--workdir={run_dir}", "--format=stablehlo", f"--output={path}"]) == 0
    assert "stablehlo" in capsys.readouterr().out
    want = jax_probs(run_dir, images)
    np.save(tmp_path / "images.npy", images)
    # A fresh interpreter with only jax and numpy: deserialize and call, any batch size.
    script = textwrap.dedent(f"""
        import sys, jax, numpy as np
        exp = jax.export.deserialize(bytearray(open({path!r}, "rb").read()))
        x = np.load({str(tmp_path / "images.npy")!r})
        np.save({str(tmp_path / "out32.npy")!r}, np.asarray(exp.call(x)))
        np.save({str(tmp_path / "out3.npy")!r}, np.asarray(exp.call(x[:3])))
        assert not any(m.startswith("hwrjax") for m in sys.modules), "hwrjax was imported"
        print(exp.platforms, exp.in_avals)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'cpu', 'cuda', 'tpu'" in proc.stdout
    check_same(np.load(tmp_path / "out32.npy"), want, 1e-4)
    check_same(np.load(tmp_path / "out3.npy"), want[:3], 1e-4)
    # The helper gives the same, and accepts [B, 28, 28] too.
    check_same(export.load_stablehlo(path)(images[..., 0]), want, 1e-4)


def test_stablehlo_fixed_batch_and_model_without_batchnorm(images, tmp_path):
    c = mlp_config.get_config("smoke")
    run = make_workdir(str(tmp_path / "mlp"), config=c, seed=3)
    path = str(tmp_path / "mlp8.stablehlo")
    export.export_stablehlo(run, path, batch_size=8, platforms=("cpu",))
    fn = export.load_stablehlo(path)
    m = loader_lib.load_model(run)
    want = np.asarray(jax.nn.softmax(m.apply_fn(m.variables, jnp.asarray(images[:8]), train=False), -1))
    check_same(fn(images[:8]), want, 1e-5)
    with pytest.raises(ValueError, match="exactly 8"):
        fn(images[:4])


def test_savedmodel(run_dir, images, tmp_path):
    import tensorflow as tf

    path = str(tmp_path / "saved")
    out_path, diff = export.export_model(run_dir, "savedmodel", path)
    assert out_path == path and diff <= 1e-5
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    serve = tf.saved_model.load(path).signatures["serving_default"]
    assert list(serve.structured_input_signature[1]) == ["images"]
    assert list(serve.structured_outputs) == ["probabilities"]
    want = jax_probs(run_dir, images)
    check_same(serve(images=tf.constant(images))["probabilities"].numpy(), want, 1e-4)
    check_same(serve(images=tf.constant(images[:5]))["probabilities"].numpy(), want[:5], 1e-4)


def test_tflite_dynamic_batch_builtin_ops(run_dir, images, tmp_path, capsys):
    path = str(tmp_path / "model.tflite")
    assert export_cli.export_main([f"--workdir={run_dir}", "--format=tflite", f"--output={path}"]) == 0
    interpreter = export.tflite_interpreter(model_path=path)
    want = jax_probs(run_dir, images)
    check_same(export.run_tflite(interpreter, images), want, 1e-4)
    check_same(export.run_tflite(interpreter, images[:7]), want[:7], 1e-4)
    import tensorflow as tf
    import contextlib
    import io

    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        tf.lite.experimental.Analyzer.analyze(model_path=path)
    # Only TFLite builtin ops: no Flex (SELECT_TF_OPS) delegate needed on a phone.
    assert "CONV_2D" in listing.getvalue() and "Flex" not in listing.getvalue()


def test_existing_output_is_never_overwritten(untrained_dir, tmp_path, capsys):
    existing = tmp_path / "taken.tflite"
    existing.write_bytes(b"precious")
    folder = tmp_path / "taken_dir"
    folder.mkdir()
    for fmt, out in (("tflite", existing), ("stablehlo", existing), ("savedmodel", folder)):
        capsys.readouterr()
        code = export_cli.export_main([f"--workdir={untrained_dir}", f"--format={fmt}", f"--output={out}"])
        err = capsys.readouterr().err
        assert code == 2
        assert err.startswith("hwrjax: error:") and "already exists" in err and err.count("\n") == 1
    assert existing.read_bytes() == b"precious" and not any(folder.iterdir())
    assert sorted(os.listdir(tmp_path)) == ["taken.tflite", "taken_dir"]


def test_failed_export_leaves_nothing(untrained_dir, tmp_path, monkeypatch):
    def broken(fn, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_stablehlo", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_model(untrained_dir, "stablehlo", str(tmp_path / "m.stablehlo"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (["--format=onnx"], "invalid choice: 'onnx'"),
    (["--format=tflite", "--batch-size=0"], "positive integer or 'polymorphic'"),
    (["--format=stablehlo", "--platforms=cpu,gpu"], "unknown platform"),
    (["--format=stablehlo", "--checkpoint=99"], "no checkpoint at step 99"),
])
def test_bad_arguments_are_one_line_errors(untrained_dir, tmp_path, capsys, args, message):
    code = export_cli.export_main([f"--workdir={untrained_dir}", f"--output={tmp_path / 'out'}"] + args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "out")


def test_missing_workdir_and_unknown_format_in_python(tmp_path, capsys):
    assert export_cli.export_main([f"--workdir={tmp_path / 'nope'}", "--format=tflite",
                                   f"--output={tmp_path / 'o'}"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(HwrjaxError, match="unknown export format"):
        export.export_model(str(tmp_path), "onnx", str(tmp_path / "o"))


def test_load_stablehlo_rejects_other_files(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00not an export")
    with pytest.raises(HwrjaxError, match="not a serialized jax.export"):
        export.load_stablehlo(str(junk))
    with pytest.raises(HwrjaxError, match="cannot read"):
        export.load_stablehlo(str(tmp_path / "missing"))
