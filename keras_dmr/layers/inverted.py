"""MobileNetV2's inverted residual block, with a wide bottleneck (RMNet paper, Sec. 4.4 / 5.3).

Training form, for an input of ``c_in`` channels and a block of ``filters = C`` and bottleneck
factor ``f``::

    h = act(BN(expand_1x1(x)))          # c_in → hidden (absent when expansion == 1)
    h = act(BN(depthwise_3x3(h)))       # stride s
    y = BN(project_1x1(h))              # hidden → f·C, linear
    y[..., :C] += x[..., :C]            # only with a residual (stride 1, c_in == f·C)

``act`` is ReLU or ReLU6 and there is none after the add (MobileNetV2), so the block's input
and output are signed. ``hidden = expansion · c_in / f`` (``c_in`` when ``expansion == 1``): with
``f = 1`` this is Sandler et al.'s block; with ``f > 1`` the block's input and output have f·C
channels of which only the first C have a shortcut.

``plain_ops`` is the RM operation (Fig. 6): the expansion gains C Dirac outputs reserving
``x[..., :C]``, the depthwise convolution passes them on (slope-1 activations for a signed
input, no cap for ReLU6), and the projection merges them back. The walker then fuses the
projection with the next block's expansion (Eq. 5).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_dmr import rm
from keras_dmr.layers.blocks import check_choice
from keras_dmr.layers.conv import BN_EPSILON, bn_weights, conv2d
from keras_dmr.rm import kernels

ACTIVATIONS = ("relu", "relu6")
PADDINGS = ("same", "keras")
RELU6_CAP = 6.0


def _positive_int(argument: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"`{argument}` must be an integer >= 1; got {value!r}")
    return int(value)


def keras_pads(input_hw) -> tuple[tuple[int, int], tuple[int, int]]:
    """Zero padding ``keras.applications`` puts before a stride-2 3×3 depthwise convolution:
    TensorFlow's 'same' for a known size (1 after for even, 1 each side for odd), and 1 after
    for an unknown one."""
    return tuple((0, 1) if n is None or n % 2 == 0 else (1, 1) for n in input_hw)


@keras.saving.register_keras_serializable(package="keras_dmr")
class InvertedResidualBlock(keras.layers.Layer):
    """MobileNetV2 block: [1×1 expansion] → 3×3 depthwise → linear 1×1 projection [+ input].

    Args:
        filters: C; the block outputs ``bottleneck_factor·C`` channels.
        expansion: t. ``hidden = t·c_in / bottleneck_factor``; ``t = 1`` drops the expansion
            convolution (the depthwise convolution reads the input, as in MobileNetV2's block 0).
        strides: 1 or 2, of the depthwise convolution.
        bottleneck_factor: f >= 1; input and output have f·C channels, the residual adds the
            first C input channels to the first C output channels.
        activation: ``"relu"`` or ``"relu6"``, after the expansion and the depthwise BN.
        residual: None (default: a residual when ``strides == 1`` and the input has f·C
            channels, keras.applications' rule), True (required; an error if impossible) or
            False (never).
        padding: ``"same"`` or ``"keras"``, how a stride-2 depthwise convolution pads: "keras"
            fixes the pads when the layer is built, as keras.applications' MobileNetV2 does
            (the same as "same" for a known input size; 1 row/column after for an unknown one).
        bn_epsilon, bn_momentum: of every BatchNormalization (Keras' MobileNetV2: 1e-3, 0.999).

    Cannot: depth multipliers other than 1, kernels other than 3×3, or a residual over a
    strided block. Converting a "keras"-padded stride-2 block of unknown input size keeps its
    explicit pads (no reserved channel passes it, so that is exact).
    """

    def __init__(
        self,
        filters: int,
        *,
        expansion: int = 6,
        strides: int = 1,
        bottleneck_factor: int = 1,
        activation: str = "relu6",
        residual: bool | None = None,
        padding: str = "same",
        bn_epsilon: float = BN_EPSILON,
        bn_momentum: float = 0.9,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = _positive_int("filters", filters)
        self.expansion = _positive_int("expansion", expansion)
        if strides not in (1, 2) or isinstance(strides, bool):
            raise ValueError(f"`strides` must be one of (1, 2); got {strides!r}")
        self.strides = int(strides)
        self.bottleneck_factor = _positive_int("bottleneck_factor", bottleneck_factor)
        check_choice("activation", activation, ACTIVATIONS)
        self.activation = activation
        check_choice("residual", residual, (None, True, False))
        if residual and self.strides != 1:
            raise ValueError(
                f"`residual` must be None or False for a block with strides={strides}: the "
                "shortcut would need a projection"
            )
        self.residual = None if residual is None else bool(residual)
        check_choice("padding", padding, PADDINGS)
        self.padding = padding
        if (
            isinstance(bn_epsilon, bool)
            or not isinstance(bn_epsilon, int | float)
            or bn_epsilon <= 0
        ):
            raise ValueError(f"`bn_epsilon` must be a positive number; got {bn_epsilon!r}")
        if (
            isinstance(bn_momentum, bool)
            or not isinstance(bn_momentum, int | float)
            or not 0 <= bn_momentum < 1
        ):
            raise ValueError(f"`bn_momentum` must be a number in [0, 1); got {bn_momentum!r}")
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)

    # ----------------------------------------------------------------------------------- build
    @property
    def out_channels(self) -> int:
        return self.bottleneck_factor * self.filters

    def hidden_channels(self, c_in: int) -> int:
        """Channels of the depthwise convolution in the training form."""
        if self.expansion == 1:
            return c_in
        if c_in % self.bottleneck_factor:
            raise ValueError(
                f"{self.name}: input channels ({c_in}) must be a multiple of "
                f"`bottleneck_factor` ({self.bottleneck_factor}) when `expansion` > 1"
            )
        return self.expansion * c_in // self.bottleneck_factor

    def _bn(self, name):
        return keras.layers.BatchNormalization(
            momentum=self.bn_momentum, epsilon=self.bn_epsilon, name=name, dtype=self.dtype_policy
        )

    def build(self, input_shape):
        c_in = int(input_shape[-1])
        can_add = self.strides == 1 and c_in == self.out_channels
        if self.residual and not can_add:
            raise ValueError(
                f"{self.name}: `residual=True` needs an input of bottleneck_factor·filters = "
                f"{self.out_channels} channels; got {c_in}"
            )
        self.c_in = c_in
        self.has_residual = can_add if self.residual is None else bool(self.residual)
        self.hidden = hidden = self.hidden_channels(c_in)
        shape = tuple(input_shape)
        self.expand = self.expand_bn = self.pad = None
        if self.expansion != 1:
            self.expand = conv2d(hidden, 1, name="expand", dtype=self.dtype_policy)
            self.expand_bn = self._bn("expand_bn")
            self.expand.build(shape)
            shape = (*shape[:-1], hidden)
            self.expand_bn.build(shape)
        self.pads = None
        if self.strides == 2 and self.padding == "keras" and None in shape[1:3]:
            self.pads = keras_pads(shape[1:3])
            self.pad = keras.layers.ZeroPadding2D(self.pads, name="pad", dtype=self.dtype_policy)
            shape = self.pad.compute_output_shape(shape)
        self.depthwise = keras.layers.DepthwiseConv2D(
            3,
            strides=self.strides,
            padding="same" if self.pads is None else "valid",
            use_bias=False,
            depthwise_initializer="he_normal",
            name="depthwise",
            dtype=self.dtype_policy,
        )
        self.depthwise_bn = self._bn("depthwise_bn")
        self.depthwise.build(shape)
        shape = self.depthwise.compute_output_shape(shape)
        self.depthwise_bn.build(shape)
        self.project = conv2d(self.out_channels, 1, name="project", dtype=self.dtype_policy)
        self.project_bn = self._bn("project_bn")
        self.project.build(shape)
        self.project_bn.build((*shape[:-1], self.out_channels))
        self.built = True

    # ------------------------------------------------------------------------------------ call
    def _act(self, x):
        return ops.relu6(x) if self.activation == "relu6" else ops.relu(x)

    def call(self, x, training=None):
        h = x
        if self.expand is not None:
            h = self._act(self.expand_bn(self.expand(h), training=training))
        if self.pad is not None:
            h = self.pad(h)
        h = self._act(self.depthwise_bn(self.depthwise(h), training=training))
        y = self.project_bn(self.project(h), training=training)
        if not self.has_residual:
            return y
        c = self.filters
        if self.bottleneck_factor == 1:
            return y + x
        return ops.concatenate([y[..., :c] + x[..., :c], y[..., c:]], axis=-1)

    def compute_output_shape(self, input_shape):
        h, w = input_shape[1:3]
        if self.strides != 1:
            h, w = (rm.same_output_size(n, self.strides) for n in (h, w))
        return (input_shape[0], h, w, self.out_channels)

    # --------------------------------------------------------------------------- RM operation
    def plain_ops(self, ctx):
        """This block as plain convolutions (float64): the three ConvBNs as they are without a
        residual; with one, the RM operation (``reserve_and_merge`` with a partial-identity
        skip, no activation after the add)."""

        eps = self.bn_epsilon
        cap = RELU6_CAP if self.activation == "relu6" else np.inf
        branch = []
        if self.expand is not None:
            branch.append(
                rm.conv_bn_op(
                    self.expand.get_weights()[0],
                    bn_weights(self.expand_bn),
                    epsilon=eps,
                    act=rm.Act.relu(self.hidden, cap),
                    name=f"{self.name}_expand",
                )
            )
        branch.append(
            rm.conv_bn_op(
                rm.depthwise_kernel(self.depthwise.get_weights()[0]),
                bn_weights(self.depthwise_bn),
                epsilon=eps,
                strides=self.strides,
                groups=self.hidden,
                act=rm.Act.relu(self.hidden, cap),
                padding="same" if self.pads is None else self.pads,
                name=f"{self.name}_depthwise",
            )
        )
        branch.append(
            rm.conv_bn_op(
                self.project.get_weights()[0],
                bn_weights(self.project_bn),
                epsilon=eps,
                name=f"{self.name}_project",
            )
        )
        if not self.has_residual:
            return branch
        # The shortcut: the first C input channels onto the first C outputs.
        matrix = kernels.partial_identity(self.c_in, self.out_channels, self.filters)
        skip = rm.ConvOp(
            matrix[None, None], np.zeros(self.out_channels), name=f"{self.name}_shortcut"
        )
        return rm.reserve_and_merge(
            branch,
            skip,
            post=None,
            input_nonnegative=ctx.input_nonnegative,
            input_hw=ctx.input_hw,
            method=ctx.downsample,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "expansion": self.expansion,
            "strides": self.strides,
            "bottleneck_factor": self.bottleneck_factor,
            "activation": self.activation,
            "residual": self.residual,
            "padding": self.padding,
            "bn_epsilon": self.bn_epsilon,
            "bn_momentum": self.bn_momentum,
        }
