"""The bundled default dataset: scikit-learn's 8x8 handwritten digits, as 32x32 RGB.

``sklearn.datasets.load_digits`` ships inside scikit-learn (1,797 images, values 0..16), so this
dataset works offline and lets every model, test and notebook run without a download. The images
are converted to the CIFAR layout the models expect: 32x32x3 uint8 on the 0..255 scale.
"""

from __future__ import annotations

import functools

import numpy as np

DIGITS_SPLITS = ("train", "test")
_SIZE = 32
_TEST_SIZE = 0.2  # 1,437 train / 360 test
_SPLIT_SEED = 0


def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """``(dst, src)`` matrix of 1-D bilinear weights with half-pixel centres, edges clamped.

    Same sampling as ``tf.image.resize(..., method="bilinear", antialias=False)``, but in NumPy so
    the bundled data is bit-for-bit reproducible without TensorFlow.
    """
    centres = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    centres = np.clip(centres, 0.0, src - 1)
    lo = np.floor(centres).astype(np.int64)
    hi = np.minimum(lo + 1, src - 1)
    frac = centres - lo
    weights = np.zeros((dst, src), dtype=np.float64)
    rows = np.arange(dst)
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


def _to_rgb32(images: np.ndarray) -> np.ndarray:
    """``(N, 8, 8)`` values 0..16 -> ``(N, 32, 32, 3)`` uint8 on 0..255 (gray copied to RGB)."""
    m = _bilinear_matrix(images.shape[-1], _SIZE)
    scaled = images.astype(np.float64) * (255.0 / 16.0)
    up = np.einsum("ih,nhw,jw->nij", m, scaled, m)
    gray = np.clip(np.rint(up), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


@functools.cache
def _splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # Imported lazily: scikit-learn (and SciPy behind it) is only needed for this dataset.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = _to_rgb32(bunch.images)
    y = bunch.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=_TEST_SIZE, stratify=y, random_state=_SPLIT_SEED
    )
    out = {"train": (x_train, y_train), "test": (x_test, y_test)}
    for arrays in out.values():
        for a in arrays:
            a.flags.writeable = False
    return out


def load_digits_arrays(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)`` of the bundled digits: uint8 ``(N, 32, 32, 3)``, int32 ``(N,)``.

    The split is fixed (stratified 80/20, ``random_state=0``): 1,437 train and 360 test images,
    every class in both. The arrays are fresh copies; edit them freely.

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(images, labels)``.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {DIGITS_SPLITS}; got {split!r}")
    images, labels = _splits()[split]
    return images.copy(), labels.copy()


@functools.cache
def digits_mean_std() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of the digits *training* split, on the 0..255 pixel scale."""
    images = _splits()["train"][0].astype(np.float64)
    mean = images.mean(axis=(0, 1, 2))
    std = images.std(axis=(0, 1, 2))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
