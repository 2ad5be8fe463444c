"""Random weights and random BatchNorm statistics, for checking conversions honestly."""

from __future__ import annotations

import keras
import numpy as np

from keras_dmr.utils import keras_internals


def randomize(model_or_layer, seed: int = 0):
    """Give every weight a random value and every BN random statistics (moving mean and
    variance) and affine parameters, in place; returns its argument.

    Default BN (mean 0, variance 1, gamma 1, beta 0) would hide any conversion bug that
    mishandles them, so equivalence checks in tests and docs start from here.

    Args:
        model_or_layer: a built model or layer.
        seed: seed of the random values.

    Returns:
        ``model_or_layer``, changed in place.
    """
    rng = np.random.default_rng(seed)
    for layer in keras_internals.all_layers(model_or_layer, include_self=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.normal(0, 0.2, c),
                    rng.normal(0, 0.5, c),
                    rng.uniform(0.5, 2.0, c),
                ]
            )
        elif layer.weights and not keras_internals.has_sublayers(layer):
            layer.set_weights([_random_like(v, rng) for v in layer.weights])
    return model_or_layer


def _random_like(variable, rng) -> np.ndarray:
    """A variance stays positive, and so does a scale constrained to be (ChannelScale's
    ``gamma``); anything else is He-scaled normal noise."""
    name = variable.name.rsplit("/", 1)[-1]
    shape = tuple(variable.shape)
    if name == "moving_variance":
        return rng.uniform(0.5, 2.0, shape)
    if name == "gamma" and getattr(variable, "constraint", None) is not None:
        return rng.uniform(0.5, 1.5, shape)
    return rng.normal(0, 1.0 / np.sqrt(max(1, np.prod(shape[:-1]))), shape)
