"""Datasets for keras_dmr: the bundled offline digits, Fashion-MNIST from its IDX files (Debian's
``dataset-fashion-mnist``), CIFAR-10/100 and SVHN via TFDS."""

from keras_dmr.data.datasets import (
    SUPPORTED,
    DatasetInfo,
    DatasetUnavailableError,
    dataset_info,
    load,
)
from keras_dmr.data.digits import load_digits_arrays
from keras_dmr.data.fashion_mnist import IDXError, load_fashion_mnist_arrays

__all__ = [
    "SUPPORTED",
    "DatasetInfo",
    "DatasetUnavailableError",
    "IDXError",
    "dataset_info",
    "load",
    "load_digits_arrays",
    "load_fashion_mnist_arrays",
]
