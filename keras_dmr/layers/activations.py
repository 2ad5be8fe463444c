"""Per-channel activation for plain models whose reserved channels must pass unclipped."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


@keras.saving.register_keras_serializable(package="keras_dmr")
class ChannelwiseReLU(keras.layers.Layer):
    """``y = negative_slope·x`` for ``x < 0``, else ``min(x, max_value)``, per channel.

    A ReLU6 network converted by RM keeps the cap at 6 on its own channels while reserved
    channels pass unclipped (cap ∞, and slope 1 where the reserved signal is signed). Elementwise,
    so the model stays plain. Both vectors are fixed weights, not trained.
    """

    def __init__(self, negative_slope, max_value, **kwargs):
        super().__init__(**kwargs)
        self.negative_slope = [float(v) for v in np.ravel(negative_slope)]
        self.max_value = [float(v) for v in np.ravel(max_value)]
        if len(self.negative_slope) != len(self.max_value):
            raise ValueError(
                "`negative_slope` and `max_value` must have one entry per channel; got "
                f"{len(self.negative_slope)} and {len(self.max_value)}"
            )

    def build(self, input_shape):
        if input_shape[-1] != len(self.negative_slope):
            raise ValueError(
                f"{self.name}: input has {input_shape[-1]} channels, the layer "
                f"{len(self.negative_slope)}"
            )
        self.built = True

    def call(self, x):
        slope = ops.convert_to_tensor(np.asarray(self.negative_slope, "float32"), x.dtype)
        cap = ops.convert_to_tensor(np.asarray(self.max_value, "float32"), x.dtype)
        return ops.where(x < 0, x * slope, ops.minimum(x, cap))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "negative_slope": self.negative_slope,
            "max_value": self.max_value,
        }
