"""Datasets for keras_dmr: the bundled offline digits, Fashion-MNIST from its IDX files (Debian's
``dataset-fashion-mnist``), arrays a user holds, CIFAR-10/100 and SVHN via TFDS; through tf.data
or, on any backend and without TensorFlow, a ``keras.utils.PyDataset`` yielding the same
batches."""

from keras_dmr.data.datasets import (
    PIPELINES,
    SUPPORTED,
    DatasetInfo,
    DatasetUnavailableError,
    dataset_info,
    default_pipeline,
    from_arrays,
    load,
)
from keras_dmr.data.digits import load_digits_arrays
from keras_dmr.data.fashion_mnist import IDXError, load_fashion_mnist_arrays
from keras_dmr.data.sampling import ArrayBatches

__all__ = [
    "PIPELINES",
    "SUPPORTED",
    "ArrayBatches",
    "DatasetInfo",
    "DatasetUnavailableError",
    "IDXError",
    "dataset_info",
    "default_pipeline",
    "from_arrays",
    "load",
    "load_digits_arrays",
    "load_fashion_mnist_arrays",
]
