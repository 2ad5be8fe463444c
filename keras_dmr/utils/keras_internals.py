"""The one home of the Keras internals the package reads: private attributes and ``keras.src``
classes that the public API does not offer (a model's layers at every depth, a layer's call
sites, the producer of a symbolic tensor, the graph walk of a Functional model, the classes of
Keras operations). When Keras changes one of them, :func:`check` names what moved and the Keras
version, and ``tests/test_keras_internals.py`` fails on it first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import keras
from keras.src.models.functional import Functional
from keras.src.ops import nn as ops_nn
from keras.src.ops import numpy as ops_numpy

__all__ = [
    "Functional",
    "all_layers",
    "call_sites",
    "check",
    "has_sublayers",
    "ops_nn",
    "ops_numpy",
    "producer",
    "run_through_graph",
]

# (owner, attribute) pairs this module relies on; `check` verifies each.
_REQUIRED = (
    (keras.layers.Layer, "_flatten_layers"),
    (Functional, "_run_through_graph"),
    (ops_nn, "Relu"),
    (ops_nn, "Relu6"),
    (ops_nn, "LeakyRelu"),
    (ops_nn, "Sigmoid"),
    (ops_nn, "Silu"),
    (ops_numpy, "Add"),
    (ops_numpy, "Subtract"),
    (ops_numpy, "Multiply"),
    (ops_numpy, "Pad"),
)


def check() -> None:
    """Raise ``RuntimeError`` naming every internal that this Keras no longer has."""
    missing = [
        f"{getattr(owner, '__name__', owner)}.{name}"
        for owner, name in _REQUIRED
        if not hasattr(owner, name)
    ]
    layer = keras.layers.Dense(1)
    layer(keras.Input((1,)))
    missing += [f"Layer.{a}" for a in ("_inbound_nodes", "_layers") if not hasattr(layer, a)]
    if not hasattr(layer.output, "_keras_history"):
        missing.append("KerasTensor._keras_history")
    if missing:
        raise RuntimeError(
            f"keras {keras.__version__} lacks internals keras_dmr reads: {', '.join(missing)} "
            "(keras_dmr/utils/keras_internals.py is the one place to adapt)"
        )


def all_layers(model, include_self: bool = False) -> Iterator:
    """Every layer of ``model``, nested models' layers included, depth first."""
    return model._flatten_layers(include_self=include_self, recursive=True)


def call_sites(layer) -> list:
    """The nodes where ``layer`` was called in a functional graph (Keras' ``_inbound_nodes``)."""
    return layer._inbound_nodes


def producer(tensor):
    """The layer or operation whose call produced a symbolic ``tensor``."""
    return tensor._keras_history.operation


def has_sublayers(layer) -> bool:
    """Whether ``layer`` tracks layers of its own (a block, a nested model)."""
    return bool(layer._layers)


def run_through_graph(model, inputs: list, call_fn: Callable):
    """Keras' own walk of a Functional ``model``'s graph, calling ``call_fn(operation, *args,
    **kwargs)`` for every operation in order; returns the model's output(s)."""
    return model._run_through_graph(inputs, operation_fn=lambda op: op, call_fn=call_fn)
