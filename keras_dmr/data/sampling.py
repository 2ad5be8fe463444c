"""What an epoch of in-memory images looks like, decided in NumPy: the order, the crop and the
flip of every image (:func:`epoch_plan`), and a backend-neutral batch source that applies them
(:class:`ArrayBatches`, a ``keras.utils.PyDataset``: JAX, PyTorch and TensorFlow take it, and it
needs no TensorFlow).

The tf.data pipeline of :func:`keras_dmr.data.load` follows the same plans for the same sources
(digits, Fashion-MNIST from its files, arrays a user passes), so both paths yield the same
batches for the same seed, and a run can move between backends without changing what it sees.

Cannot: stream data larger than memory (TFDS sources stay tf.data, shuffled by TFDS).
"""

from __future__ import annotations

import dataclasses
import math
import threading

import keras
import numpy as np

PAD = 4  # pixels of zero padding per side before the random crop


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """One epoch: the images in ``order``, each cropped at ``(rows, cols)`` of its zero-padded
    copy (``(pad, pad)``: unmoved) and mirrored where ``flips`` is set."""

    order: np.ndarray  # int64 [n]
    rows: np.ndarray  # int32 [n], in [0, 2·pad]
    cols: np.ndarray  # int32 [n]
    flips: np.ndarray  # bool [n]


def epoch_plan(
    n: int,
    epoch: int,
    *,
    seed: int | None,
    shuffle: bool,
    augment: bool,
    flip: bool,
    pad: int = PAD,
) -> EpochPlan:
    """The plan of epoch ``epoch`` (0-based) over ``n`` images: a function of ``(seed, epoch)``
    alone (``seed=None``: fresh randomness), drawn in a fixed order (permutation, crop rows,
    crop columns, flips) so that each choice is the same whatever the others are.

    Args:
        n: images in the epoch.
        epoch: which epoch.
        seed: the run's seed, or None.
        shuffle: permute the images (else stored order).
        augment: random crops of the padded images (else none: every offset ``pad``).
        flip: random horizontal flips too (with ``augment`` only).
        pad: zero padding per side.

    Returns:
        The :class:`EpochPlan`.
    """
    rng = np.random.default_rng(None if seed is None else (seed, epoch))
    order = rng.permutation(n) if shuffle else np.arange(n)
    if augment:
        rows = rng.integers(0, 2 * pad + 1, size=n, dtype=np.int32)
        cols = rng.integers(0, 2 * pad + 1, size=n, dtype=np.int32)
        flips = rng.random(n) < 0.5 if flip else np.zeros(n, bool)
    else:
        rows = cols = np.full(n, pad, np.int32)
        flips = np.zeros(n, bool)
    return EpochPlan(order.astype(np.int64), rows, cols, flips)


def crop_and_flip(
    images: np.ndarray, rows: np.ndarray, cols: np.ndarray, flips: np.ndarray, pad: int = PAD
) -> np.ndarray:
    """``images`` ``[B, H, W, C]`` zero-padded by ``pad``, cropped back to ``H×W`` at each
    image's ``(rows, cols)`` and mirrored where ``flips``: a pure data movement (no arithmetic),
    so any backend that does the same gives the same values."""
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    r = rows[:, None] + np.arange(h)  # [B, H]
    c = cols[:, None] + np.arange(w)  # [B, W]
    c = np.where(flips[:, None], c[:, ::-1], c)
    return padded[np.arange(b)[:, None, None], r[:, :, None], c[:, None, :]]


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """``(x - mean) / std`` in float32, per channel (the arithmetic tf.data does)."""
    x = images.astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


class ArrayBatches(keras.utils.PyDataset):
    """``(images float32 [B, H, W, C], labels int32 [B])`` batches of in-memory images, shuffled
    and augmented by :func:`epoch_plan`: a new plan after each epoch whose every batch was
    served (``Model.fit`` calls ``on_epoch_end`` also after reading one batch to build the
    model; that does not count, as the tf.data pipeline's plan does not advance either).

    Args:
        images: uint8 (or float) ``[N, H, W, C]`` on the 0..255 scale.
        labels: ``[N]`` integer labels.
        batch_size: images per batch.
        shuffle: permute every epoch.
        augment: pad-and-crop every epoch.
        flip: random horizontal flips too.
        seed: the run's seed (None: fresh randomness).
        drop_remainder: drop the last, smaller batch.
        mean: per-channel mean to subtract (None: raw pixels as float32).
        std: per-channel standard deviation to divide by.
        workers: threads preparing batches (``keras.utils.PyDataset``'s).
        pad: zero padding per side for the crops.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        shuffle: bool,
        augment: bool,
        flip: bool,
        seed: int | None,
        drop_remainder: bool = False,
        mean=None,
        std=None,
        workers: int = 1,
        pad: int = PAD,
    ):
        super().__init__(workers=workers, use_multiprocessing=False)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise ValueError("no images")
        self.images, self.labels = images, np.asarray(labels)
        self.batch_size = batch_size
        self.shuffle, self.augment, self.flip = shuffle, augment, flip
        self.seed, self.drop_remainder = seed, drop_remainder
        self.mean, self.std, self.pad = mean, std, pad
        self.epoch = 0
        self._plan = None
        self._served: set[int] = set()
        self._lock = threading.Lock()

    @property
    def num_batches(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_remainder else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def plan(self) -> EpochPlan:
        """This epoch's :class:`EpochPlan`."""
        if self._plan is None:
            self._plan = epoch_plan(
                len(self.labels),
                self.epoch,
                seed=self.seed,
                shuffle=self.shuffle,
                augment=self.augment,
                flip=self.flip,
                pad=self.pad,
            )
        return self._plan

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        with self._lock:
            plan = self.plan()
            self._served.add(index)
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        picked = plan.order[part]
        x = self.images[picked]
        if self.augment:
            x = crop_and_flip(x, plan.rows[part], plan.cols[part], plan.flips[part], self.pad)
        x = normalize(x, self.mean, self.std) if self.mean is not None else x.astype(np.float32)
        return x, self.labels[picked].astype(np.int32)

    def on_epoch_end(self):
        with self._lock:
            if len(self._served) == len(self):
                self.epoch += 1
                self._plan = None
            self._served = set()
