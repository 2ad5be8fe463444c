"""What every pruning step shares: the layer kinds (the converter's own reading of a layer,
:mod:`keras_dmr.convert.elements`), a chain of layers, and a convolution with its BN and
activation as float64 arrays (:class:`Unit`)."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_dmr.analysis.flops import count_flops
from keras_dmr.convert import elements
from keras_dmr.errors import ConversionError
from keras_dmr.layers import RESIDUAL_BLOCKS
from keras_dmr.layers.conv import bn_weights
from keras_dmr.rm import kernels

SPARSITY_METHODS = ("proximal", "subgradient")
_WEIGHTED = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


def bn_importance(gamma, variance, epsilon: float) -> np.ndarray:
    """Network slimming's channel importance, ``|gamma|·sqrt(var / (var + eps))``: ``|gamma|``
    up to the epsilon term, the spread of the channel that the BN's statistics estimate (so a BN
    that only records statistics, ``gamma = sqrt(var + eps)``, ranks by its channel's spread)."""
    var = np.maximum(np.asarray(variance, np.float64), 0.0)
    return np.abs(np.asarray(gamma, np.float64)) * np.sqrt(var / (var + float(epsilon)))


def layer_kind(layer):
    """The converter's reading of ``layer`` (:func:`keras_dmr.convert.elements.of_layer`), or
    None for a convolution or dense layer (read by :func:`make_unit` instead) and for a layer the
    converter does not understand."""
    if isinstance(layer, _WEIGHTED):
        return None
    try:
        return elements.of_layer(layer)
    except ConversionError:
        return None


def is_activation(layer) -> bool:
    """A ReLU-family activation (ReLU, ReLU6, LeakyReLU, PReLU, ChannelwiseReLU)."""
    return isinstance(layer_kind(layer), elements.Activation)


def is_global_pool(layer) -> bool:
    return isinstance(layer_kind(layer), elements.GlobalPool)


def is_passthrough(layer) -> bool:
    """Padding, pooling and inference identities (Dropout): copied, channels unchanged."""
    return isinstance(layer_kind(layer), elements.Padding | elements.Pool | elements.Identity)


def describe_layer(layer) -> str:
    return f"layer {layer.name!r} ({type(layer).__name__})"


def layer_chain(model: keras.Model, what: str) -> list:
    """``model.layers`` without the input, checked to form one chain (each reads the last)."""
    if not isinstance(model, keras.Model) or not getattr(model, "built", False):
        raise ValueError(f"`{what}` must be a built keras.Model; got {model!r}")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"model {model.name!r}: one input and one output are required")
    layers = [lyr for lyr in model.layers if not isinstance(lyr, keras.layers.InputLayer)]
    previous = model.inputs[0]
    for layer in layers:
        try:
            inp = layer.input
        except (AttributeError, ValueError):
            inp = None
        if isinstance(inp, list | tuple) or inp is not previous:
            raise ValueError(
                f"model {model.name!r}: {describe_layer(layer)} does not simply follow the layer "
                "before it; slim needs a plain (single-path) model: convert a residual model "
                "with keras_dmr.to_plain(model, fuse_bn=False), or prune it with slim_residual"
            )
        previous = layer.output
    return layers


def input_like(model: keras.Model):
    spec = model.inputs[0]
    return keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype, name=spec.name)


def clone_layer(layer, **changes):
    config = layer.get_config()
    config.update(changes)
    return type(layer).from_config(config)


# ------------------------------------------------------------------------ the plain model
@dataclasses.dataclass
class Unit:
    """A convolution, its BatchNormalization and its activation, as float64 arrays."""

    conv: keras.layers.Layer
    bn: keras.layers.BatchNormalization
    act: keras.layers.Layer | None
    depthwise: bool
    groups: int
    kernel: np.ndarray  # dense (kh, kw, c_in, c_out); depthwise: (kh, kw, c)
    bias: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float
    keep_in: np.ndarray | None = None
    keep_out: np.ndarray | None = None

    @property
    def c_out(self) -> int:
        return self.kernel.shape[-1]

    def column_weights(self) -> np.ndarray:
        """Per output channel, the number of non-zero weights it reads (kept inputs only)."""
        if self.depthwise:
            counts = np.count_nonzero(self.kernel, axis=(0, 1))
            return counts if self.keep_in is None else np.where(self.keep_in, counts, 0)
        k = self.kernel if self.keep_in is None else self.kernel[:, :, self.keep_in]
        return np.count_nonzero(k, axis=(0, 1, 2))

    def importance(self) -> np.ndarray:
        return bn_importance(self.gamma, self.var, self.eps)

    def identity(self) -> np.ndarray:
        """Channels whose BN is the identity plus a constant (Eq. 3): no recorded scale."""
        return kernels.identity_bn_channels(self.gamma, self.var, self.eps)

    def folded_bn(self) -> tuple[np.ndarray, np.ndarray]:
        """Scale and shift of this unit's inference-mode BN (:func:`keras_dmr.rm.fold_bn`)."""
        return kernels.fold_bn(self.gamma, self.beta, self.mean, self.var, self.eps)

    def fold_inputs(self, dropped: np.ndarray, values: np.ndarray) -> None:
        """Fold the constant value of each dropped input into this unit's BN moving mean."""
        if not dropped.any():
            return
        if self.depthwise:
            delta = np.where(dropped, values, 0.0) * self.kernel.sum((0, 1))
        else:
            taps = self.kernel[:, :, dropped, :].sum((0, 1))  # (n_dropped, c_out)
            delta = values[dropped] @ taps
        self.mean = self.mean - delta

    def activate(self, z: np.ndarray) -> np.ndarray:
        if self.act is None:
            return z
        x = np.asarray(z, "float32").reshape(1, 1, 1, -1)
        return np.asarray(self.act(x), np.float64).reshape(-1)

    def dropped_values(self, exact: np.ndarray) -> np.ndarray:
        """Value of each channel if dropped: exact where ``exact`` (it reads nothing), else
        with its normalised input at its mean (``act(beta)``)."""
        scale, shift = self.folded_bn()
        at_zero = self.bias * scale + shift
        return self.activate(np.where(exact, at_zero, self.beta))


def make_unit(conv, bn, act) -> Unit:
    if not isinstance(bn, keras.layers.BatchNormalization):
        raise ValueError(
            f"{describe_layer(conv)} is not followed by a BatchNormalization: slimming ranks "
            "channels by their BN scale; convert with keras_dmr.to_plain(model, fuse_bn=False)"
        )
    if bn.axis not in (-1, 3, [-1], [3]):
        raise ValueError(f"{describe_layer(bn)}: only channels-last BN (axis -1) is supported")
    if getattr(conv, "data_format", "channels_last") != "channels_last":
        raise ValueError(f"{describe_layer(conv)}: only channels_last convolutions are supported")
    activation = keras.activations.serialize(conv.activation)
    if activation not in ("linear", None):
        raise ValueError(f"{describe_layer(conv)} has activation {activation!r} before its BN")
    w = conv.get_weights()
    depthwise = isinstance(conv, keras.layers.DepthwiseConv2D)
    if depthwise:
        if w[0].shape[-1] != 1:
            raise ValueError(f"{describe_layer(conv)}: depth multiplier {w[0].shape[-1]} (only 1)")
        kernel, groups = np.asarray(w[0][..., 0], np.float64), w[0].shape[2]
    else:
        groups = conv.groups
        kernel = kernels.to_dense(np.asarray(w[0], np.float64), groups)
    c_out = kernel.shape[-1]
    bias = np.asarray(w[1], np.float64) if conv.use_bias else np.zeros(c_out)
    if act is not None and isinstance(act, keras.layers.PReLU):
        if np.asarray(act.alpha).size != c_out:
            raise ValueError(f"{describe_layer(act)}: only per-channel alphas (shared_axes=[1, 2])")
    gamma, beta, mean, var = bn_weights(bn)
    return Unit(
        conv, bn, act, depthwise, groups, kernel, bias, gamma, beta, mean, var, float(bn.epsilon)
    )


def macs_or_none(model: keras.Model) -> int | None:
    """Multiply-accumulates per image, or None where the input size is not fixed."""
    try:
        return count_flops(model)
    except ValueError:
        return None


def is_residual_block(layer) -> bool:
    """A block that rewrites itself by RM (it answers ``plain_ops``), not one of the stream
    layers around the blocks (``TileBranches``, ``BranchMean``) that answer it too."""
    return isinstance(layer, RESIDUAL_BLOCKS)
