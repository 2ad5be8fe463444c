"""Convolution layers shared by every block, and the package's one backend-specific fast path."""

from __future__ import annotations

import contextlib
import functools

import keras
import numpy as np

# How GroupedConv2D traces on TensorFlow: None (natively where this machine runs it, else
# split), "split" or "native" (inside the contexts below).
_GROUPED_MODE: list[str | None] = [None]


@contextlib.contextmanager
def _grouped_mode(mode: str):
    previous = _GROUPED_MODE[0]
    _GROUPED_MODE[0] = mode
    try:
        yield
    finally:
        _GROUPED_MODE[0] = previous


def split_grouped_convolutions():
    """Within this context (while a function is traced), :class:`GroupedConv2D` emits one
    convolution per group and a concatenation: standard ops that every TensorFlow build runs.
    The exporters trace under it, so a SavedModel made on a machine with oneDNN still runs in a
    TF Serving build without it."""
    return _grouped_mode("split")


def native_grouped_convolutions():
    """Within this context :class:`GroupedConv2D` emits TensorFlow's own grouped ``conv2d``
    whatever this machine's kernels: for a graph that another converter reads and TensorFlow
    never runs (tf2onnx writes it as one ONNX ``Conv`` with ``group``, where the split form
    costs a ``Split``, a ``Concat`` and a layout ``Transpose`` per group)."""
    return _grouped_mode("native")


@functools.cache
def native_grouped_conv_works(dtype: str = "float32") -> bool:
    """Whether TensorFlow's own grouped ``conv2d`` runs here inside a graph in ``dtype``, forward
    with a bias and backward: with oneDNN it does; TensorFlow's Eigen CPU kernels (oneDNN off,
    the default on CPUs without AVX-512) refuse a fused grouped Conv2D+BiasAdd and a grouped
    filter gradient. oneDNN takes a dtype only where the CPU has instructions for it: a Xeon
    without AVX512-FP16 runs float32 grouped convolutions natively and leaves float16 ones
    (``mixed_float16``) to Eigen, hence one probe per dtype, once per process, on a tiny
    convolution, eagerly."""
    import tensorflow as tf

    # No tf.Variable: the probe may first run while a function is being traced (an exporter
    # saving a SavedModel), where creating one raises.
    with tf.init_scope():
        x = tf.ones((1, 4, 4, 4), dtype)
        kernel = tf.ones((3, 3, 2, 4), dtype)
        bias = tf.ones((4,), dtype)

        @tf.function
        def forward(x, kernel, bias):  # grappler rewrites it into a fused Conv2D+BiasAdd+Relu
            return tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias))

        @tf.function
        def backward(x, kernel):  # the grouped filter gradient, without a tape: init_scope
            return grouped_filter_gradient(x, kernel)  # pauses tapes (a tape's gradient: None)

        try:
            forward(x, kernel, bias)
            backward(x, kernel)
        except tf.errors.OpError:  # Unimplemented, InvalidArgument, NotFound (no kernel), ...
            return False
    return True


def grouped_filter_gradient(x, kernel):
    """The gradient of ``sum(conv2d(x, kernel))`` (stride 1, 'same') with respect to
    ``kernel``, by TensorFlow's own ``Conv2DBackpropFilter``, the op a tape would run: the probe
    of :func:`native_grouped_conv_works` runs under ``tf.init_scope``, where tapes record
    nothing."""
    import tensorflow as tf

    ones = tf.ones(tf.concat([tf.shape(x)[:3], tf.shape(kernel)[3:]], 0), x.dtype)
    return tf.raw_ops.Conv2DBackpropFilter(
        input=x,
        filter_sizes=tf.shape(kernel),
        out_backprop=ones,
        strides=[1, 1, 1, 1],
        padding="SAME",
    )


@keras.saving.register_keras_serializable(package="keras_dmr")
class GroupedConv2D(keras.layers.Conv2D):
    """``Conv2D`` whose grouped form runs on TensorFlow's native kernels.

    Keras routes every grouped convolution on the TensorFlow backend through an XLA-compiled
    function (keras-team/keras#18180): slower than TensorFlow's own grouped ``conv2d`` on CPU, an
    ``_XlaMustCompile`` function in exported SavedModels, and a graph tf2onnx cannot convert. With
    ``groups == 1`` or another backend this layer is exactly ``keras.layers.Conv2D``.

    Where TensorFlow's grouped kernel cannot run in a graph (its Eigen CPU kernels, when oneDNN
    is off: see :func:`native_grouped_conv_works`) the groups run as separate convolutions and
    are concatenated: the same function, standard ops everywhere, slower. The SavedModel and
    LiteRT exporters always trace this split form (:func:`split_grouped_convolutions`), the ONNX
    exporter always the native one (:func:`native_grouped_convolutions`, which tf2onnx writes as
    one grouped ``Conv``), so exported graphs do not depend on the exporting machine's kernels.
    """

    def convolution_op(self, inputs, kernel):
        if self.groups == 1 or keras.backend.backend() != "tensorflow":
            return super().convolution_op(inputs, kernel)
        import tensorflow as tf

        data_format = "NHWC" if self.data_format == "channels_last" else "NCHW"

        def conv(x, k):
            return tf.nn.conv2d(
                x,
                k,
                strides=self.strides,
                padding=self.padding.upper(),
                dilations=self.dilation_rate,
                data_format=data_format,
            )

        mode = _GROUPED_MODE[0]
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if mode == "native" or (mode is None and native_grouped_conv_works(dtype)):
            return conv(inputs, kernel)
        axis = -1 if data_format == "NHWC" else 1
        parts = tf.split(inputs, self.groups, axis=axis)
        kernels = tf.split(kernel, self.groups, axis=-1)
        return tf.concat([conv(x, k) for x, k in zip(parts, kernels, strict=True)], axis=axis)


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


def depthwise_conv2d(
    kernel_size: int, *, strides: int = 1, use_bias: bool = False, name=None, dtype=None
):
    return keras.layers.DepthwiseConv2D(
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=use_bias,
        depthwise_initializer="he_normal",
        name=name,
        dtype=dtype,
    )


BN_EPSILON = 1e-5


def batch_norm(name=None, epsilon: float = BN_EPSILON, dtype=None, gamma: float = 1.0):
    """BatchNorm with the papers' constants: momentum 0.9 (PyTorch's 0.1) and epsilon 1e-5;
    ``gamma`` is the initial scale."""
    return keras.layers.BatchNormalization(
        momentum=0.9,
        epsilon=epsilon,
        gamma_initializer=keras.initializers.Constant(gamma) if gamma != 1.0 else "ones",
        name=name,
        dtype=dtype,
    )


def bn_weights(bn: keras.layers.BatchNormalization) -> tuple[np.ndarray, ...]:
    """``(gamma, beta, moving_mean, moving_variance)`` of a channels-last BatchNormalization as
    float64 arrays, with ones for a BN built with ``scale=False`` and zeros for ``center=False``:
    the one place the package reads a BN's weights.

    Args:
        bn: a built ``keras.layers.BatchNormalization``.

    Returns:
        Four arrays of the BN's channel count.
    """
    mean = np.asarray(keras.ops.convert_to_numpy(bn.moving_mean), np.float64)
    var = np.asarray(keras.ops.convert_to_numpy(bn.moving_variance), np.float64)
    gamma = np.asarray(keras.ops.convert_to_numpy(bn.gamma), np.float64) if bn.scale else None
    beta = np.asarray(keras.ops.convert_to_numpy(bn.beta), np.float64) if bn.center else None
    return (
        np.ones_like(mean) if gamma is None else gamma,
        np.zeros_like(mean) if beta is None else beta,
        mean,
        var,
    )
