"""Convolution layers shared by every block, and the package's one backend-specific fast path."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="keras_dmr")
class GroupedConv2D(keras.layers.Conv2D):
    """``Conv2D`` whose grouped form runs on TensorFlow's native kernel.

    Keras routes every grouped convolution on the TensorFlow backend through an XLA-compiled
    function (keras-team/keras#18180): slower than TensorFlow's own grouped ``conv2d`` on CPU, an
    ``_XlaMustCompile`` function in exported SavedModels, and a graph tf2onnx cannot convert. With
    ``groups == 1`` or another backend this layer is exactly ``keras.layers.Conv2D``.
    """

    def convolution_op(self, inputs, kernel):
        if self.groups == 1 or keras.backend.backend() != "tensorflow":
            return super().convolution_op(inputs, kernel)
        import tensorflow as tf

        return tf.nn.conv2d(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding.upper(),
            dilations=self.dilation_rate,
            data_format="NHWC" if self.data_format == "channels_last" else "NCHW",
        )


def conv2d(filters: int, kernel_size: int, *, strides: int = 1, groups: int = 1, name=None, **kw):
    """A bias-free, He-initialised, 'same'-padded convolution (BN follows it)."""
    return GroupedConv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        groups=groups,
        use_bias=kw.pop("use_bias", False),
        kernel_initializer=kw.pop("kernel_initializer", "he_normal"),
        name=name,
        **kw,
    )


def depthwise_conv2d(kernel_size: int, *, strides: int = 1, use_bias: bool = False, name=None):
    return keras.layers.DepthwiseConv2D(
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=use_bias,
        depthwise_initializer="he_normal",
        name=name,
    )


BN_EPSILON = 1e-5


def batch_norm(name=None, epsilon: float = BN_EPSILON):
    """BatchNorm with the papers' constants: momentum 0.9 (PyTorch's 0.1) and epsilon 1e-5."""
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=epsilon, name=name)
