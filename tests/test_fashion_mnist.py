"""Fashion-MNIST: the IDX parser on a fixture the test writes, the pipeline, clear errors for
missing and damaged files, the CLI, and the real Debian files where they are installed (skipped,
and reported as skipped, elsewhere)."""

from __future__ import annotations

import gzip
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds

from keras_dmr import cli
from keras_dmr.data import (
    DatasetUnavailableError,
    IDXError,
    dataset_info,
    load,
    load_fashion_mnist_arrays,
)
from keras_dmr.data import fashion_mnist as fm


def write_idx(path, array: np.ndarray, magic: bytes | None = None, cut: int = 0) -> None:
    array = np.asarray(array, np.uint8)
    header = magic or bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data[: len(data) - cut])


def write_fashion_mnist(path, train: int, test: int, seed: int = 0):
    """Fashion-MNIST's four IDX files under ``path``: random 28×28 images (values 1..255) and
    labels 0, 1, 2, ... (mod 10)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("test", test)):
        images_name, labels_name = fm.FILES[split]
        write_idx(path / images_name, rng.integers(1, 256, (n, 28, 28)))
        write_idx(path / labels_name, np.arange(n) % 10)
    return path


@pytest.fixture
def idx_dir(tmp_path):
    """Five training and three test images (28×28, distinct values) and their labels."""
    return write_fashion_mnist(tmp_path, train=5, test=3)


def test_parser_reads_the_fixture_and_pads_to_32x32x3(idx_dir):
    images, labels = load_fashion_mnist_arrays("train", idx_dir)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 3, 4] and labels.dtype == np.int32
    raw = fm.read_idx(idx_dir / fm.FILES["train"][0], 3)
    assert np.array_equal(images[:, 2:30, 2:30, 0], raw)  # centred, channel repeated
    assert np.array_equal(images[..., 0], images[..., 2])
    assert images[:, :2].max() == 0 and images[:, 30:].max() == 0
    test_images, _ = load_fashion_mnist_arrays("test", idx_dir)
    assert len(test_images) == 3


def test_pipeline_on_the_fixture(idx_dir):
    info = dataset_info("fashion_mnist")
    batches = list(load("fashion_mnist", "test", batch_size=2, data_dir=idx_dir))
    assert [len(y) for _, y in batches] == [2, 1]
    x = np.concatenate([b[0].numpy() for b in batches])
    raw, _ = load_fashion_mnist_arrays("test", idx_dir)
    np.testing.assert_allclose(x, (raw - np.array(info.mean)) / np.array(info.std), rtol=1e-5)
    train = list(load("fashion_mnist", "train", batch_size=8, data_dir=idx_dir, seed=1))
    assert train[0][0].shape == (5, 32, 32, 3)  # augmented (pad-4 crop, flip), same shape


def test_take_is_the_same_stored_subset_every_epoch(idx_dir):
    _, labels = load_fashion_mnist_arrays("train", idx_dir)
    ds = load("fashion_mnist", "train", batch_size=8, data_dir=idx_dir, seed=3, take=3)
    epochs = [sorted(np.concatenate([y.numpy() for _, y in ds]).tolist()) for _ in range(3)]
    assert epochs == [sorted(labels[:3].tolist())] * 3  # shuffled within, never beyond
    with pytest.raises(ValueError, match="take must be None or an integer >= 1; got 0"):
        load("fashion_mnist", "train", data_dir=idx_dir, take=0)


@pytest.mark.parametrize(
    "damage,match",
    [
        ("truncated", "header says"),
        ("magic", "wrong magic"),
        ("count", "labels for"),
        ("not_gzip", "not a readable gzip"),
    ],
)
def test_damaged_files_name_the_file(idx_dir, damage, match):
    images_name, labels_name = fm.FILES["train"]
    fm._read_split.cache_clear()
    if damage == "truncated":
        write_idx(idx_dir / images_name, np.ones((5, 28, 28)), cut=100)
        name = images_name
    elif damage == "magic":
        write_idx(idx_dir / images_name, np.ones((5, 28, 28)), magic=bytes([0, 0, 0x0D, 3]))
        name = images_name
    elif damage == "count":
        write_idx(idx_dir / labels_name, np.arange(4))
        name = labels_name
    else:
        (idx_dir / images_name).write_bytes(b"plain bytes")
        name = images_name
    with pytest.raises(IDXError, match=match) as info:
        load_fashion_mnist_arrays("train", idx_dir)
    assert name in str(info.value)


def test_missing_dataset_says_how_to_install_it(tmp_path):
    """No files and no download (TFDS fails, as it does without a network): one clear error
    with the apt line, never TFDS' traceback; the same for CIFAR."""
    failing = mock.Mock(side_effect=ConnectionError("Failed to resolve storage.googleapis.com"))
    with mock.patch.object(tfds, "load", failing):
        with pytest.raises(DatasetUnavailableError, match="apt-get install dataset-fashion-mnist"):
            load("fashion_mnist", "train", data_dir=str(tmp_path))
        with pytest.raises(DatasetUnavailableError, match=r"'cifar10'.*network access"):
            load("cifar10", "train", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist_arrays("train", tmp_path)


def test_cli_trains_on_fashion_mnist(idx_dir, tmp_path, capsys):
    out = tmp_path / "tiny.keras"
    argv = ["train", "--model", "dmrnet", "--depth", "8", "--dataset", "fashion_mnist"]
    assert cli.main([*argv, "--data-dir", str(idx_dir), "--epochs", "1", "--output", str(out)]) == 0
    assert "test accuracy: " in capsys.readouterr().out
    with mock.patch.object(tfds, "load", mock.Mock(side_effect=ConnectionError("offline"))):
        empty = tmp_path / "empty"
        empty.mkdir()
        code = cli.main([*argv, "--data-dir", str(empty), "--fresh", "--output", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("keras-dmr: error:") and "dataset-fashion-mnist" in err
    assert "Traceback" not in err


@pytest.mark.skipif(
    fm.find_files() is None,
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install it to run this)",
)
def test_the_real_files():
    images, labels = load_fashion_mnist_arrays("train")
    test_images, test_labels = load_fashion_mnist_arrays("test")
    assert images.shape == (60000, 32, 32, 3) and test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    info = dataset_info("fashion_mnist")  # the stored constants are the training split's
    assert info.train_examples == len(labels)
    pixels = images[..., 0].astype(np.float64)
    assert abs(pixels.mean() - info.mean[0]) < 0.01 and abs(pixels.std() - info.std[0]) < 0.01
    x, y = next(iter(load("fashion_mnist", "test", batch_size=256)))
    assert x.shape == (256, 32, 32, 3) and y.numpy().max() <= 9
