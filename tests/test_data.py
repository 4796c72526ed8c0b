"""Dataset loading by name, the validation carve-out, and missing-data errors."""

import numpy as np
import pytest

from configs import default
from hwrjax import data
from hwrjax.errors import ConfigError, DataError


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
