"""What each node of a model's graph means to the converter: one small record per node.

``element(node)`` reads a Keras layer or operation and returns what it computes in the plain-op
vocabulary (a linear convolution, a per-channel affine map, a piecewise-linear activation,
padding, pooling, a dense layer, an addition, a block that rewrites itself, or nothing at all),
or raises :class:`ConversionError` naming the node, where it stands and why. Nothing here looks
at a node's neighbours; :mod:`keras_dmr.convert.walker` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import numpy as np

from keras_dmr.errors import ConversionError
from keras_dmr.layers.activations import ChannelwiseReLU
from keras_dmr.layers.conv import GroupedConv2D, bn_weights
from keras_dmr.layers.padding import ConstantPadding2D
from keras_dmr.layers.streams import ChannelScale
from keras_dmr.rm.kernels import fold_bn
from keras_dmr.rm.ops import Act, ConvOp, conv_bn_op, depthwise_kernel
from keras_dmr.utils.keras_internals import ops_nn, ops_numpy

RESERVE_RULE = (
    "RM keeps a signal alive through a layer only by ReLU of a non-negative input or a slope-1 "
    "PReLU, so every activation must be piecewise linear through zero (ReLU, ReLU6, LeakyReLU, "
    "PReLU)"
)
IDENTITIES = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
    keras.layers.Identity,
    keras.layers.ActivityRegularization,
)
GLOBAL_POOLS = {
    keras.layers.GlobalAveragePooling2D: "avg",
    keras.layers.GlobalMaxPooling2D: "max",
}


@dataclasses.dataclass
class Linear:
    """A convolution (dense float64 kernel, bias) and the activation the layer applies after;
    ``pre`` is a linear convolution the layer applies first (a SeparableConv2D's depthwise
    part, whose padding and strides are the layer's, ``op`` then being its 1×1 pointwise part)."""

    op: ConvOp
    act: Callable[[int], Act] | None = None
    pre: ConvOp | None = None


@dataclasses.dataclass
class Affine:
    """``scale·x + shift`` per channel (an inference BatchNorm, a Rescaling); ``bn`` keeps the
    BatchNorm's (gamma, mean, variance) and epsilon so that ``fuse_bn=False`` can restore it."""

    scale: np.ndarray
    shift: np.ndarray
    bn: np.ndarray | None = None
    epsilon: float = 1e-3


@dataclasses.dataclass
class Activation:
    make: Callable[[int], Act]


@dataclasses.dataclass
class Padding:
    pads: tuple  # ((top, bottom), (left, right))
    value: float = 0.0


@dataclasses.dataclass
class Pool:
    kind: str  # "max" | "avg"
    size: int
    strides: int
    padding: str  # "same" | "valid"


@dataclasses.dataclass
class GlobalPool:
    kind: str
    keepdims: bool = False


@dataclasses.dataclass
class Reshape:
    """A reshape to ``target`` (without the batch axis): understood where it only adds or drops
    unit axes around pooled channels."""

    target: tuple


@dataclasses.dataclass
class Dense:
    kernel: np.ndarray
    bias: np.ndarray
    activation: str | None


@dataclasses.dataclass
class OutputActivation:
    """An activation only a dense layer's output may have (softmax, sigmoid)."""

    name: str


@dataclasses.dataclass
class SkipScale:
    """A :class:`~keras_dmr.layers.ChannelScale`, the extra BN on the residual path (Sec. 4.2):
    ``gamma·x`` per channel with the moving statistics of ``x``; ``gamma`` None: the statistics
    only (the identity), a block's record of its sum before the activation."""

    gamma: np.ndarray | None
    mean: np.ndarray
    var: np.ndarray
    epsilon: float

    def scale_op(self, name: str) -> ConvOp:
        """The scale as a diagonal 1×1 op with the BN record its reserved copies keep:
        ``gamma·sqrt(var)`` (their standard deviation), the input's mean and variance."""
        return ConvOp(
            np.diag(self.gamma)[None, None],
            np.zeros_like(self.gamma),
            bn=np.stack([self.gamma * np.sqrt(self.var), self.mean, self.var]),
            epsilon=self.epsilon,
            name=name,
        )


class Flatten:
    pass


class Identity:
    pass


class Add:
    pass


@dataclasses.dataclass
class Block:
    """A layer that rewrites itself (it answers ``plain_ops``)."""

    layer: object


Element = (
    Linear
    | Affine
    | Activation
    | Padding
    | Pool
    | GlobalPool
    | Dense
    | OutputActivation
    | Flatten
    | Reshape
    | Identity
    | Add
    | Block
    | SkipScale
)


def refuse(node, why: str, fix: str | None = None) -> ConversionError:
    """The converter's one error form: what, where, why, and what to do."""
    return ConversionError(f"{node.describe()}: {why}" + (f". {fix}" if fix else ""))


# --------------------------------------------------------------------------------- activations
def _relu(slope=0.0, cap=None) -> Callable[[int], Act]:
    cap = np.inf if cap is None else float(cap)
    return lambda c: Act(np.full(c, float(slope)), np.full(c, cap))


def activation_named(name: str, node) -> Callable[[int], Act] | None:
    """The Act of a Keras activation name; None for 'linear'; raises for anything else."""
    if name in ("linear", None):
        return None
    if name == "relu":
        return _relu()
    if name == "relu6":
        return _relu(cap=6.0)
    if name == "leaky_relu":
        return _relu(slope=0.2)
    raise refuse(node, f"activation {name!r} is not piecewise linear", RESERVE_RULE)


def _activation_layer(layer, node) -> Callable[[int], Act]:
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.threshold) != 0:
            raise refuse(node, f"a ReLU threshold of {layer.threshold} is not supported")
        return _relu(float(layer.negative_slope), layer.max_value)
    if isinstance(layer, keras.layers.LeakyReLU):
        return _relu(float(layer.negative_slope))
    if isinstance(layer, ChannelwiseReLU):  # what the emitter writes: a plain model reconverts
        slope, cap = np.asarray(layer.negative_slope), np.asarray(layer.max_value)
        return lambda c: Act(slope.astype(np.float64), cap.astype(np.float64))
    alpha = np.asarray(layer.get_weights()[0], np.float64)  # PReLU
    if alpha.ndim == 3 and (alpha.shape[0] > 1 or alpha.shape[1] > 1):
        if not np.all(alpha == alpha[:1, :1]):
            raise refuse(
                node, "a PReLU with a slope per pixel is not supported", "share axes [1, 2]"
            )
        alpha = alpha[:1, :1]
    return lambda c: Act(np.broadcast_to(alpha.reshape(-1), (c,)).copy(), np.full(c, np.inf))


# ---------------------------------------------------------------------------------- layers
def _channels_last(layer, node) -> None:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise refuse(node, "channels_first layers are not supported", "build it channels_last")


def _padding_of(layer) -> tuple:
    pads = layer.padding
    return tuple(tuple(int(v) for v in p) for p in pads)


def _check_conv_geometry(layer, node) -> None:
    """What every convolution kind must be to convert: channels-last, undilated, square strides."""
    _channels_last(layer, node)
    if tuple(layer.dilation_rate) != (1, 1):
        raise refuse(node, "dilated convolutions are not supported")
    if layer.strides[0] != layer.strides[1]:
        raise refuse(node, f"non-square strides {tuple(layer.strides)} are not supported")


def _conv(layer, node) -> Linear:
    _check_conv_geometry(layer, node)
    w = layer.get_weights()
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        try:
            kernel = depthwise_kernel(w[0])
        except ConversionError as err:
            raise refuse(node, str(err)) from None
        groups = w[0].shape[2]
    else:
        kernel, groups = w[0], layer.groups
    bias = w[1] if layer.use_bias else None
    padding = "same" if layer.padding == "same" else ((0, 0), (0, 0))
    op = conv_bn_op(
        kernel,
        None,
        epsilon=1e-5,
        bias=bias,
        strides=int(layer.strides[0]),
        groups=groups,
        padding=padding,
        name=layer.name,
    )
    name = keras.activations.serialize(layer.activation)
    return Linear(op, activation_named(name, node))


def _separable_conv(layer, node) -> Linear:
    """SeparableConv2D: a depthwise convolution (the layer's strides and padding, no bias), then
    a 1×1 pointwise convolution with the bias and the activation."""
    _check_conv_geometry(layer, node)
    w = layer.get_weights()
    depthwise, pointwise = w[0], w[1]
    bias = w[2] if layer.use_bias else None
    try:
        kernel = depthwise_kernel(depthwise)
    except ConversionError as err:
        raise refuse(node, str(err)) from None
    padding = "same" if layer.padding == "same" else ((0, 0), (0, 0))
    pre = conv_bn_op(
        kernel,
        None,
        epsilon=1e-5,
        strides=int(layer.strides[0]),
        groups=depthwise.shape[2],
        padding=padding,
        name=f"{layer.name}_depthwise",
    )
    op = conv_bn_op(pointwise, None, epsilon=1e-5, bias=bias, name=layer.name)
    name = keras.activations.serialize(layer.activation)
    return Linear(op, activation_named(name, node), pre=pre)


def _batch_norm(layer, node) -> Affine:
    axis = layer.axis if isinstance(layer.axis, int) else tuple(layer.axis)
    if axis not in (-1, 3, (3,), (-1,)):
        raise refuse(node, f"a BatchNormalization over axis {axis} is not supported")
    gamma, beta, mean, var = bn_weights(layer)
    scale, shift = fold_bn(gamma, beta, mean, var, layer.epsilon)
    bn = np.stack([gamma, mean, var]) if layer.center and layer.scale else None
    return Affine(scale, shift, bn, float(layer.epsilon))


def _rescaling(layer, node) -> Affine:
    scale = np.ravel(np.asarray(layer.scale, np.float64))
    offset = np.ravel(np.asarray(layer.offset, np.float64))
    return Affine(scale, offset)


def _pool(layer, node) -> Pool:
    _channels_last(layer, node)
    size, strides = tuple(layer.pool_size), tuple(layer.strides)
    if size[0] != size[1] or strides[0] != strides[1]:
        raise refuse(node, "only square pools are supported")
    kind = "max" if isinstance(layer, keras.layers.MaxPooling2D) else "avg"
    return Pool(kind, int(size[0]), int(strides[0]), layer.padding)


def _dense(layer, node) -> Dense:
    w = layer.get_weights()
    kernel = np.asarray(w[0], np.float64)
    bias = np.asarray(w[1], np.float64) if layer.use_bias else np.zeros(kernel.shape[1])
    activation = keras.activations.serialize(layer.activation)
    return Dense(kernel, bias, None if activation == "linear" else activation)


def _keras_activation(layer, node) -> Element:
    name = keras.activations.serialize(layer.activation)
    if name in ("softmax", "sigmoid", "log_softmax"):
        return OutputActivation(name)
    make = activation_named(name, node)
    return Identity() if make is None else Activation(make)


def _layer(layer, node) -> Element:
    if hasattr(layer, "plain_ops"):
        return Block(layer)
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        raise refuse(
            node,
            "has LoRA weights or is quantized, so its weights are not its kernel",
            "Convert the float model (merge LoRA into the kernel, or convert before quantizing)",
        )
    if isinstance(layer, IDENTITIES):
        return Identity()
    if isinstance(layer, keras.layers.SeparableConv2D):
        if type(layer).call is not keras.layers.SeparableConv2D.call:
            raise refuse(
                node,
                "a SeparableConv2D subclass with its own `call`",
                "Give it a `plain_ops(ctx)` method that says what it computes",
            )
        return _separable_conv(layer, node)
    if isinstance(layer, keras.layers.DepthwiseConv2D | keras.layers.Conv2D):
        base = (
            keras.layers.DepthwiseConv2D
            if isinstance(layer, keras.layers.DepthwiseConv2D)
            else keras.layers.Conv2D
        )
        own = type(layer).call is not base.call or (
            getattr(type(layer), "convolution_op", None)
            not in (getattr(base, "convolution_op", None), GroupedConv2D.convolution_op)
        )
        if own:  # weight standardisation and the like: not the convolution its weights say
            raise refuse(
                node,
                f"a {base.__name__} subclass with its own `call` or `convolution_op`",
                "Give it a `plain_ops(ctx)` method that says what it computes",
            )
        return _conv(layer, node)
    if isinstance(layer, keras.layers.BatchNormalization):
        return _batch_norm(layer, node)
    if isinstance(layer, ChannelScale):
        weights = [np.asarray(w, np.float64) for w in layer.get_weights()]
        gamma = weights.pop(0) if layer.scale else None
        return SkipScale(gamma, weights[0], weights[1], float(layer.epsilon))
    if isinstance(layer, keras.layers.Rescaling):
        return _rescaling(layer, node)
    if isinstance(
        layer, keras.layers.ReLU | keras.layers.LeakyReLU | keras.layers.PReLU | ChannelwiseReLU
    ):
        return Activation(_activation_layer(layer, node))
    if isinstance(layer, keras.layers.Activation):
        return _keras_activation(layer, node)
    if isinstance(layer, keras.layers.ZeroPadding2D):
        _channels_last(layer, node)
        return Padding(_padding_of(layer))
    if isinstance(layer, ConstantPadding2D):
        return Padding(_padding_of(layer), float(layer.value))
    if isinstance(layer, keras.layers.MaxPooling2D | keras.layers.AveragePooling2D):
        return _pool(layer, node)
    for cls, kind in GLOBAL_POOLS.items():
        if isinstance(layer, cls):
            _channels_last(layer, node)
            return GlobalPool(kind, bool(getattr(layer, "keepdims", False)))
    if isinstance(layer, keras.layers.Flatten):
        return Flatten()
    if isinstance(layer, keras.layers.Reshape):
        return Reshape(tuple(layer.target_shape))
    if isinstance(layer, keras.layers.Dense):
        return _dense(layer, node)
    if isinstance(layer, keras.layers.Add):
        return Add()
    raise refuse(
        node,
        "cannot be converted: it is not a convolution, BatchNormalization, Rescaling, "
        "ReLU-family activation, padding, pooling, Flatten, Reshape, Dense, Dropout or Add layer, "
        "nor a block that answers `plain_ops`",
        "Convert the parts around it, or give the layer a `plain_ops(ctx)` method "
        "(docs/architecture.md)",
    )


# ------------------------------------------------------------------------------ operations
def _pad_operation(operation, node) -> Padding:
    if operation.mode != "constant":
        raise refuse(node, f"padding mode {operation.mode!r} is not supported")
    width = [tuple(int(v) for v in p) for p in operation.pad_width]
    if len(width) != 4 or width[0] != (0, 0) or width[3] != (0, 0):
        raise refuse(node, f"pad_width {operation.pad_width} pads more than height and width")
    value = node.constants[0] if node.constants else 0.0
    value = 0.0 if value is None else float(value)
    return Padding((width[1], width[2]), value)


def _operation(operation, node) -> Element:
    if isinstance(operation, ops_numpy.Add):
        if len(node.inputs) != 2 or node.constants:
            raise refuse(node, "adds a constant", "only additions of two tensors are understood")
        return Add()
    if isinstance(operation, ops_nn.Relu):
        return Activation(_relu())
    if isinstance(operation, ops_nn.Relu6):
        return Activation(_relu(cap=6.0))
    if isinstance(operation, ops_nn.LeakyRelu):
        return Activation(_relu(slope=float(operation.negative_slope)))
    if isinstance(operation, ops_numpy.Pad):
        return _pad_operation(operation, node)
    raise refuse(
        node,
        "is a Keras operation the converter does not understand (it reads additions, relu, "
        "relu6, leaky_relu and pad)",
        RESERVE_RULE if "lu" in type(operation).__name__.lower() else None,
    )


class _Bare:
    """A layer outside any graph, for :func:`of_layer`'s messages."""

    def __init__(self, layer):
        self.operation, self.name = layer, layer.name

    def describe(self) -> str:
        return f"layer {self.name!r} ({type(self.operation).__name__})"


def of_layer(layer) -> Element:
    """What a Keras layer computes, outside any graph (pruning reads layers with it): the one
    vocabulary of layer kinds the converter and the pruner share."""
    return _layer(layer, _Bare(layer))


def element(node) -> Element:
    """What ``node`` computes (see the module docstring)."""
    if node.is_layer:
        return _layer(node.operation, node)
    return _operation(node.operation, node)


def affine_op(affine: Affine, name: str) -> ConvOp:
    """A per-channel affine map as a 1×1 convolution with a diagonal kernel (keeping the BN
    record, so that ``fuse_bn=False`` restores a BatchNormalization here)."""
    op = ConvOp(np.diag(affine.scale)[None, None], affine.shift, name=name)
    if affine.bn is not None:
        op.bn, op.epsilon = affine.bn.copy(), affine.epsilon
    return op
