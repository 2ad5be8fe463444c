import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def randomize(model_or_layer, seed: int = 0):
    """Random weights AND random BatchNorm statistics: default BN (mean 0, var 1, gamma 1,
    beta 0) would hide any bug that mishandles them."""
    rng = np.random.default_rng(seed)
    layers = model_or_layer._flatten_layers(include_self=True, recursive=True)
    for layer in layers:
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
        elif layer.weights and not layer._layers:
            layer.set_weights(
                [
                    rng.normal(0, 1.0 / np.sqrt(max(1, np.prod(w.shape[:-1]))), w.shape)
                    for w in layer.get_weights()
                ]
            )
    return model_or_layer


def max_rel_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
