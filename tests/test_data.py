"""Tests for keras_dmr.data: the bundled digits for real, the TFDS datasets on mocked data."""

from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_dmr.data import SUPPORTED, DatasetInfo, dataset_info, load, load_digits_arrays
from keras_dmr.data.datasets import DatasetUnavailableError, augment_image

TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped")
PAD = 4


def _collect(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Concatenate all batches; also return the batch sizes."""
    xs, ys, sizes = [], [], []
    for x, y in ds.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
        sizes.append(len(y))
    return np.concatenate(xs), np.concatenate(ys), sizes


def _offset(original: np.ndarray, out: np.ndarray) -> tuple[int, int] | None:
    """(dy, dx) such that ``out`` is ``original`` zero-padded by PAD and cropped there, or None."""
    h, w = original.shape[:2]
    padded = np.pad(original, ((PAD, PAD), (PAD, PAD), (0, 0)))
    for dy in range(2 * PAD + 1):
        for dx in range(2 * PAD + 1):
            if np.array_equal(padded[dy : dy + h, dx : dx + w], out):
                return dy - PAD, dx - PAD
    return None


def _pattern(seed: int = 0) -> np.ndarray:
    """An asymmetric 32x32x3 image with no zero pixel (so padding is always visible)."""
    return np.random.default_rng(seed).integers(1, 256, size=(32, 32, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- DatasetInfo


def test_supported_names():
    assert SUPPORTED == ("digits", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped")


@pytest.mark.parametrize("name", SUPPORTED)
def test_dataset_info_is_consistent(name):
    info = dataset_info(name)
    assert isinstance(info, DatasetInfo)
    assert info.name == name
    assert info.image_shape == (32, 32, 3)
    assert info.num_classes == len(info.class_names) == len(set(info.class_names))
    assert all(isinstance(c, str) for c in info.class_names)
    assert len(info.mean) == len(info.std) == 3
    assert all(20.0 < m < 235.0 for m in info.mean), "mean must be on the 0..255 scale"
    assert all(20.0 < s < 128.0 for s in info.std), "std must be on the 0..255 scale"
    assert info.test_split == "test"
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_classes = 3  # type: ignore[misc]


def test_dataset_info_constants():
    c10, c100, svhn = (dataset_info(n) for n in TFDS_NAMES)
    np.testing.assert_allclose(c10.mean, np.array([0.4914, 0.4822, 0.4465]) * 255, atol=0.05)
    np.testing.assert_allclose(c10.std, np.array([0.2470, 0.2435, 0.2616]) * 255, atol=0.05)
    np.testing.assert_allclose(c100.mean, np.array([0.5071, 0.4865, 0.4409]) * 255, atol=0.05)
    np.testing.assert_allclose(c100.std, np.array([0.2673, 0.2564, 0.2762]) * 255, atol=0.05)
    np.testing.assert_allclose(svhn.mean, np.array([0.4377, 0.4438, 0.4728]) * 255, atol=0.05)
    np.testing.assert_allclose(svhn.std, np.array([0.1980, 0.2010, 0.1970]) * 255, atol=0.05)
    assert (c10.num_classes, c100.num_classes, svhn.num_classes) == (10, 100, 10)
    assert c10.class_names[0] == "airplane" and c10.class_names[-1] == "truck"
    assert c100.class_names[0] == "apple" and c100.class_names[-1] == "worm"
    assert list(c100.class_names) == sorted(c100.class_names)  # official order is alphabetical
    assert svhn.class_names == tuple("0123456789")
    assert dataset_info("digits").class_names == tuple("0123456789")


def test_train_splits():
    assert dataset_info("svhn_cropped").train_split == "train+extra"
    for name in ("digits", "cifar10", "cifar100"):
        assert dataset_info(name).train_split == "train"


def test_dataset_info_needs_no_tfds():
    boom = mock.Mock(side_effect=AssertionError("dataset_info must not touch TFDS"))
    with mock.patch.object(tfds, "load", boom), mock.patch.object(tfds, "builder", boom):
        for name in SUPPORTED:
            dataset_info(name)
    boom.assert_not_called()


@pytest.mark.parametrize("name", TFDS_NAMES)
def test_dataset_info_matches_tfds_features(name):
    with tfds.testing.mock_data(num_examples=1):
        features = tfds.builder(name).info.features
    info = dataset_info(name)
    assert features["label"].num_classes == info.num_classes
    assert tuple(features["image"].shape) == info.image_shape


# --------------------------------------------------------------------------- digits arrays


def test_digits_arrays_shapes_and_split():
    x_train, y_train = load_digits_arrays("train")
    x_test, y_test = load_digits_arrays("test")
    assert x_train.shape == (1437, 32, 32, 3) and x_test.shape == (360, 32, 32, 3)
    assert x_train.dtype == np.uint8 and x_test.dtype == np.uint8
    assert y_train.dtype == np.int32 and y_test.dtype == np.int32
    assert y_train.shape == (1437,) and y_test.shape == (360,)
    assert dataset_info("digits").train_examples == 1437
    for x in (x_train, x_test):
        assert x.min() == 0 and x.max() == 255
        # gray replicated into RGB
        assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])
    for y in (y_train, y_test):
        assert set(np.unique(y)) == set(range(10))  # every class in both splits
    # stratified: each class is split 80/20 to within one image
    total = np.bincount(y_train, minlength=10) + np.bincount(y_test, minlength=10)
    assert total.sum() == 1797
    assert np.all(np.abs(np.bincount(y_test, minlength=10) - 0.2 * total) <= 1)


def test_digits_arrays_match_reference_conversion():
    """Images equal sklearn digits x 255/16, bilinearly resized by TF, for the documented split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    idx_train, idx_test = train_test_split(
        np.arange(len(bunch.target)), test_size=0.2, stratify=bunch.target, random_state=0
    )
    for split, idx in (("train", idx_train), ("test", idx_test)):
        x, y = load_digits_arrays(split)
        np.testing.assert_array_equal(y, bunch.target[idx])
        ref = tf.image.resize(bunch.images[idx, :, :, None] * (255 / 16), (32, 32)).numpy()
        ref = np.clip(np.rint(ref), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(x[..., :1], ref)


def test_digits_arrays_are_deterministic_copies():
    x1, y1 = load_digits_arrays("train")
    x1[:] = 0
    y1[:] = -1
    x2, y2 = load_digits_arrays("train")
    assert x2.max() == 255 and y2.min() == 0  # the mutation did not leak into the cache
    x3, y3 = load_digits_arrays("train")
    np.testing.assert_array_equal(x2, x3)
    np.testing.assert_array_equal(y2, y3)


def test_digits_mean_std_come_from_the_train_split():
    x, _ = load_digits_arrays("train")
    info = dataset_info("digits")
    np.testing.assert_allclose(info.mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(info.std, x.std(axis=(0, 1, 2)), rtol=1e-12)
    assert len(set(info.mean)) == 1 and len(set(info.std)) == 1  # gray image: equal channels


# --------------------------------------------------------------------------- load("digits")


@pytest.mark.parametrize(("split", "n"), [("train", 1437), ("test", 360)])
def test_load_digits_shapes(split, n):
    x, y, sizes = _collect(load("digits", split, batch_size=100))
    assert x.shape == (n, 32, 32, 3) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int32
    assert y.min() == 0 and y.max() == 9
    assert sizes == [100] * (n // 100) + [n % 100]
    _, _, sizes = _collect(load("digits", split, batch_size=100, drop_remainder=True))
    assert sizes == [100] * (n // 100)


def test_load_digits_element_spec():
    spec = load("digits", batch_size=8, drop_remainder=True).element_spec
    assert spec[0].shape.as_list() == [8, 32, 32, 3] and spec[0].dtype == tf.float32
    assert spec[1].shape.as_list() == [8] and spec[1].dtype == tf.int32


def test_load_digits_normalized_train_statistics():
    """Without augmentation the train split is standardised: |mean| < 1e-3, |std - 1| < 1e-3."""
    x, _, _ = _collect(load("digits", "train", batch_size=512, augment=False))
    mean = x.astype(np.float64).mean(axis=(0, 1, 2))
    std = x.astype(np.float64).std(axis=(0, 1, 2))
    np.testing.assert_allclose(mean, 0.0, atol=1e-3)
    np.testing.assert_allclose(std, 1.0, atol=1e-3)


def test_load_digits_raw_pixels_and_test_defaults():
    """Test split defaults: no shuffle, no augmentation; normalize=False gives the raw pixels."""
    x, y, _ = _collect(load("digits", "test", batch_size=64, normalize=False))
    x_ref, y_ref = load_digits_arrays("test")
    assert x.min() == 0.0 and x.max() == 255.0
    np.testing.assert_array_equal(x, x_ref.astype(np.float32))
    np.testing.assert_array_equal(y, y_ref)
    xn, _, _ = _collect(load("digits", "test", batch_size=64))
    info = dataset_info("digits")
    np.testing.assert_allclose(xn, (x - np.float32(info.mean)) / np.float32(info.std), atol=1e-5)


def test_load_digits_train_defaults_shuffle_and_augment():
    x, y, _ = _collect(load("digits", "train", batch_size=256, normalize=False))
    x_ref, y_ref = load_digits_arrays("train")
    assert not np.array_equal(y, y_ref), "train split should be shuffled by default"
    np.testing.assert_array_equal(np.bincount(y), np.bincount(y_ref))
    # same images in a new order, but augmented (translated): most differ from every original
    xa, _, _ = _collect(load("digits", "train", batch_size=256, normalize=False, shuffle=False))
    assert np.mean(np.any(xa != x_ref.astype(np.float32), axis=(1, 2, 3))) > 0.5


def test_load_digits_augmentation_is_translation_without_flip():
    x_ref, y_ref = load_digits_arrays("train")
    x, y, _ = _collect(
        load("digits", "train", batch_size=128, shuffle=False, normalize=False, seed=3)
    )
    np.testing.assert_array_equal(y, y_ref)
    offsets = [_offset(x_ref[i], x[i].astype(np.uint8)) for i in range(200)]
    assert None not in offsets, "every augmented digit must be a pure translation (no flip)"
    assert len(set(offsets)) > 20  # crops really vary
    assert x.shape == x_ref.shape


def test_load_is_deterministic_given_seed_and_reshuffles_each_epoch():
    def first_epoch(seed):
        return _collect(load("digits", "train", batch_size=512, seed=seed))[:2]

    xa, ya = first_epoch(7)
    xb, yb = first_epoch(7)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    xc, yc = first_epoch(8)
    assert not np.array_equal(ya, yc) and not np.array_equal(xa, xc)

    ds = load("digits", "train", batch_size=512, seed=7)
    _, y1, _ = _collect(ds)
    _, y2, _ = _collect(ds)
    np.testing.assert_array_equal(y1, ya)
    assert not np.array_equal(y1, y2), "the order must change between epochs"


# --------------------------------------------------------------------------- augment_image


def test_augment_image_without_flip_is_a_translation():
    image = _pattern(0)
    offsets = []
    for s in range(40):
        out = augment_image(tf.constant(image), tf.constant([s, 1]), flip=False).numpy()
        assert out.shape == image.shape and out.dtype == image.dtype
        off = _offset(image, out)
        assert off is not None, f"seed {s}: not a pure translation"
        offsets.append(off)
    assert len(set(offsets)) > 10  # the crop position really varies with the seed
    assert max(max(abs(dy), abs(dx)) for dy, dx in offsets) <= PAD


def test_augment_image_is_stateless():
    image = tf.constant(_pattern(1))
    a = augment_image(image, tf.constant([5, 6]), flip=True).numpy()
    b = augment_image(image, tf.constant([5, 6]), flip=True).numpy()
    np.testing.assert_array_equal(a, b)


def test_augment_image_with_flip_flips_some():
    image = _pattern(2)
    mirrored = image[:, ::-1]
    kinds = []
    for s in range(40):
        out = augment_image(tf.constant(image), tf.constant([s, 2]), flip=True).numpy()
        plain, flipped = _offset(image, out), _offset(mirrored, out)
        assert (plain is None) != (flipped is None)
        kinds.append(flipped is not None)
    assert 5 < sum(kinds) < 35


# --------------------------------------------------------------------------- TFDS (mocked)


@pytest.mark.parametrize("name", TFDS_NAMES)
@pytest.mark.parametrize("split", ["train", "test"])
def test_tfds_load_shapes(name, split):
    info = dataset_info(name)
    with tfds.testing.mock_data(num_examples=10):
        x, y, sizes = _collect(load(name, split, batch_size=4))
        _, _, sizes_drop = _collect(load(name, split, batch_size=4, drop_remainder=True))
        raw, _, _ = _collect(load(name, split, batch_size=4, normalize=False, augment=False))
    assert sizes == [4, 4, 2] and sizes_drop == [4, 4]
    assert x.shape == (10, 32, 32, 3) and x.dtype == np.float32
    assert y.shape == (10,) and y.dtype == np.int32
    assert y.min() >= 0 and y.max() < info.num_classes
    assert raw.min() >= 0.0 and raw.max() <= 255.0 and raw.max() > 200.0
    assert x.min() < -1.0 and x.max() > 1.0  # normalised, not raw, by default


@pytest.mark.parametrize("name", TFDS_NAMES)
def test_tfds_normalisation_uses_info_constants(name):
    info = dataset_info(name)
    kwargs = dict(batch_size=5, augment=False, shuffle=False)
    with tfds.testing.mock_data(num_examples=5):
        raw, y_raw, _ = _collect(load(name, "test", normalize=False, **kwargs))
        norm, y_norm, _ = _collect(load(name, "test", **kwargs))
    np.testing.assert_array_equal(y_raw, y_norm)
    expected = (raw - np.float32(info.mean)) / np.float32(info.std)
    np.testing.assert_allclose(norm, expected, atol=1e-5)


def _recording_as_dataset(calls: list):
    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        calls.append((self.name, str(split)))
        n = 6
        return tf.data.Dataset.from_tensor_slices(
            {
                "image": np.zeros((n, 32, 32, 3), np.uint8),
                "label": np.arange(n, dtype=np.int64),
                "coarse_label": np.zeros(n, np.int64),
                "id": [b"x"] * n,
            }
        )

    return as_dataset


@pytest.mark.parametrize(
    ("name", "split", "expected"),
    [
        ("svhn_cropped", "train", "train+extra"),
        ("svhn_cropped", "test", "test"),
        ("cifar10", "train", "train"),
        ("cifar100", "test", "test"),
    ],
)
def test_tfds_split_requested(name, split, expected):
    calls: list = []
    with tfds.testing.mock_data(as_dataset_fn=_recording_as_dataset(calls)):
        _, y, _ = _collect(load(name, split, batch_size=4))
    assert calls == [(name, expected)]
    assert sorted(y.tolist()) == list(range(6))


@pytest.mark.parametrize("as_path", [False, True])
def test_tfds_data_dir_is_passed_through(tmp_path, as_path):
    data_dir = tmp_path if as_path else str(tmp_path)
    with (
        tfds.testing.mock_data(num_examples=3),
        mock.patch.object(tfds, "load", wraps=tfds.load) as spy,
    ):
        _collect(load("cifar10", "test", batch_size=2, data_dir=data_dir))
    spy.assert_called_once()
    args, kwargs = spy.call_args
    assert kwargs["data_dir"] == str(tmp_path)
    assert args[0] == "cifar10" and kwargs["split"] == "test"
    assert kwargs["as_supervised"] is True


def _flip_kinds(name: str, n: int = 24) -> list[str]:
    """Classify each augmented image as a translation of the original ('plain') or the mirror."""
    common = dict(batch_size=n, shuffle=False, normalize=False, seed=0)
    with tfds.testing.mock_data(num_examples=n):
        orig, y0, _ = _collect(load(name, "train", augment=False, **common))
        aug, y1, _ = _collect(load(name, "train", augment=True, **common))
    np.testing.assert_array_equal(y0, y1)
    kinds = []
    for o, a in zip(orig.astype(np.uint8), aug.astype(np.uint8), strict=True):
        if _offset(o, a) is not None:
            kinds.append("plain")
        elif _offset(o[:, ::-1], a) is not None:
            kinds.append("mirror")
        else:
            kinds.append("neither")
    return kinds


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_augmentation_flips_some_images(name):
    kinds = _flip_kinds(name)
    assert "neither" not in kinds
    assert 0 < kinds.count("mirror") < len(kinds)


def test_svhn_augmentation_never_flips():
    kinds = _flip_kinds("svhn_cropped")
    assert kinds == ["plain"] * len(kinds)


# ------------------------------------------------------------ TFDS for real, up to the network


@pytest.fixture
def offline(monkeypatch):
    """Every host name fails to resolve (recorded), and TFDS does not retry: a download gets
    exactly as far as the network, whatever network this machine has."""
    import socket

    from tensorflow_datasets.core.download import downloader

    hosts: list[str] = []

    def no_network(host, *args, **kwargs):
        hosts.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "offline (test)")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)
    return hosts


def test_tfds_download_path_reaches_the_network(offline, tmp_path):
    # Not mocked: TFDS' own download path, which imports importlib_resources through etils (a
    # ModuleNotFoundError here means the `data` extra lacks what TFDS needs).
    with pytest.raises(OSError) as exc:  # requests' ConnectionError is an OSError
        tfds.load("cifar10", data_dir=str(tmp_path))
    assert not isinstance(exc.value, ImportError)
    assert "toronto" in " ".join(offline), offline


def test_load_offline_says_the_download_failed(offline, tmp_path):
    with pytest.raises(DatasetUnavailableError) as exc:
        load("cifar10", "test", data_dir=str(tmp_path))
    message = str(exc.value)
    assert "could not be downloaded" in message and "ConnectionError" in message
    assert str(tmp_path) in message


def test_load_missing_tfds_dependency_is_not_called_a_download_failure(tmp_path):
    missing = ModuleNotFoundError("No module named 'importlib_resources'")
    missing.name = "importlib_resources"
    with mock.patch.object(tfds, "load", side_effect=missing):
        with pytest.raises(DatasetUnavailableError) as exc:
            load("cifar100", "train", data_dir=str(tmp_path))
    message = str(exc.value)
    assert "'importlib_resources'" in message and "keras-dmr[data]" in message
    assert "download" not in message


@pytest.mark.parametrize(
    "name", [TFDS_NAMES[0], *(pytest.param(n, marks=pytest.mark.slow) for n in TFDS_NAMES[1:])]
)
def test_dmrnet_fits_one_step_on_a_mocked_tfds_pipeline(name):
    import keras

    from keras_dmr import DMRNet

    info = dataset_info(name)
    keras.utils.set_random_seed(0)
    with tfds.testing.mock_data(num_examples=8):
        ds = load(name, "train", batch_size=8)
        model = DMRNet(depth=8, input_shape=info.image_shape, classes=info.num_classes)
        history = model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert model.optimizer.iterations.numpy() == 1


# --------------------------------------------------------------------------- invalid arguments


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"name": "mnist"}, "name"),
        ({"name": "CIFAR10"}, "name"),
        ({"split": "validation"}, "split"),
        ({"split": "train+extra"}, "split"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -3}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"seed": -1}, "seed"),
        ({"seed": "0"}, "seed"),
        ({"augment": "yes"}, "augment"),
        ({"shuffle": 1}, "shuffle"),
        ({"data_dir": 123}, "data_dir"),
    ],
)
def test_load_rejects_invalid_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg} must be"):
        load(**kwargs)


def test_error_messages_list_valid_values():
    with pytest.raises(ValueError, match="name") as exc:
        dataset_info("mnist")
    for name in SUPPORTED:
        assert repr(name) in str(exc.value)
    assert "'mnist'" in str(exc.value)
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\)"):
        load("digits", "val")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\)"):
        load_digits_arrays("validation")
