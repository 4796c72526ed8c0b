"""Dataset loading through tensorflow-datasets: whole splits as numpy arrays.

MNIST-sized datasets fit on any device many times over, so each split is loaded once,
kept on device, and batches are gathered inside the jitted step by index (see
`hwrjax.core.steps`). Batch order is then a pure function of (seed, epoch) and never of how
far an iterator was advanced.

Decoding a split through tfds imports TensorFlow and parses every record (~13 s for MNIST
here); the decoded arrays are therefore kept in a disk cache ($HWRJAX_DATA_CACHE_DIR, set
but empty to turn it off; else ~/.cache/hwrjax/datasets) keyed by the dataset, its data
dir, the split and the size and modification time of the prepared files, so a changed
dataset is decoded again. A later run reads the arrays back without importing TensorFlow.
The cache only saves time: a damaged entry is decoded again and replaced, and a folder
that cannot be written is logged and skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np
from absl import logging

from hwrjax.core.errors import ConfigError, DataError
from hwrjax.training.storage import atomic_file

IMAGE_SHAPE = (28, 28, 1)


@dataclasses.dataclass(frozen=True)
class Split:
    """One split held in host memory: uint8 images [N, 28, 28, 1] and int32 labels [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(f"split has {self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class Splits:
    """The train, validation and test splits plus the number of classes."""

    train: Split
    validation: Split | None
    test: Split
    num_classes: int
    class_names: tuple[str, ...]


# Device kinds TensorFlow could take memory on; JAX owns them all.
TF_ACCELERATORS = ("GPU", "TPU")
_TF_HIDDEN = [False]


def hide_accelerators_from_tensorflow() -> None:
    """Keeps TensorFlow (tfds and export only) off every accelerator, which JAX owns.

    TensorFlow takes device memory when its runtime starts, after which devices can no longer be
    hidden: hwrjax calls this before the first thing that imports or runs TensorFlow (decoding a
    split, exporting a SavedModel or TFLite file). Reading a tfds builder's metadata does neither.
    """
    if _TF_HIDDEN[0]:
        return
    import tensorflow as tf

    for kind in TF_ACCELERATORS:
        try:
            tf.config.set_visible_devices([], kind)
        except RuntimeError:  # The runtime started first, e.g. in the caller's code.
            logging.warning("TensorFlow started before hwrjax could hide its %s devices from it; it may hold "
                            "accelerator memory JAX needs (call hwrjax.training.data.hide_accelerators_from_tensorflow() "
                            "before using TensorFlow).", kind)
    _TF_HIDDEN[0] = True


def _data_dir(config: Any) -> str | None:
    return config.dataset.data_dir or os.environ.get("TFDS_DATA_DIR") or None


def get_builder(config: Any):
    """Returns the tfds builder of `config.dataset.name`, checking name and image shape."""
    import tensorflow_datasets as tfds  # Without TensorFlow: tfds imports it when a split is decoded.

    name = config.dataset.name
    base = name.split("/")[0].split(":")[0]
    if base not in tfds.list_builders(with_community_datasets=False):
        raise ConfigError(f"unknown dataset {name!r}; set config.dataset.name to a tfds image "
                          "classification dataset such as 'mnist', 'fashion_mnist', 'kmnist' or 'emnist/digits'")
    data_dir = _data_dir(config)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for bad configs/versions.
        raise ConfigError(f"cannot build dataset {name!r}: {e}; check config.dataset.name") from e
    try:
        image = builder.info.features["image"]
    except (KeyError, TypeError):
        image = None
    if image is None or tuple(image.shape) != IMAGE_SHAPE:
        shape = None if image is None else tuple(image.shape)
        raise ConfigError(f"dataset {name!r} has images of shape {shape}, hwrjax needs {IMAGE_SHAPE}; "
                          "pick a 28x28 greyscale dataset")
    return builder


def _network_reachable(host: str = "storage.googleapis.com", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether tfds's download host answers; checked so an offline machine fails at once, not after retries."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_prepared(config: Any) -> Any:
    """Makes sure the dataset is on disk (downloading when allowed); raises DataError otherwise."""
    builder = get_builder(config)
    if builder.is_prepared():
        return builder
    where = _data_dir(config) or "~/tensorflow_datasets"
    if not config.dataset.download:
        raise DataError(f"dataset {config.dataset.name!r} is not prepared in {where}; set TFDS_DATA_DIR "
                        "(or config.dataset.data_dir) to a directory holding it, or set config.dataset.download=True")
    if not _network_reachable():
        raise DataError(f"dataset {config.dataset.name!r} is not prepared in {where} and there is no network to "
                        "download it; set TFDS_DATA_DIR (or config.dataset.data_dir) to a directory holding a "
                        "prepared copy (made by `tfds build` on a machine with network)")
    logging.info("Dataset %s not found in %s; downloading it.", config.dataset.name, where)
    try:
        builder.download_and_prepare()
    except Exception as e:
        raise DataError(f"dataset {config.dataset.name!r} is not in {where} and could not be downloaded "
                        f"({type(e).__name__}); set TFDS_DATA_DIR to a directory holding a prepared copy "
                        "(e.g. one made by `tfds build mnist` on a machine with network)") from e
    return builder


_CACHE: dict[tuple, Split] = {}
_CACHE_LIMIT = 8
DATA_CACHE_ENV = "HWRJAX_DATA_CACHE_DIR"


def default_data_cache_dir() -> str:
    """$HWRJAX_DATA_CACHE_DIR (set but empty: no disk cache), else a per-user cache folder."""
    from hwrjax.training.cache import user_cache_dir

    if DATA_CACHE_ENV in os.environ:
        return os.environ[DATA_CACHE_ENV]
    return user_cache_dir("datasets")


def _disk_cache_path(builder: Any, split: str) -> str | None:
    """The cache file of `split`, named by a hash of everything that determines its contents."""
    folder = default_data_cache_dir()
    if not folder:
        return None
    data_dir = os.path.realpath(str(builder.data_dir))
    try:
        files = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(data_dir) if e.is_file())
    except OSError:
        return None
    key = json.dumps([builder.info.full_name, data_dir, split, files])
    name = builder.info.full_name.replace("/", "_")
    return os.path.join(os.path.abspath(os.path.expanduser(folder)), name,
                        hashlib.sha256(key.encode()).hexdigest()[:24] + ".npz")


def _read_disk_cache(path: str) -> Split | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels = np.asarray(f["images"]), np.asarray(f["labels"])
    except FileNotFoundError:
        return None
    except Exception as e:  # Truncated or foreign file: decode again and replace it.
        logging.warning("Dataset cache entry %s is unreadable (%s); decoding the split again.", path, e)
        return None
    if (images.dtype != np.uint8 or labels.dtype != np.int32 or images.shape[1:] != IMAGE_SHAPE
            or images.shape[0] != labels.shape[0]):
        logging.warning("Dataset cache entry %s has unexpected contents; decoding the split again.", path)
        return None
    return Split(images=images, labels=labels)


def _write_disk_cache(path: str, split: Split) -> None:
    """Writes atomically, so readers never see half a file."""
    try:
        with atomic_file(path) as f:
            np.savez(f, images=split.images, labels=split.labels)
    except OSError as e:
        logging.warning("Dataset cache not written to %s (%s); the next run decodes the split again.", path, e)


def _decode(builder: Any, split: str) -> Split:
    """Reads a whole split through tfds (imports TensorFlow, its accelerators hidden first)."""
    hide_accelerators_from_tensorflow()
    import tensorflow_datasets as tfds
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    return Split(images=np.asarray(data["image"], np.uint8), labels=np.asarray(data["label"], np.int32))


def load_split(builder: Any, split: str) -> Split:
    """Reads a whole split: from this process's memory, else the disk cache, else tfds."""
    key = (builder.info.full_name, str(builder.data_dir), split)
    if key not in _CACHE:
        path = _disk_cache_path(builder, split)
        loaded = _read_disk_cache(path) if path else None
        if loaded is None:
            loaded = _decode(builder, split)
            if path:
                _write_disk_cache(path, loaded)
        loaded.images.setflags(write=False)
        loaded.labels.setflags(write=False)
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = loaded
    return _CACHE[key]


def load_splits(config: Any) -> Splits:
    """Loads train (minus the validation carve-out), validation and test as numpy arrays."""
    builder = ensure_prepared(config)
    splits = builder.info.splits
    test_base = config.dataset.test_split.split("[")[0]
    if "train" not in splits or test_base not in splits:
        raise ConfigError(f"dataset {config.dataset.name!r} has splits {sorted(splits)}; "
                          f"set config.dataset.test_split to one of them")
    try:  # tfds parses the split string (and its slice) without reading any record
        test_count = int(splits[config.dataset.test_split].num_examples)
    except (ValueError, KeyError, TypeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0].rstrip(".")
        raise ConfigError(f"config.dataset.test_split={config.dataset.test_split!r} is not a split of "
                          f"{config.dataset.name!r} ({reason}); use e.g. 'test' or 'test[:1000]'") from None
    if test_count <= 0:
        raise ConfigError(f"config.dataset.test_split={config.dataset.test_split!r} selects no examples; "
                          "use e.g. 'test' or 'test[:1000]'")
    num_train = splits["train"].num_examples
    val = int(config.dataset.validation_size)
    if val < 0 or val >= num_train:
        raise ConfigError(f"config.dataset.validation_size must be in [0, {num_train}), got {val}")
    # The validation examples are the last `val` of the official train split: a fixed,
    # documented carve-out that every run (and every seed) shares.
    limit = int(config.dataset.limit_train)
    train_end = min(num_train - val, limit) if limit > 0 else num_train - val
    train = load_split(builder, f"train[:{train_end}]")
    validation = load_split(builder, f"train[{num_train - val}:]") if val else None
    test = load_split(builder, config.dataset.test_split)
    label = builder.info.features["label"]
    names = tuple(label.names) if getattr(label, "names", None) else tuple(str(i) for i in range(label.num_classes))
    logging.info("Loaded %s: %d train, %d validation, %d test examples.", config.dataset.name,
                 len(train), len(validation) if validation else 0, len(test))
    return Splits(train=train, validation=validation, test=test, num_classes=int(label.num_classes),
                  class_names=names)
