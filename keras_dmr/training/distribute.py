"""tf.distribute strategies for training and tuning (chosen by name, for every backend, in
:mod:`keras_dmr.training.parallel`).

``tf_strategy("mirrored")`` is :class:`tf.distribute.MirroredStrategy` (every local GPU, or the
CPU); ``tf_strategy("multiworker")`` is :class:`MultiWorkerStrategy`, a
``MultiWorkerMirroredStrategy`` that reads the cluster from ``TF_CONFIG``. Build AND compile the
model under ``strategy.scope()`` (the package's builders compile in their constructor); the batch
size of the dataset given to ``fit`` is the global batch, split over all replicas of all workers.

Keras 3.15 cannot ``fit`` under a plain ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585):
its trainer reduces nested per-replica values and scalar metrics along axis 0, which that
strategy rejects. :class:`MultiWorkerStrategy` reduces nests leaf by leaf and scalars across
replicas only; nothing else changes. Batch normalization statistics are per worker (each sees its
own shard); :class:`AverageBatchNormStatistics` averages them across workers so that every
worker validates and saves the same model.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_dmr.utils import keras_internals


class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """``MultiWorkerMirroredStrategy`` whose ``reduce`` accepts what Keras 3's ``fit`` passes.

    ``reduce`` maps over nested structures (Keras reduces a whole ``(x, y)`` batch to build the
    model) and reduces rank-0 values across replicas when given ``axis=0`` (Keras reduces every
    logged metric that way). Cannot: fix anything else of Keras 3 under multi-worker training;
    the loopback tests cover ``fit`` with validation and the package's callbacks.

    Args:
        cluster_resolver: as ``tf.distribute.MultiWorkerMirroredStrategy`` (``None``: read
            ``TF_CONFIG``).
        communication_options: as ``tf.distribute.MultiWorkerMirroredStrategy``.
    """

    def reduce(self, reduce_op, value, axis=None):
        parent = super()

        def one(v):
            first = v.values[0] if isinstance(v, tf.distribute.DistributedValues) else v
            rank = getattr(getattr(first, "shape", None), "rank", None)
            return parent.reduce(reduce_op, v, None if rank == 0 else axis)

        return tf.nest.map_structure(one, value)


def tf_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy called ``name``, ``"mirrored"`` or ``"multiworker"`` (by name,
    with the backend checked: :func:`keras_dmr.training.parallel.make_strategy`).

    ``"multiworker"`` reads ``TF_CONFIG`` (no ``TF_CONFIG``: one worker); its workers must all
    start, or the constructor waits for them.

    Args:
        name: ``"mirrored"`` or ``"multiworker"``.

    Returns:
        The strategy.
    """
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return MultiWorkerStrategy()
    raise ValueError(f"`name` must be 'mirrored' or 'multiworker'; got {name!r}")


def is_multi_worker(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether ``strategy`` spans more than one worker.

    Args:
        strategy: a strategy or None.

    Returns:
        True for more than one worker.
    """
    extended = getattr(strategy, "extended", None)
    check = getattr(extended, "_in_multi_worker_mode", None)
    return bool(check and check())


class AverageBatchNormStatistics(keras.callbacks.Callback):
    """Averages BN moving means and variances across workers before validation and after each
    epoch, so that all workers of a multi-worker run hold the same model.

    The averaged variance is the mean of the workers' moving variances, not the variance of the
    pooled data (it leaves out the spread between the workers' means). Does nothing with one
    worker. All workers must run ``fit`` with this callback: the average is a collective op.

    Args:
        strategy: the run's ``tf.distribute`` strategy.
    """

    def __init__(self, strategy: tf.distribute.Strategy):
        super().__init__()
        self.strategy = strategy

    def _variables(self) -> list:
        found = []
        for layer in keras_internals.all_layers(self.model):
            if isinstance(layer, keras.layers.BatchNormalization):
                found += [layer.moving_mean, layer.moving_variance]
        return found

    def average(self) -> None:
        if not is_multi_worker(self.strategy):
            return
        variables = self._variables()
        if not variables:
            return
        flat = tf.concat([tf.reshape(tf.convert_to_tensor(v.value), [-1]) for v in variables], 0)
        mean = self.strategy.reduce("MEAN", flat, axis=None)
        sizes = [int(v.value.shape.num_elements()) for v in variables]
        for variable, part in zip(variables, tf.split(mean, sizes), strict=True):
            variable.assign(tf.reshape(part, variable.shape))

    def on_test_begin(self, logs=None):
        self.average()

    def on_epoch_end(self, epoch, logs=None):
        self.average()
