"""Plain models without slope-1 PReLU: each reserved stream as its own convolution.

RM carries a block's signed input through reserved channels, so a plain MobileNetV1 (from a
MobileNetV2) ends many convolutions with an activation that is ReLU on the block's own channels and
identity on the reserved ones (a PReLU with slopes 0 and 1, or ``ChannelwiseReLU``). In int8,
LiteRT runs such a PReLU far slower than a convolution with its ReLU fused: the int8 plain
MobileNetV1 of ``keras-dmr demo`` ran slower than its residual Keras model with its 16 PReLUs and
many times faster with them split. :func:`split_reserved_streams` rewrites each ``conv →
activation`` pair into two convolutions, one per channel block, the first with the ReLU fused, and
keeps the two streams apart through the depthwise convolution that follows (channel for channel),
concatenating them only before the next full convolution. The arithmetic is the same; only the
operators change.

What it cannot do: it reads chains only (every layer fed by the previous one, as
:func:`keras_dmr.to_plain` emits them) and splits only activations whose ReLU channels come first
and identity channels last, each block uniform; anything else is left as it is (correct, only not
faster). It never changes a model's outputs: the result is checked against the input model.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_dmr.errors import ConversionError
from keras_dmr.layers.activations import ChannelwiseReLU
from keras_dmr.rm.kernels import relative_error
from keras_dmr.utils import keras_internals

# The rewritten model may differ from the original only by float32 summation order.
TOLERANCE = 1e-5


def reserved_split(layer) -> tuple[int, str] | None:
    """``(k, activation)`` when ``layer`` is ReLU (``"relu"`` or ``"relu6"``) on its first
    ``k`` channels and identity on the rest (``0 < k < channels``); ``None`` otherwise."""
    if isinstance(layer, keras.layers.PReLU):
        weights = layer.get_weights()
        if not weights or weights[0].size != weights[0].shape[-1]:  # one slope per channel
            return None
        slope, cap = np.ravel(weights[0]), np.full(weights[0].shape[-1], np.inf)
    elif isinstance(layer, ChannelwiseReLU):
        slope, cap = np.asarray(layer.negative_slope), np.asarray(layer.max_value)
    else:
        return None
    k = int(np.argmax(slope != 0)) if np.any(slope != 0) else slope.size
    own_caps = np.unique(cap[:k])
    if not 0 < k < slope.size or len(own_caps) != 1 or np.any(slope[:k] != 0):
        return None
    if np.any(slope[k:] != 1) or not np.all(np.isinf(cap[k:])):
        return None
    activation = {np.inf: "relu", 6.0: "relu6"}.get(float(own_caps[0]))
    return None if activation is None else (k, activation)


def _is_chain(model: keras.Model) -> bool:
    if len(model.inputs) != 1 or len(model.outputs) != 1 or len(model.layers) < 2:
        return False
    if not isinstance(model.layers[0], keras.layers.InputLayer):
        return False
    previous = model.layers[0]
    for layer in model.layers[1:]:
        if len(keras_internals.call_sites(layer)) != 1 or layer.input is not previous.output:
            return False
        previous = layer
    return previous.output is model.outputs[0]


def _plain_conv(layer) -> bool:
    """A Conv2D (ungrouped) or a DepthwiseConv2D (multiplier 1) without activation."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return layer.depth_multiplier == 1 and layer.activation is keras.activations.linear
    return (
        type(layer) is keras.layers.Conv2D
        and layer.groups == 1
        and layer.activation is keras.activations.linear
    )


def _part(layer, channels: slice, activation: str | None, name: str):
    """A copy of ``layer`` computing only ``channels`` of its output, with ``activation``."""
    config = {**layer.get_config(), "name": name, "activation": activation}
    weights = layer.get_weights()
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        part = keras.layers.DepthwiseConv2D.from_config(config)
        return part, [weights[0][:, :, channels, :], *(w[channels] for w in weights[1:])]
    config["filters"] = len(range(*channels.indices(layer.filters)))
    part = keras.layers.Conv2D.from_config(config)
    return part, [weights[0][..., channels], *(w[channels] for w in weights[1:])]


def split_reserved_streams(model: keras.Model, *, verify: bool = True) -> tuple[keras.Model, int]:
    """``model`` with every ``conv → (ReLU | identity)`` activation split into two streams, and
    how many activations were split (0: ``model`` itself is returned)."""
    if not _is_chain(model):
        return model, 0
    layers = model.layers[1:]
    plan = [  # the index of every convolution whose activation can be split
        i
        for i in range(len(layers) - 1)
        if _plain_conv(layers[i]) and reserved_split(layers[i + 1]) is not None
    ]
    if not plan:
        return model, 0

    x = inputs = keras.Input(model.inputs[0].shape[1:], dtype=model.inputs[0].dtype)
    pending: list = []  # every new layer and its weights, set once it is built
    split = 0
    i = 0
    while i < len(layers):
        layer = layers[i]
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        if i in plan:
            k, activation = reserved_split(layers[i + 1])
            if depthwise and not (isinstance(x, tuple) and x[0].shape[-1] == k):
                plan.remove(i)
                continue  # a depthwise split needs its input split at the same channel
            if not depthwise and isinstance(x, tuple):
                x = keras.layers.Concatenate(name=f"{layer.name}_streams")(list(x))
            own, own_w = _part(layer, slice(0, k), activation, f"{layer.name}_own")
            rest, rest_w = _part(layer, slice(k, None), None, f"{layer.name}_reserved")
            x = (own(x[0]), rest(x[1])) if depthwise else (own(x), rest(x))
            pending += [(own, own_w), (rest, rest_w)]
            split += 1
            i += 2
            continue
        if isinstance(x, tuple):
            x = keras.layers.Concatenate(name=f"{layer.name}_streams")(list(x))
        copy = layer.__class__.from_config(layer.get_config())  # the model's own stays a chain
        x = copy(x)
        pending.append((copy, layer.get_weights()))
        i += 1
    if isinstance(x, tuple):
        x = keras.layers.Concatenate(name="output_streams")(list(x))
    result = keras.Model(inputs, x, name=model.name)
    for part, weights in pending:
        part.set_weights(weights)
    if verify:
        _check_same_outputs(model, result)
    return result, split


def _check_same_outputs(model: keras.Model, result: keras.Model) -> None:
    shape = tuple(model.inputs[0].shape[1:])
    batch = np.random.default_rng(0).normal(size=(2, *shape)).astype("float32")
    error = relative_error(
        keras.ops.convert_to_numpy(model(batch, training=False)),
        keras.ops.convert_to_numpy(result(batch, training=False)),
    )
    if not error <= TOLERANCE:
        raise ConversionError(
            f"model {model.name!r}: splitting its reserved streams changed the outputs "
            f"(relative error {error:.2e} > {TOLERANCE:.0e}); export it without the split"
        )
