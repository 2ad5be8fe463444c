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
            layer.set_weights(
                [
                    rng.normal(0, 1.0 / np.sqrt(max(1, np.prod(w.shape[:-1]))), w.shape)
                    for w in layer.get_weights()
                ]
            )
    return model_or_layer
