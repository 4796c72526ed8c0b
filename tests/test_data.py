"""Dataset loading by name, the validation carve-out, missing-data errors and the disk cache."""

import os

import numpy as np
import pytest

from configs import default
from hwrjax.core.errors import ConfigError, DataError
from hwrjax.training import data


def _config(**dataset):
    c = default.get_config()
    for k, v in dataset.items():
        c.dataset[k] = v
    return c


def test_real_mnist_splits(require_mnist):
    s = data.load_splits(_config(validation_size=5000))
    assert (len(s.train), len(s.validation), len(s.test)) == (55_000, 5_000, 10_000)
    assert s.train.images.shape[1:] == (28, 28, 1) and s.train.images.dtype == np.uint8
    assert s.num_classes == 10 and set(np.unique(s.test.labels)) == set(range(10))
    # The carve-out is the tail of the official train split, disjoint from the rest.
    whole = data.load_splits(_config(validation_size=0))
    np.testing.assert_array_equal(whole.train.images[-5000:], s.validation.images)
    assert whole.validation is None


def test_fashion_mnist_by_name(require_mnist):
    s = data.load_splits(_config(name="fashion_mnist", validation_size=1000, test_split="test[:100]"))
    assert len(s.validation) == 1000 and len(s.test) == 100 and s.class_names[0] == "T-shirt/top"


def test_kmnist_and_emnist_digits_are_accepted_names():
    for name in ("kmnist", "emnist/digits"):
        builder = data.get_builder(_config(name=name))
        assert tuple(builder.info.features["image"].shape) == (28, 28, 1)


def test_unknown_dataset_name():
    with pytest.raises(ConfigError, match="unknown dataset 'mnistt'"):
        data.load_splits(_config(name="mnistt"))


def test_wrong_image_shape_is_refused():
    with pytest.raises(ConfigError, match=r"shape \(32, 32, 3\)"):
        data.get_builder(_config(name="cifar10"))


def test_missing_dataset_names_tfds_data_dir(tmp_path):
    with pytest.raises(DataError, match="not prepared in .*TFDS_DATA_DIR"):
        data.load_splits(_config(data_dir=str(tmp_path), download=False))


def test_bad_validation_size(require_mnist):
    with pytest.raises(ConfigError, match="validation_size"):
        data.load_splits(_config(validation_size=60_000))


@pytest.fixture
def disk_cache(tmp_path, monkeypatch):
    """A fresh disk cache folder and an empty in-process cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(data.DATA_CACHE_ENV, str(folder))
    monkeypatch.setattr(data, "_CACHE", {})
    return folder


def _cache_files(folder):
    return sorted(folder.rglob("*.npz"))


def test_disk_cache_returns_the_decoded_split_without_decoding(require_mnist, disk_cache, monkeypatch):
    builder = data.ensure_prepared(_config())
    first = data.load_split(builder, "test[:300]")
    (entry,) = _cache_files(disk_cache)
    monkeypatch.setattr(data, "_CACHE", {})

    def no_decode(*args):
        raise AssertionError("decoded although the disk cache holds the split")

    monkeypatch.setattr(data, "_decode", no_decode)
    again = data.load_split(builder, "test[:300]")
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert again.images.dtype == np.uint8 and again.labels.dtype == np.int32 and not again.images.flags.writeable


def test_damaged_disk_cache_entry_is_decoded_again_and_replaced(require_mnist, disk_cache, monkeypatch, caplog):
    builder = data.ensure_prepared(_config())
    first = data.load_split(builder, "test[:200]")
    (entry,) = _cache_files(disk_cache)
    entry.write_bytes(entry.read_bytes()[:1000])  # a run killed mid-write by something other than us
    monkeypatch.setattr(data, "_CACHE", {})
    again = data.load_split(builder, "test[:200]")
    np.testing.assert_array_equal(again.images, first.images)
    assert "unreadable" in caplog.text
    with np.load(entry) as f:  # rewritten whole
        np.testing.assert_array_equal(f["labels"], first.labels)


def test_disk_cache_key_follows_dataset_files_and_split(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_CACHE_ENV, str(tmp_path / "cache"))
    prepared = tmp_path / "mnist" / "3.0.1"
    prepared.mkdir(parents=True)
    (prepared / "mnist-train.tfrecord-00000-of-00001").write_bytes(b"x" * 10)

    class Builder:
        data_dir = str(prepared)

        class info:
            full_name = "mnist/3.0.1"

    base = data._disk_cache_path(Builder, "train[:100]")
    assert base.startswith(str(tmp_path / "cache")) and base != data._disk_cache_path(Builder, "train[:101]")
    # A re-prepared dataset (new file contents) must not be served the old arrays.
    (prepared / "mnist-train.tfrecord-00000-of-00001").write_bytes(b"y" * 11)
    assert data._disk_cache_path(Builder, "train[:100]") != base
    monkeypatch.setenv(data.DATA_CACHE_ENV, "")  # set but empty: no disk cache
    assert data._disk_cache_path(Builder, "train[:100]") is None


def test_unwritable_disk_cache_is_skipped(require_mnist, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(data.DATA_CACHE_ENV, str(blocker / "cache"))
    monkeypatch.setattr(data, "_CACHE", {})
    split = data.load_split(data.ensure_prepared(_config()), "test[:50]")
    assert len(split) == 50 and "Dataset cache not written" in caplog.text


def test_cached_launch_does_not_import_tensorflow(require_mnist, disk_cache):
    import subprocess
    import sys

    code = ("import sys; from configs import default; from hwrjax.training import data; c = default.get_config(); "
            "c.dataset.test_split = 'test[:100]'; s = data.load_splits(c); "
            "print(len(s.train), len(s.test), 'tensorflow' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=root).stdout.split()
            for _ in range(2)]
    assert runs[0] == ["55000", "100", "True"]  # decoded through tfds
    assert runs[1] == ["55000", "100", "False"]  # read back from the disk cache


def test_tensorflow_sees_no_accelerator_before_it_decodes(require_mnist):
    # In a fresh process: every accelerator kind is hidden from TensorFlow before tfds decodes the
    # first split, i.e. before TensorFlow's runtime starts and takes device memory.
    import subprocess
    import sys

    code = """if True:
        import json
        import tensorflow as tf
        import tensorflow_datasets as tfds
        from configs import default
        from hwrjax.training import data
        events = []
        real_hide, real_as_dataset = tf.config.set_visible_devices, tfds.core.DatasetBuilder.as_dataset
        def hide(devices, device_type=None):
            events.append(["hide", device_type, list(devices)])
            real_hide(devices, device_type)
        def as_dataset(self, *a, **k):
            events.append(["decode"])
            return real_as_dataset(self, *a, **k)
        tf.config.set_visible_devices = hide
        tfds.core.DatasetBuilder.as_dataset = as_dataset
        c = default.get_config()
        c.dataset.test_split = "test[:10]"
        data.load_splits(c)
        print(json.dumps({"events": events, "visible": [d.device_type for d in tf.config.get_visible_devices()]}))
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HWRJAX_DATA_CACHE_DIR="")  # no disk cache: every split is decoded
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    events = result["events"]
    first_decode = events.index(["decode"])
    hidden = {e[1] for e in events[:first_decode] if e[0] == "hide" and e[2] == []}
    assert hidden == set(data.TF_ACCELERATORS) == {"GPU", "TPU"}
    assert set(result["visible"]) == {"CPU"}
