"""Fashion-MNIST from its original IDX files (Debian's ``dataset-fashion-mnist``), NumPy only.

The IDX format: a 4-byte magic (two zero bytes, a type code -- 0x08 for unsigned bytes -- and the
number of dimensions), each dimension as a big-endian uint32, then the data. The files are
gzipped. Images are 28×28 grayscale; :func:`load_fashion_mnist_arrays` pads them with zeros to
32×32 and repeats the channel three times, so every builder's CIFAR variant (32×32×3) applies.

Where the files are looked for: ``data_dir`` if given, else :data:`DEBIAN_DIR`. Where they are
not, :func:`keras_dmr.data.load` falls back to TensorFlow Datasets' ``fashion_mnist`` (which
downloads) and says how to install them when that fails too.
"""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; the files go "
    f"to {DEBIAN_DIR}), pass `data_dir` with the four IDX files, or run where TensorFlow "
    "Datasets can download `fashion_mnist`"
)
_PAD = 2  # 28 + 2·2 = 32


class IDXError(ValueError):
    """An IDX file that is not one: wrong magic, truncated, or inconsistent with its pair."""


def read_idx(path: str | os.PathLike, expected_ndim: int) -> np.ndarray:
    """The uint8 array in a gzipped IDX file, checked against its header."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise IDXError(f"{path}: not a readable gzip file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_ndim:
        raise IDXError(
            f"{path}: wrong magic {raw[:4].hex() or 'none'}; an IDX file of unsigned bytes "
            f"with {expected_ndim} dimensions starts with 000008{expected_ndim:02x}"
        )
    header = 4 + 4 * expected_ndim
    if len(raw) < header:
        raise IDXError(f"{path}: truncated header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_ndim))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise IDXError(
            f"{path}: the header says {shape} ({size:,} bytes of data) but the file holds "
            f"{len(raw) - header:,}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def find_files(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The directory holding all four IDX files (``data_dir``, else Debian's), or None."""
    candidates = [Path(data_dir)] if data_dir is not None else [DEBIAN_DIR]
    for directory in candidates:
        if all((directory / name).is_file() for pair in FILES.values() for name in pair):
            return directory
    return None


def to_rgb32(images: np.ndarray) -> np.ndarray:
    """28×28 grayscale uint8 images → 32×32×3 (zero padding, channel repeated)."""
    padded = np.pad(images, ((0, 0), (_PAD, _PAD), (_PAD, _PAD)))
    return np.repeat(padded[..., None], 3, axis=-1)


@functools.lru_cache(maxsize=4)
def _read_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (Path(directory) / name for name in FILES[split])
    images = read_idx(images_file, 3)
    labels = read_idx(labels_file, 1)
    if images.shape[1:] != (28, 28):
        raise IDXError(f"{images_file}: images are {images.shape[1:]}, not 28×28")
    if len(images) != len(labels):
        raise IDXError(
            f"{labels_file}: {len(labels):,} labels for {len(images):,} images in {images_file}"
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise IDXError(f"{labels_file}: label {int(labels.max())} is not one of the 10 classes")
    return to_rgb32(images), labels.astype(np.int32)


def load_fashion_mnist_arrays(
    split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 32, 32, 3], labels int32 [N])`` of one split from the IDX files;
    :class:`FileNotFoundError` (saying how to install them) when they are not there.

    Args:
        split: ``"train"`` or ``"test"``.
        data_dir: the IDX files' directory (``None``: Debian's location).

    Returns:
        ``(images, labels)``.
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {tuple(FILES)}; got {split!r}")
    directory = find_files(data_dir)
    if directory is None:
        where = f"in {data_dir}" if data_dir is not None else f"in {DEBIAN_DIR}"
        raise FileNotFoundError(f"Fashion-MNIST's IDX files are not {where}; {INSTALL_HINT}")
    return _read_split(str(directory), split)
