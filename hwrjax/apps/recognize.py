"""Read handwritten digits and numbers with a trained model (the Python API behind `hwrjax predict` and `hwrjax serve`).

    rec = Recognizer.from_workdir("runs/resnet")
    for r in rec.recognize(["2026.jpg", png_bytes, mnist_array], mode="number"):
        print(r.text, r.probabilities, r.error)

Inputs are paths, bytes, binary streams or numpy arrays. A 28x28 (or 28x28x1) array already
in MNIST's form (white ink on black, its ink box about 20 px and centred by mass, as every
MNIST digit; uint8 0..255 or float 0..1) is classified as it is; every other input, a 28x28
array of dark ink on white included, goes through `hwrjax.apps.preprocess` (`to_mnist` in
"digit" mode, `split_digits` in "number" mode), as the same pixels in a file would. All digit crops of a batch are classified
in one model call, padded to a power-of-two batch size so each size is compiled once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
import stat
import threading
import time
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from hwrjax.apps import preprocess
from hwrjax.apps.preprocess import ImageError
from hwrjax.core import losses
from hwrjax.core.errors import HwrjaxError
from hwrjax.inference import calibration, loader

__all__ = ["MODES", "IMAGE_EXTENSIONS", "PreparePool", "PreparePoolError", "Reading", "Recognizer", "find_images",
           "prepare_batch", "prepare_image"]

MODES = ("number", "digit")
# Extensions `hwrjax predict` picks up when it walks a folder (files named directly are always read).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm")
MNIST_SHAPE = (28, 28)

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO, np.ndarray]


@dataclasses.dataclass
class Reading:
    """What was read from one input image.

    `text` is the digits left to right ("" on error); `probabilities[i]` is the model's
    (calibrated) probability of `digits[i]`; `probs[i]` is the full class distribution of digit i;
    `latency_ms` is this input's preprocessing time plus the model call(s) that classified
    it; `error` is None or a one-line message saying what was wrong with the input;
    `unsure` is True when some digit's probability is below the minimum confidence asked for
    (the digits are still given, so an app can show them and ask the writer to try again).
    """

    text: str
    digits: list[int]
    probabilities: list[float]
    probs: list[list[float]]
    latency_ms: float
    error: str | None = None
    unsure: bool = False

    @property
    def probability(self) -> float | None:
        """The least confident digit's probability (None when nothing was read)."""
        return min(self.probabilities) if self.probabilities else None

    def to_dict(self) -> dict[str, Any]:
        """The reading as JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_probabilities(cls, probs: np.ndarray, latency_ms: float, min_confidence: float = 0.0) -> "Reading":
        """The reading of k digits whose class probabilities are `probs` [k, classes]; unsure when a
        digit's probability is below `min_confidence`."""
        probs = np.asarray(probs)
        digits = probs.argmax(axis=-1).tolist()
        rows = probs.tolist()  # Python floats, as float() of each value gives, in one call
        probabilities = [row[d] for row, d in zip(rows, digits)]
        return cls(text="".join(map(str, digits)), digits=digits, probabilities=probabilities,
                   probs=rows, latency_ms=round(latency_ms, 3),
                   unsure=bool(probabilities) and min(probabilities) < min_confidence)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()




class Recognizer:
    """A trained classifier plus preprocessing; `recognize` reads a batch of images.

    Thread-safe: model calls are serialized by a lock, preprocessing runs in the caller's
    thread. The model function is jit-compiled once per batch-size bucket (1, 2, 4, ...,
    `max_batch`); larger batches are classified in chunks of `max_batch`. Probabilities are
    calibrated with `temperature` (see hwrjax.inference.calibration; `from_workdir` reads the run's);
    readings below `min_confidence` are marked unsure.
    """

    def __init__(self, model: Any, variables: dict, *, max_digits: int = 12, max_batch: int = 256,
                 step: int | None = None, name: str = "", temperature: float = calibration.UNCALIBRATED,
                 min_confidence: float = 0.0, loss: str = "cross_entropy"):
        if max_batch < 1 or max_batch & (max_batch - 1):
            raise ValueError(f"max_batch must be a positive power of two, got {max_batch}")
        if not calibration.MIN_TEMPERATURE <= temperature <= calibration.MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [{calibration.MIN_TEMPERATURE}, "
                             f"{calibration.MAX_TEMPERATURE}], got {temperature}")
        self.min_confidence = check_min_confidence(min_confidence)
        variables = dict(variables)
        if not variables.get("batch_stats"):
            variables.pop("batch_stats", None)
        self.model = model
        self.variables = jax.device_put(variables)
        self.max_digits = max_digits
        self.max_batch = max_batch
        self.step = step
        self.name = name
        self._temperature = float(temperature)
        losses.probabilities(jnp.zeros((1, 1)), loss)  # an unknown loss fails here
        self.loss = loss  # config.loss.name of the training: how logits are read (hwrjax.core.losses.probabilities)
        self._lock = threading.Lock()
        self._traces = 0
        self._predict = jax.jit(self._probabilities)

    @classmethod
    def from_workdir(cls, workdir: str, checkpoint: str | int = "best", **kwargs: Any) -> "Recognizer":
        """Loads the model of a training run: the best checkpoint, "latest", or a step number; warns
        when the run has no fitted temperature for it."""
        model = loader.load_model(workdir, checkpoint)
        if "temperature" not in kwargs and model.calibration is None:
            logging.warning("%s has no fitted temperature for step %d: probabilities are uncalibrated (T=1); "
                            "fit one with `hwrjax calibrate --workdir=%s`.", workdir, model.step, workdir)
        return cls.from_loaded(model, **kwargs)

    @classmethod
    def from_loaded(cls, model: loader.LoadedModel, **kwargs: Any) -> "Recognizer":
        """A Recognizer of a model loaded from a workdir (`hwrjax.inference.loader.load_model`), with its
        stored temperature unless `temperature` is given."""
        if model.module is None:
            raise TypeError("from_loaded takes a model loaded from a workdir (hwrjax.inference.loader.load_model)")
        logging.info("Loaded %s (step %d) from %s.", model.config.model.name, model.step, model.workdir)
        kwargs.setdefault("temperature", model.temperature)
        return cls(model.module, model.variables, step=model.step, name=str(model.config.model.name),
                   loss=model.loss, **kwargs)

    # ---------------------------------------------------------------- the model call

    def _probabilities(self, variables: dict, images: jax.Array) -> jax.Array:
        self._traces += 1  # Runs only while tracing: counts compilations.
        # The temperature is fixed at construction, so it is a constant of the compiled program.
        return calibration.probabilities(self.model.apply(variables, images, train=False), self.temperature,
                                         self.loss)

    @property
    def temperature(self) -> float:
        """The temperature dividing the logits before the softmax (1: uncalibrated)."""
        return self._temperature

    @property
    def calibrated(self) -> bool:
        """True when probabilities are scaled by a temperature other than 1."""
        return self.temperature != calibration.UNCALIBRATED

    @property
    def trace_count(self) -> int:
        """How many times the model function was traced (= compiled); one per bucket used."""
        return self._traces

    def bucket(self, n: int) -> int:
        """The padded batch size used for `n` crops (at most `max_batch`; more are chunked)."""
        return min(_next_power_of_two(n), self.max_batch)

    def warmup(self, max_size: int = 16) -> None:
        """Compiles the buckets up to `max_size` so first requests are not slow."""
        size = 1
        while size <= min(max_size, self.max_batch):
            self.classify(np.zeros((size, *MNIST_SHAPE), np.float32))
            size *= 2

    def classify(self, crops: np.ndarray) -> np.ndarray:
        """Class probabilities [N, classes] of N MNIST-form crops [N, 28, 28] in [0, 1]."""
        probs, _ = self._classify_timed(crops)
        return probs

    def _classify_timed(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities, and per crop the milliseconds of the model call that classified it."""
        crops = np.asarray(crops, np.float32)
        if crops.ndim != 3 or crops.shape[1:] != MNIST_SHAPE:
            raise ValueError(f"classify takes MNIST-form crops [N, 28, 28], got shape {crops.shape}")
        n = crops.shape[0]
        out, ms = [], np.zeros(n, np.float64)
        for start in range(0, n, self.max_batch):
            chunk = crops[start:start + self.max_batch]
            size = self.bucket(len(chunk))
            batch = np.zeros((size, *MNIST_SHAPE, 1), np.float32)
            batch[:len(chunk), ..., 0] = chunk
            with self._lock:
                t0 = time.perf_counter()
                probs = np.asarray(self._predict(self.variables, batch))
                ms[start:start + len(chunk)] = (time.perf_counter() - t0) * 1e3
            out.append(probs[:len(chunk)])
        if not out:
            return np.zeros((0, 0), np.float32), ms
        return np.concatenate(out), ms

    # ---------------------------------------------------------------- inputs

    def prepare(self, image: ImageInput, mode: str = "number") -> np.ndarray:
        """MNIST-form crops [k, 28, 28] of one input (k = 1 in digit mode); raises ImageError."""
        return prepare_image(image, mode, self.max_digits)

    def read(self, image: ImageInput, mode: str = "number", min_confidence: float | None = None) -> Reading:
        """Reads one image; raises ImageError (not a Reading with `error`) when it cannot.

        `min_confidence` (default: the Recognizer's) marks the reading unsure below it.
        """
        threshold = self.min_confidence if min_confidence is None else check_min_confidence(min_confidence)
        t0 = time.perf_counter()
        probs = self.classify(self.prepare(image, mode))
        return Reading.from_probabilities(probs, (time.perf_counter() - t0) * 1e3, threshold)

    def recognize(self, images: Sequence[ImageInput] | ImageInput, mode: str = "number",
                  min_confidence: float | None = None) -> list[Reading]:
        """Reads each image of a batch; an unreadable image gets a Reading with `error` set.

        `min_confidence` (default: the Recognizer's) marks readings unsure below it.
        """
        _check_mode(mode)
        threshold = self.min_confidence if min_confidence is None else check_min_confidence(min_confidence)
        if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, np.ndarray)) or hasattr(images, "read"):
            images = [images]
        prepared = [_prepare_one(functools.partial(self.prepare, image, mode), i) for i, image in enumerate(images)]
        return self.read_prepared(prepared, threshold)

    def read_prepared(self, prepared: Sequence[Prepared], min_confidence: float | None = None) -> list[Reading]:
        """Readings of inputs already prepared (by `prepare_batch`, here or in a worker): one model call."""
        threshold = self.min_confidence if min_confidence is None else check_min_confidence(min_confidence)
        crops, counts, prep_ms, errors = [], [], [], []
        for item, error, ms in prepared:
            prep_ms.append(ms)
            errors.append(error)
            counts.append(0 if item is None else len(item))
            if item is not None:
                crops.append(item)
        if crops:
            probs, model_ms = self._classify_timed(np.concatenate(crops))
        else:
            probs, model_ms = np.zeros((0, 0), np.float32), np.zeros(0)
        readings, offset = [], 0
        for k, ms, error in zip(counts, prep_ms, errors):
            if error is not None:
                readings.append(Reading("", [], [], [], round(ms, 3), error))
                continue
            p = probs[offset:offset + k]
            model = float(sum(set(model_ms[offset:offset + k].tolist())))
            offset += k
            readings.append(Reading.from_probabilities(p, ms + model, threshold))
        return readings


# One input made ready for the model: its crops [k, 28, 28] or None, the error or None, and the milliseconds.
Prepared = tuple[Union[np.ndarray, None], Union[str, None], float]


def _prepare_one(prepare: Callable[[], np.ndarray], index: int) -> Prepared:
    """`prepare()` (the crops of input `index` of a batch), with a refusal or a bug turned into its error."""
    t0 = time.perf_counter()
    item, error = None, None
    try:
        item = prepare()
    except (ImageError, HwrjaxError) as e:
        error = str(e)
    except Exception as e:  # A bug must not sink the rest of the batch; it is logged in full.
        logging.exception("Unexpected error while reading input %d", index)
        error = f"unexpected error ({type(e).__name__}: {e}); please report it"
    return item, error, (time.perf_counter() - t0) * 1e3


def prepare_batch(images: Sequence[ImageInput], mode: str = "number", max_digits: int = 12) -> list[Prepared]:
    """(crops or None, error or None, ms) of each input, for `Recognizer.read_prepared`; needs no model, so
    worker processes run it (see `PreparePool`)."""
    _check_mode(mode)
    return [_prepare_one(functools.partial(prepare_image, image, mode, max_digits), i) for i, image in enumerate(images)]


class PreparePoolError(HwrjaxError):
    """A preprocessing worker process died (killed, out of memory, a crash in a decoder)."""


class PreparePool:
    """Prepares batches of images in worker processes while the calling process runs the model.

    `map(batches)` yields each batch's `prepare_batch` result in the order given, so readings
    come out as they would in one process. At most `2 * workers` batches are queued or being
    prepared at a time: memory stays bounded however many files there are. The workers start
    as soon as the pool is made, so their start-up overlaps the model's loading; until they are
    ready the calling process prepares batches itself. They are never forked from the calling
    process (it may run JAX's threads): where the platform has it, a fork server (a fresh
    interpreter that imports this module once, and runs no JAX) forks them, so N workers cost
    one import; elsewhere each is spawned. A worker that dies raises PreparePoolError naming
    the batch it was reading; the pool is then unusable.
    """

    def __init__(self, workers: int, mode: str = "number", max_digits: int = 12):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        _check_mode(mode)
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])  # no effect once a server runs; it then imports on demand
        else:
            context = multiprocessing.get_context("spawn")
        self.workers, self.mode, self.max_digits = workers, mode, max_digits
        self._context = context
        self._pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
        self._started: list[concurrent.futures.Future] = []
        self._lock = threading.Lock()
        self._closed = False
        # From a thread: a fork server's first child waits for the server's imports, which this process
        # should overlap (and a pool closed meanwhile must not wait for them).
        self._starter = threading.Thread(target=self._start, name="hwrjax-prepare-pool-start", daemon=True)
        self._starter.start()

    def _start(self) -> None:
        try:
            if self._context.get_start_method() == "forkserver":
                # A bare process first: it returns once the server has imported this module, and if this
                # process exits meanwhile it still starts and ends cleanly (a pool worker would not).
                probe = self._context.Process(target=os.getpid, daemon=True)
                probe.start()
                probe.join()
        except Exception:  # e.g. no fork server can start: the pool starts its processes when first used
            logging.exception("Starting the preprocessing workers ahead of use failed")
        with self._lock:
            if not self._closed:  # processes start on demand: one task each starts them all
                self._started.extend(self._pool.submit(os.getpid) for _ in range(self.workers))

    def ready(self) -> bool:
        """True once every worker has started (or the pool broke: then `map` raises)."""
        return not self._starter.is_alive() and all(f.done() for f in self._started)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Waits until `ready()` (at most `timeout` seconds); returns it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._starter.join(timeout)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        concurrent.futures.wait(self._started, timeout=left)
        return self.ready()

    def map(self, batches: Iterable[Sequence[ImageInput]]) -> Iterator[list[Prepared]]:
        """`prepare_batch(batch, mode, max_digits)` of each batch, in order; in the workers once they are ready."""
        pending: collections.deque = collections.deque()
        for batch in batches:
            batch = list(batch)
            if not pending and not self.ready():  # the workers are still starting: do not wait for them
                yield prepare_batch(batch, self.mode, self.max_digits)
                continue
            pending.append((batch, self._pool.submit(prepare_batch, batch, self.mode, self.max_digits)
                            if batch else None))
            if len(pending) >= 2 * self.workers:
                yield self._result(*pending.popleft())
        while pending:
            yield self._result(*pending.popleft())

    @staticmethod
    def _result(batch: list, future: concurrent.futures.Future | None) -> list[Prepared]:
        if future is None:
            return []
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool:
            first = batch[0] if isinstance(batch[0], (str, os.PathLike)) else "an image"
            raise PreparePoolError(
                f"a preprocessing worker process died while reading a batch of {len(batch)} starting at "
                f"{os.fspath(first)!r} (killed, out of memory, or a crash in a decoder); read in one process "
                "instead (hwrjax predict --workers=0)") from None

    def close(self) -> None:
        """Stops the workers (queued batches are dropped); does not wait for a fork server still importing."""
        with self._lock:
            self._closed = True  # the starting thread starts no worker after this
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "PreparePool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def prepare_image(image: ImageInput, mode: str = "number", max_digits: int = 12) -> np.ndarray:
    """MNIST-form crops [k, 28, 28] of one input (k = 1 in digit mode, at most `max_digits`); raises ImageError.

    Needs no model, so other processes (hwrjax serve's slow lane) can run it.
    """
    _check_mode(mode)
    if isinstance(image, np.ndarray) or (hasattr(image, "__array__") and not isinstance(image, (bytes, str))):
        array = np.asarray(image)
        grey = array
        if array.shape in (MNIST_SHAPE, (*MNIST_SHAPE, 1)):
            grey = _mnist_form(array.reshape(MNIST_SHAPE))
            if preprocess.is_mnist_form(grey):  # classified as it is, in either mode
                return grey[None]
    else:
        try:
            grey = preprocess.load_image(image)
        except (OSError, SyntaxError, EOFError) as e:  # Pillow's errors for damaged files of a known format
            name = repr(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else "image data"
            raise ImageError(f"{name} cannot be decoded ({e}); re-export it as PNG, JPEG or BMP") from None
    if mode == "digit":
        return preprocess.to_mnist(grey)[None]
    return np.stack(preprocess.split_digits(grey, max_digits=max_digits))


def check_min_confidence(value: Any) -> float:
    """`value` as a confidence threshold in [0, 1] (0: never unsure); raises ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"min_confidence must be a number in [0, 1] (0 turns it off), got {value!r}")
    return float(value)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _mnist_form(a: np.ndarray) -> np.ndarray:
    """A 28x28 MNIST-form array (uint8 0..255 or float 0..1) as float32 in [0, 1]."""
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.integer):
        return np.clip(a.astype(np.float32) / 255.0, 0.0, 1.0)
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ImageError("28x28 array contains NaN or infinite values; clean it first")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 255:
        raise ImageError(f"28x28 array values span [{lo:g}, {hi:g}]; pass MNIST form: 0..1 floats or 0..255")
    return a / 255.0 if hi > 1.0 else a


# -------------------------------------------------------------------- Finding image files


def _not_regular(path: str) -> str | None:
    """Why `path` must not be opened (a FIFO, socket or device would block or never end), or None."""
    try:
        mode = os.stat(path).st_mode  # stat never opens the file, so it cannot block
    except OSError:
        return None  # missing or unreadable: load_image says so
    if stat.S_ISREG(mode):
        return None
    kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device" \
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file"
    return f"{path!r} is a {kind}, not a regular file; skipped"


def find_images(paths: Iterable[str]) -> list[tuple[str, str | None]]:
    """Expands folders (recursively, image extensions only); returns (path, error or None) rows.

    Only regular files are ever read: a FIFO, socket or device (named, or found in a folder)
    gets an error row instead of being opened.
    """
    rows: list[tuple[str, str | None]] = []
    for path in paths:
        if not os.path.isdir(path):
            rows.append((path, _not_regular(path)))  # A named file is tried; load_image reports problems.
            continue
        found = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if found:
            rows += [(f, _not_regular(f)) for f in found]
        else:
            rows.append((path, f"folder {path!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"))
    return rows
