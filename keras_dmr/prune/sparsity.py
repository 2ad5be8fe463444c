"""Sparsity training for network slimming: an L1 penalty on the BN scales (:class:`BNSparsity`);
the extra BN on the residual path is :mod:`keras_dmr.prune.skip_bn`'s."""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from keras_dmr.layers.streams import ChannelScale
from keras_dmr.prune.units import (
    SPARSITY_METHODS,
)
from keras_dmr.utils import keras_internals


# ------------------------------------------------------------------------------ sparsity
def scale_variables(model: keras.Model) -> list:
    """The scale factors network slimming penalises: every BatchNormalization's ``gamma`` and
    every :class:`ChannelScale`'s (the extra BN on the residual path), nested layers included.

    Args:
        model: any Keras model.

    Returns:
        The ``gamma`` variables, in layer order.
    """
    found, seen = [], set()
    for layer in keras_internals.all_layers(model):
        var = None
        if isinstance(layer, keras.layers.BatchNormalization) and layer.scale:
            var = layer.gamma
        elif isinstance(layer, ChannelScale) and layer.scale:
            var = layer.gamma
        if var is not None and id(var) not in seen:
            seen.add(id(var))
            found.append(var)
    return found


def bn_scales(model: keras.Model) -> np.ndarray:
    """All penalised scale factors of ``model`` as one vector of ``|gamma|``.

    Args:
        model: a model with BN layers or :class:`ChannelScale` layers.

    Returns:
        A float64 vector, one entry per scaled channel.
    """
    variables = scale_variables(model)
    if not variables:
        return np.zeros(0)
    return np.concatenate([np.abs(np.asarray(v, np.float64)) for v in variables])


def sparsity_factor(
    budget: float, images: int, epochs: int, batch_size: int = 64, learning_rate: float = 0.1
) -> float:
    """The :class:`BNSparsity` factor whose proximal steps shrink a scale by at most ``budget``
    in all over a run: Σ over its steps of learning rate × factor, under the recipe's step
    schedule (:class:`~keras_dmr.recipe.RecipeSGD`), so that a longer run (more images, more
    epochs) is not pruned to nothing and a short one still zeroes scales.

    Args:
        budget: the total shrinkage, e.g. 0.95 (a scale of about 1 at most reaches 0).
        images: training images per epoch.
        epochs: epochs of the run.
        batch_size: images per step (a partial last batch counts as a step).
        learning_rate: the recipe's initial learning rate.

    Returns:
        The factor.
    """
    from keras_dmr.recipe import RecipeSGD

    for name, value in (("images", images), ("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}")
    schedule = RecipeSGD(learning_rate=learning_rate)
    per_step = sum(schedule.learning_rate_at(e, epochs) for e in range(epochs))
    return budget / (math.ceil(images / batch_size) * per_step)


class BNSparsity(keras.callbacks.Callback):
    """Sparsity training: an L1 penalty ``factor·Σ|gamma|`` on every BN scale (and every
    :class:`ChannelScale`), applied after each training batch with the optimizer's current
    learning rate ``lr``.

    ``method="proximal"`` (default) soft-thresholds, ``gamma ← sign(gamma)·max(|gamma| −
    lr·factor, 0)``, so unimportant scales reach exactly 0; ``"subgradient"`` steps
    ``gamma −= lr·factor·sign(gamma)`` as Network slimming does (scales hover around 0). The
    paper picks ``factor`` in [1e-4, 1e-3] for 200 CIFAR epochs; the penalty applied is
    proportional to ``factor`` times the number of steps, so short runs need a larger one. The
    step bypasses momentum and weight decay (it is not part of the loss).

    Args:
        factor: the L1 factor (>= 0).
        method: ``"proximal"`` or ``"subgradient"``.
    """

    def __init__(self, factor: float = 1e-4, method: str = "proximal"):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            raise ValueError(f"`factor` must be a number > 0; got {factor!r}")
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"`factor` must be a number > 0; got {factor!r}")
        if method not in SPARSITY_METHODS:
            raise ValueError(f"`method` must be one of {SPARSITY_METHODS}; got {method!r}")
        self.factor = float(factor)
        self.method = method
        self._variables = []

    def on_train_begin(self, logs=None):
        self._variables = scale_variables(self.model)
        if not self._variables:
            raise ValueError(
                f"model {self.model.name!r} has no BatchNormalization (or ChannelScale) scale "
                "for BNSparsity to penalise"
            )

    def on_train_batch_end(self, batch, logs=None):
        lr = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        step = lr * self.factor
        for var in self._variables:
            g = var.value
            if self.method == "proximal":
                var.assign(ops.sign(g) * ops.maximum(ops.abs(g) - step, 0.0))
            else:
                var.assign(g - step * ops.sign(g))

    def get_config(self):
        return {"factor": self.factor, "method": self.method}
