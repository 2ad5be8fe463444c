"""Convolutions and dense layers that compute with fake-quantized weights and inputs, for
quantization-aware fine-tuning (:mod:`keras_dmr.training.qat`).

Each layer rounds its kernel per output channel to a symmetric ``weight_bits`` grid (scale: the
channel's largest magnitude) and its input per tensor to an asymmetric 8-bit grid over the input's
range, tracked during training as a moving average of batch minima and maxima (the first batch
sets it; zero always representable), as the post-training quantizers of ONNX Runtime (QDQ, 7-bit
weights), LiteRT and OpenVINO (8-bit) then quantize the exported model. The rounding passes
gradients straight through. In inference the stored range is used and nothing is updated.

What it cannot do: it simulates the quantizers, not their exact ranges (the exporters calibrate
their own from the calibration images, per tensor MinMax), and it does not model the
output-side quantization of a layer (the next layer's input quantization stands for it).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_dmr.layers.conv import GroupedConv2D

# The smallest scale a grid may take (an all-zero channel or a constant input).
_EPS = 1e-8


def symmetric_fake_quant(w, axes, bits: int):
    """``w`` rounded to a symmetric ``bits`` grid per slice (the max |w| over ``axes`` maps to
    the largest level, ``2**(bits-1) - 1``), with straight-through gradients."""
    levels = float(2 ** (bits - 1) - 1)
    scale = ops.maximum(ops.max(ops.abs(w), axis=axes, keepdims=True) / levels, _EPS)
    rounded = ops.clip(ops.round(w / scale), -levels, levels) * scale
    return w + ops.stop_gradient(rounded - w)


def asymmetric_fake_quant(x, low, high, bits: int):
    """``x`` rounded to an asymmetric ``bits`` grid over ``[min(low, 0), max(high, 0)]``, values
    outside clipped, with straight-through gradients."""
    top = float(2**bits - 1)
    low, high = ops.minimum(low, 0.0), ops.maximum(high, 0.0)
    scale = ops.maximum((high - low) / top, _EPS)
    zero = ops.round(-low / scale)
    rounded = (ops.clip(ops.round(x / scale) + zero, 0.0, top) - zero) * scale
    return x + ops.stop_gradient(rounded - x)


class _FakeQuant:
    """What the three layers share: the input range, its update and both roundings."""

    # the kernel axes reduced to one scale per output channel
    kernel_axes: tuple[int, ...] = ()

    def __init__(self, *args, weight_bits=8, activation_bits=8, momentum=0.99, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self, "data_format", "channels_last") != "channels_last":
            raise ValueError(f"{type(self).__name__} takes channels_last inputs only")
        self._init_fake_quant(weight_bits, activation_bits, momentum)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_range()

    def get_config(self):
        return {**super().get_config(), **self._fake_quant_config()}

    def _init_fake_quant(self, weight_bits: int, activation_bits: int, momentum: float):
        if not (isinstance(weight_bits, int) and 2 <= weight_bits <= 8):
            raise ValueError(f"`weight_bits` must be an integer in 2..8; got {weight_bits!r}")
        if not (isinstance(activation_bits, int) and 2 <= activation_bits <= 8):
            raise ValueError(
                f"`activation_bits` must be an integer in 2..8; got {activation_bits!r}"
            )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1); got {momentum!r}")
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.momentum = float(momentum)

    def _build_range(self):
        self.input_range = self.add_weight(
            name="input_range", shape=(2,), initializer="zeros", trainable=False
        )
        self.range_seen = self.add_weight(
            name="range_seen", shape=(), initializer="zeros", trainable=False
        )

    def _quantize_input(self, inputs, training):
        x = ops.cast(inputs, "float32")
        stored = ops.cast(self.input_range, "float32")
        if training:
            batch = ops.stack([ops.min(x), ops.max(x)])
            seen = ops.cast(self.range_seen > 0, "float32")
            blended = self.momentum * stored + (1.0 - self.momentum) * batch
            stored = seen * blended + (1.0 - seen) * batch
            self.input_range.assign(ops.cast(stored, self.input_range.dtype))
            self.range_seen.assign(ops.ones((), self.range_seen.dtype))
        low, high = stored[0], stored[1]
        quantized = asymmetric_fake_quant(x, low, high, self.activation_bits)
        return ops.cast(quantized, self.compute_dtype)

    def _quantized_kernel(self):
        kernel = ops.cast(self.kernel, "float32")
        return ops.cast(
            symmetric_fake_quant(kernel, self.kernel_axes, self.weight_bits), self.compute_dtype
        )

    def _finish(self, outputs):
        if self.use_bias:
            outputs = ops.add(outputs, self.bias)  # channels last: broadcasts on the last axis
        return self.activation(outputs) if self.activation is not None else outputs

    # Keras' Conv and Dense save their kernel and bias only (and their own quantization
    # modes); these layers save every variable they own, the input range included.
    def save_own_variables(self, store):
        if not self.built:
            return
        for i, variable in enumerate(self.weights):
            store[str(i)] = variable

    def load_own_variables(self, store):
        if not self.built:
            return
        if len(store.keys()) != len(self.weights):
            raise ValueError(
                f"layer {self.name!r} expected {len(self.weights)} variables "
                f"({[w.path for w in self.weights]}), the file has {len(store.keys())}"
            )
        for i, variable in enumerate(self.weights):
            variable.assign(store[str(i)])

    def _fake_quant_config(self) -> dict:
        return {
            "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits,
            "momentum": self.momentum,
        }


@keras.saving.register_keras_serializable(package="keras_dmr")
class FakeQuantConv2D(_FakeQuant, keras.layers.Conv2D):
    """A ``Conv2D`` (channels last) computing with its kernel rounded per output channel and its
    input rounded per tensor (module docstring); its weights are a ``Conv2D``'s plus the input
    range (two non-trainable weights)."""

    kernel_axes = (0, 1, 2)

    def call(self, inputs, training=None):
        x = self._quantize_input(inputs, training)
        return self._finish(self.convolution_op(x, self._quantized_kernel()))


@keras.saving.register_keras_serializable(package="keras_dmr")
class FakeQuantGroupedConv2D(FakeQuantConv2D, GroupedConv2D):
    """A :class:`~keras_dmr.layers.GroupedConv2D` with fake-quantized kernel (one scale per
    output channel, as the exporters quantize each group's convolution) and input (one range
    for the tensor all groups read)."""


@keras.saving.register_keras_serializable(package="keras_dmr")
class FakeQuantDepthwiseConv2D(_FakeQuant, keras.layers.DepthwiseConv2D):
    """A ``DepthwiseConv2D`` (channels last) with fake-quantized kernel (one scale per output
    channel: per input channel and multiplier) and input."""

    kernel_axes = (0, 1)

    def call(self, inputs, training=None):
        x = self._quantize_input(inputs, training)
        outputs = ops.depthwise_conv(
            x,
            self._quantized_kernel(),
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        return self._finish(outputs)


@keras.saving.register_keras_serializable(package="keras_dmr")
class FakeQuantDense(_FakeQuant, keras.layers.Dense):
    """A ``Dense`` layer with fake-quantized kernel (per output unit) and input."""

    kernel_axes = (0,)

    def call(self, inputs, training=None):
        x = self._quantize_input(inputs, training)
        return self._finish(ops.matmul(x, self._quantized_kernel()))


# Each layer the QAT rewrite replaces, and its fake-quantized counterpart.
FAKE_QUANT_LAYERS = {
    keras.layers.Conv2D: FakeQuantConv2D,
    GroupedConv2D: FakeQuantGroupedConv2D,
    keras.layers.DepthwiseConv2D: FakeQuantDepthwiseConv2D,
    keras.layers.Dense: FakeQuantDense,
}
