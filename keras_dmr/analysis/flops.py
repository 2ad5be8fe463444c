"""Multiply-accumulate counts, the unit both papers call "FLOPs"."""

from __future__ import annotations

import keras
import numpy as np

from keras_dmr.utils import keras_internals


def _macs(layer, output_shape) -> int:
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw, _, mult = layer.kernel.shape
        h, w, c = output_shape[1:]
        return int(h * w * c * kh * kw)
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw, per_group_in, _ = layer.kernel.shape
        h, w, c = output_shape[1:]
        return int(h * w * c * kh * kw * per_group_in)
    if isinstance(layer, keras.layers.Dense):
        return int(np.prod(layer.kernel.shape))
    return 0


def count_flops_of_layers(model: keras.Model) -> int | None:
    """:func:`count_flops` read from the output shapes a functional model's layers already have
    (no forward pass), or None when a counted layer is nested in another or its shape is not
    fully known. What a converted plain model is: a flat graph of Keras layers."""
    total = 0
    counted = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
    top = set(map(id, model.layers))
    for layer in keras_internals.all_layers(model):
        if not isinstance(layer, counted):
            continue
        if id(layer) not in top or len(keras_internals.call_sites(layer)) != 1:
            return None
        shape = tuple(layer.output.shape)
        if any(s is None for s in shape[1:]):
            return None
        total += _macs(layer, shape)
    return total


def count_flops(model: keras.Model, input_shape: tuple | None = None) -> int:
    """Multiply-accumulates of one image's forward pass through every Conv2D (grouped: per
    group), DepthwiseConv2D and Dense layer, nested blocks included.

    This is the convention of the RMNet and DMRNet papers' "FLOPs" (one multiply-add = 1). BN,
    additions, activations and pooling are not counted. ``input_shape`` (H, W, C) is needed only
    when the model's own input size is unknown.

    Args:
        model: a Keras model.
        input_shape: ``(H, W, C)`` when the model's input size is unknown.

    Returns:
        Multiply-accumulates per image.
    """
    if input_shape is None:
        try:
            inputs = model.inputs
        except (AttributeError, ValueError):  # a Sequential model without an Input
            inputs = None
        if not inputs:
            raise ValueError(
                f"model {model.name!r} has no defined input: build it (give it an Input or call "
                "it once) or pass `input_shape` (H, W, C)"
            )
        input_shape = inputs[0].shape[1:]
    shape = tuple(input_shape)
    if any(s is None for s in shape):
        raise ValueError(
            f"`input_shape` is required: model {model.name!r} has an unknown input size {shape}"
        )
    counted = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
    leaves = [layer for layer in keras_internals.all_layers(model) if isinstance(layer, counted)]
    total = 0

    def wrap(layer, call):
        def counting_call(*args, **kwargs):
            nonlocal total
            outputs = call(*args, **kwargs)
            total += _macs(layer, tuple(outputs.shape))
            return outputs

        return counting_call

    for layer in leaves:
        layer.call = wrap(layer, layer.call)
    try:
        model(np.zeros((1, *shape), "float32"), training=False)
    finally:
        for layer in leaves:
            del layer.call
    return total
