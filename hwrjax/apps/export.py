"""Serialize a trained model's inference function: StableHLO (jax.export), TF SavedModel, TFLite.

Every artifact computes the same function: float32 images [B, 28, 28, 1] in [0, 1] (MNIST
form: white ink on black; see `hwrjax.apps.preprocess.to_mnist`) -> class probabilities
float32 [B, num_classes]. The parameters are baked in as constants, so no hwrjax code is
needed to run it:

* stablehlo: `jax.export` of the jitted function with a symbolic batch dimension,
  lowered for CPU, CUDA and TPU; run it with `load_stablehlo(path)` or
  `jax.export.deserialize(open(path, "rb").read()).call(images)`.
* savedmodel: a TF SavedModel (a directory) made with `jax2tf` (native serialization: one
  `XlaCallModule` op holding the StableHLO); signature `serving_default` takes `images`
  and returns `probabilities`.
* tflite: the CPU SavedModel converted by `tf.lite.TFLiteConverter`; only TFLite builtin
  ops (no SELECT_TF_OPS); a dynamic batch (resize the input tensor) unless a fixed
  `batch_size` is given.

Each artifact is written to a temporary path beside the output, run once and compared with
JAX, and only then moved into place: an existing output is never overwritten and a failed
export leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hwrjax.core.errors import HwrjaxError
from hwrjax.inference import loader
from hwrjax.inference import calibration as calibration_lib
from hwrjax.training.storage import check_new_output

__all__ = ["FORMATS", "PLATFORMS", "ExportError", "check_images", "check_output", "check_platforms", "export_model",
           "export_savedmodel", "export_stablehlo", "export_tflite", "inference_function", "load_stablehlo", "run_tflite",
           "tflite_interpreter"]

FORMATS = ("stablehlo", "savedmodel", "tflite")
# jax.export lowers for these by default so one artifact runs on any of them.
PLATFORMS = ("cpu", "cuda", "tpu")
IMAGE_SHAPE = (28, 28, 1)
# Largest |probability difference| between an artifact and JAX accepted by the check after export.
TOLERANCE = {"stablehlo": 1e-5, "savedmodel": 1e-5, "tflite": 1e-4}
SERVING_SIGNATURE = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
_CHECK_BATCH = 8


class ExportError(HwrjaxError):
    """A model cannot be exported as asked; the message says why and what to do."""


# --------------------------------------------------------------------------------------
# The function that is exported


def inference_function(model: Any, loss: str = "cross_entropy") -> Callable[[jnp.ndarray], jnp.ndarray]:
    """images float32 [B,28,28,1] in [0,1] -> probabilities float32 [B,C], params closed over as constants.

    `model` is a workdir (best checkpoint), a `hwrjax.inference.loader.LoadedModel` or a TrainState (trained
    with config.loss.name `loss`). The probabilities are read from the logits as the model's loss
    says (`hwrjax.core.losses.probabilities`) and calibrated with its fitted temperature (a constant of
    the artifact).
    """
    loaded = loader.as_loaded_model(model, loss)
    apply_fn, variables, temperature, loss = loaded.apply_fn, loaded.variables, loaded.temperature, loaded.loss

    def probabilities(images: jnp.ndarray) -> jnp.ndarray:
        return calibration_lib.probabilities(apply_fn(variables, images, train=False), temperature, loss)

    return probabilities


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size <= 0):
        raise ExportError(f"batch_size must be a positive integer or None (any batch), got {batch_size!r}")


def _input_spec(batch_size: int | None) -> jax.ShapeDtypeStruct:
    """The exported input: a fixed batch, or a symbolic one named b."""
    if batch_size is None:
        return jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 28, 28, 1"), jnp.float32)
    return jax.ShapeDtypeStruct((batch_size,) + IMAGE_SHAPE, jnp.float32)


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    """`platforms` as a tuple; raises ExportError for none or an unknown one."""
    platforms = tuple(platforms)
    unknown = [p for p in platforms if p not in PLATFORMS + ("rocm",)]
    if not platforms or unknown:
        raise ExportError(f"unknown platform(s) {unknown or platforms}; use some of cpu, cuda, rocm, tpu")
    return platforms


def check_images(images: Any, batch_size: int | None = None) -> np.ndarray:
    """Coerces images to float32 [B,28,28,1] (a [B,28,28] array gains the channel axis)."""
    a = np.asarray(images, np.float32)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[1:] != IMAGE_SHAPE or a.shape[0] == 0:
        raise ValueError(f"expected float32 images [B, 28, 28, 1] in [0, 1], got shape {a.shape}")
    if batch_size is not None and a.shape[0] != batch_size:
        raise ValueError(f"this artifact was exported for batches of exactly {batch_size}, got {a.shape[0]}")
    return a


def _check_inputs(batch_size: int | None) -> np.ndarray:
    """A fixed batch of digit-like and noise images used to compare an artifact with JAX."""
    n = batch_size or _CHECK_BATCH
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28]
    images = np.zeros((n, 28, 28), np.float32)
    for i in range(n):
        cy, cx, ry, rx = rng.uniform(11, 17), rng.uniform(11, 17), rng.uniform(4, 9), rng.uniform(2, 7)
        ring = np.abs(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 - 1.0) < rng.uniform(0.2, 0.5)
        images[i] = np.where(ring, 1.0, 0.0) if i % 2 == 0 else rng.uniform(0, 1, (28, 28))
    return images[..., None]


# --------------------------------------------------------------------------------------
# Writing outputs safely


def check_output(output: str) -> str:
    """Absolute output path; raises if it exists or its folder cannot be written."""
    return check_new_output(output, "--output", ExportError)


def _publish(tmp: str, path: str) -> None:
    """Moves a finished temporary file or directory to `path` unless something appeared there meanwhile."""
    if os.path.isdir(tmp):
        if os.path.lexists(path):
            raise ExportError(f"{path} appeared while exporting; it was left alone, pass a new --output")
        os.rename(tmp, path)
    else:
        try:
            os.link(tmp, path)  # Fails instead of replacing a file that appeared meanwhile.
        except FileExistsError:
            raise ExportError(f"{path} appeared while exporting; it was left alone, pass a new --output") from None
        os.unlink(tmp)


def _temporary_sibling(path: str, directory: bool) -> str:
    """A new file or directory beside `path`, with the permissions a plain open/mkdir would give."""
    parent, name = os.path.split(path)
    umask = os.umask(0)
    os.umask(umask)
    if directory:
        tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
        os.chmod(tmp, 0o777 & ~umask)
        return tmp
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _compare(name: str, got: np.ndarray, want: np.ndarray) -> float:
    diff = float(np.max(np.abs(np.asarray(got, np.float32) - want)))
    if got.shape != want.shape or not diff <= TOLERANCE[name]:
        raise ExportError(f"the exported {name} artifact disagrees with JAX (max |diff| {diff:.2e}, shapes "
                          f"{got.shape} vs {want.shape}); nothing was written, please report this")
    return diff


# --------------------------------------------------------------------------------------
# StableHLO


def _exported(fn: Callable, batch_size: int | None, platforms: Sequence[str]) -> jax.export.Exported:
    try:
        return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(_input_spec(batch_size))
    except Exception as e:  # jax raises many types for ops that cannot be lowered or made shape-polymorphic.
        what = "for any batch size; pass a fixed --batch-size" if batch_size is None else f"for {platforms}"
        raise ExportError(f"cannot export this model {what} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e


def write_stablehlo(fn: Callable, path: str, batch_size: int | None = None,
                    platforms: Sequence[str] = PLATFORMS) -> float:
    """Serializes jax.export(jit(fn)) to `path` (overwriting); returns the max |diff| of a check run."""
    exported = _exported(fn, batch_size, check_platforms(platforms))
    with open(path, "wb") as f:
        f.write(exported.serialize())
    if jax.default_backend() not in exported.platforms:
        return float("nan")  # Cannot run here; the lowering itself is the check.
    x = _check_inputs(batch_size)
    return _compare("stablehlo", np.asarray(load_stablehlo(path)(x)), np.asarray(jax.jit(fn)(x)))


def export_stablehlo(model: Any, output: str, batch_size: int | None = None,
                     platforms: Sequence[str] = PLATFORMS) -> str:
    """Writes the serialized StableHLO inference function of `model` to the new file `output`."""
    _check_batch_size(batch_size)
    return _export_to(output, False, lambda tmp: write_stablehlo(inference_function(model), tmp, batch_size,
                                                                 platforms))[0]


def load_stablehlo(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """Loads a file written by export_stablehlo: returns images [B,28,28,1] -> probabilities [B,C] (numpy).

    Needs only jax (no hwrjax model code, no checkpoint).
    """
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise ExportError(f"cannot read {path} ({e.strerror}); pass a file written by `hwrjax export "
                          "--format=stablehlo`") from e
    try:
        exported = jax.export.deserialize(bytearray(blob))
    except Exception as e:  # flatbuffer / version errors come in several types.
        raise ExportError(f"{path} is not a serialized jax.export function ({type(e).__name__}); pass a file "
                          "written by `hwrjax export --format=stablehlo`") from e
    call = jax.jit(exported.call)
    dim = exported.in_avals[0].shape[0]
    fixed = dim if isinstance(dim, int) else None

    def probabilities(images: Any) -> np.ndarray:
        return np.asarray(call(check_images(images, fixed)))

    probabilities.exported = exported
    return probabilities


# --------------------------------------------------------------------------------------
# TensorFlow: SavedModel and TFLite


def _tensorflow():
    from hwrjax.training import data as data_lib

    data_lib.hide_accelerators_from_tensorflow()
    import tensorflow as tf

    return tf


def write_savedmodel(fn: Callable, path: str, batch_size: int | None = None,
                     platforms: Sequence[str] = PLATFORMS) -> float:
    """Saves `fn` as a TF SavedModel in the existing empty directory `path`; returns a check run's max |diff|."""
    tf = _tensorflow()
    from jax.experimental import jax2tf

    platforms = check_platforms(platforms)
    _exported(fn, batch_size, platforms)  # Clear errors for what cannot be lowered, before TF tracing.
    converted = jax2tf.convert(fn, polymorphic_shapes=["(b, 28, 28, 1)" if batch_size is None else None],
                               with_gradient=False, native_serialization_platforms=platforms)
    module = tf.Module()
    module.serve = tf.function(lambda images: {OUTPUT_NAME: converted(images)}, autograph=False,
                               input_signature=[tf.TensorSpec([batch_size, *IMAGE_SHAPE], tf.float32, name=INPUT_NAME)])
    tf.saved_model.save(module, path, signatures={SERVING_SIGNATURE: module.serve.get_concrete_function()})
    if jax.default_backend() not in platforms:
        return float("nan")
    x = _check_inputs(batch_size)
    serve = tf.saved_model.load(path).signatures[SERVING_SIGNATURE]
    got = serve(**{INPUT_NAME: tf.constant(x)})[OUTPUT_NAME].numpy()
    return _compare("savedmodel", got, np.asarray(jax.jit(fn)(x)))


def export_savedmodel(model: Any, output: str, batch_size: int | None = None,
                      platforms: Sequence[str] = PLATFORMS) -> str:
    """Writes `model`'s inference function as a TF SavedModel to the new directory `output`."""
    _check_batch_size(batch_size)
    return _export_to(output, True, lambda tmp: write_savedmodel(inference_function(model), tmp, batch_size,
                                                                 platforms))[0]


def tflite_interpreter(model_path: str | None = None, model_content: bytes | None = None) -> Any:
    """A TFLite interpreter: LiteRT's (ai_edge_litert) when installed, else tf.lite's."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import warnings

        Interpreter = _tensorflow().lite.Interpreter
        with warnings.catch_warnings():  # tf.lite.Interpreter warns that LiteRT replaces it.
            warnings.simplefilter("ignore")
            return Interpreter(model_path=model_path, model_content=model_content)
    return Interpreter(model_path=model_path, model_content=model_content)


def run_tflite(interpreter: Any, images: np.ndarray) -> np.ndarray:
    """Runs a TFLite interpreter of an exported model on images [B,28,28,1], resizing a dynamic batch."""
    images = check_images(images)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    if tuple(inp["shape"]) != images.shape:
        if int(inp["shape_signature"][0]) != -1:
            raise ValueError(f"this model was exported for batches of exactly {inp['shape'][0]}, "
                             f"got {images.shape[0]}")
        interpreter.resize_tensor_input(inp["index"], list(images.shape))
        interpreter.allocate_tensors()
    elif not getattr(interpreter, "_hwrjax_allocated", False):
        interpreter.allocate_tensors()
    interpreter._hwrjax_allocated = True
    interpreter.set_tensor(inp["index"], images)
    interpreter.invoke()
    return np.array(interpreter.get_tensor(out["index"]))


def write_tflite(fn: Callable, path: str, batch_size: int | None = None) -> float:
    """Converts `fn` (through a CPU SavedModel) to a TFLite flatbuffer at `path`; returns a check's max |diff|."""
    tf = _tensorflow()
    with tempfile.TemporaryDirectory(prefix="hwrjax_tflite_") as tmp:
        saved = os.path.join(tmp, "savedmodel")
        os.mkdir(saved)
        write_savedmodel(fn, saved, batch_size, platforms=("cpu",))
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=[SERVING_SIGNATURE])
        try:
            flatbuffer = converter.convert()
        except Exception as e:  # The converter raises ConverterError and friends.
            raise ExportError(f"the TFLite converter rejected this model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    with open(path, "wb") as f:
        f.write(flatbuffer)
    x = _check_inputs(batch_size)
    return _compare("tflite", run_tflite(tflite_interpreter(model_path=path), x), np.asarray(jax.jit(fn)(x)))


def export_tflite(model: Any, output: str, batch_size: int | None = None) -> str:
    """Writes `model`'s inference function as a TFLite file to the new path `output`."""
    _check_batch_size(batch_size)
    return _export_to(output, False, lambda tmp: write_tflite(inference_function(model), tmp, batch_size))[0]


# --------------------------------------------------------------------------------------
# One entry point


def _export_to(output: str, directory: bool, write: Callable[[str], float]) -> tuple[str, float]:
    """Runs write(tmp) on a temporary sibling of `output`, then moves it into place."""
    path = check_output(output)
    tmp = _temporary_sibling(path, directory)
    try:
        diff = write(tmp)
        _publish(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path, diff


def export_model(model: Any, format: str, output: str, batch_size: int | None = None,
                 platforms: Sequence[str] = PLATFORMS, loss: str = "cross_entropy") -> tuple[str, float]:
    """Exports `model` (workdir, LoadedModel or TrainState trained with `loss`) as `format` to the new `output`.

    Returns (absolute output path, max |probability difference| from JAX on a check batch;
    NaN when the artifact cannot run on this machine's backend).
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    _check_batch_size(batch_size)
    platforms = check_platforms(platforms)
    check_output(output)
    fn = inference_function(model, loss)
    if format == "stablehlo":
        return _export_to(output, False, lambda tmp: write_stablehlo(fn, tmp, batch_size, platforms))
    if format == "savedmodel":
        return _export_to(output, True, lambda tmp: write_savedmodel(fn, tmp, batch_size, platforms))
    return _export_to(output, False, lambda tmp: write_tflite(fn, tmp, batch_size))
