"""Datasets for keras_dmr: CIFAR-10/100 and SVHN via TFDS, and the bundled offline digits."""

from keras_dmr.data.datasets import SUPPORTED, DatasetInfo, dataset_info, load
from keras_dmr.data.digits import load_digits_arrays

__all__ = ["SUPPORTED", "DatasetInfo", "dataset_info", "load", "load_digits_arrays"]
