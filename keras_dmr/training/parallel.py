"""Training on several devices, by name and by backend: ``tf.distribute`` strategies under
TensorFlow (:mod:`keras_dmr.training.distribute`), and data parallelism through
``keras.distribution`` under JAX (every local device holds the whole model and a slice of each
batch; gradients and BN statistics are those of the whole batch, as on one device).

This module imports no TensorFlow, so that ``keras-dmr train`` runs where it is absent.

Cannot: data parallelism under TensorFlow or PyTorch (Keras' distribution API is JAX-only;
TensorFlow has ``mirrored``); a global batch that the devices cannot split evenly (refused), so
the training batches drop the last, smaller batch.
"""

from __future__ import annotations

import dataclasses

import keras

from keras_dmr.errors import UsageError

TF_STRATEGIES = ("none", "mirrored", "multiworker")  # tf.distribute, TensorFlow backend
STRATEGIES = (*TF_STRATEGIES, "data-parallel")  # keras-dmr train --strategy


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """The ``data-parallel`` strategy once set: ``keras.distribution.DataParallel`` over
    ``devices``, installed as Keras' global distribution by :func:`make_strategy`."""

    devices: tuple[str, ...]

    @property
    def num_replicas_in_sync(self) -> int:
        return len(self.devices)


def make_strategy(name: str | None, *, batch_size: int | None = None):
    """The strategy called ``name`` (one of :data:`STRATEGIES`), for this Keras backend.

    ``"data-parallel"`` (JAX) sets Keras' global distribution: models built afterwards are
    replicated on every local device and ``fit`` splits each batch between them.

    Args:
        name: a strategy name; ``None``/``"none"`` gives None.
        batch_size: the global batch, checked against the devices (``data-parallel``).

    Returns:
        A ``tf.distribute.Strategy``, a :class:`DataParallel`, or None.

    Raises:
        UsageError: the strategy does not run on this backend, or the batch does not split.
    """
    if name is None or name == "none":
        return None
    if name not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES} or None; got {name!r}")
    backend = keras.backend.backend()
    if name == "data-parallel":
        if backend != "jax":
            raise UsageError(
                f"argument --strategy: data-parallel runs on the JAX backend "
                f"(keras.distribution); this is {backend} (KERAS_BACKEND=jax, or --strategy "
                "mirrored under TensorFlow)"
            )
        devices = tuple(keras.distribution.list_devices())
        if batch_size is not None and batch_size % len(devices):
            raise UsageError(
                f"argument --batch-size: {batch_size} does not split over the {len(devices)} "
                "devices of --strategy data-parallel; pass a multiple of "
                f"{len(devices)}"
            )
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        return DataParallel(devices)
    if backend != "tensorflow":
        raise UsageError(
            f"argument --strategy: {name} is a tf.distribute strategy and needs the TensorFlow "
            f"backend; this is {backend} (--strategy data-parallel under JAX)"
        )
    from keras_dmr.training.distribute import tf_strategy

    return tf_strategy(name)


def data_parallel_devices() -> int:
    """How many devices Keras' global distribution splits each batch over (1: none)."""
    if keras.backend.backend() != "jax":
        return 1
    distribution = keras.distribution.distribution()
    if not isinstance(distribution, keras.distribution.DataParallel):
        return 1
    return int(distribution.device_mesh.devices.size)
