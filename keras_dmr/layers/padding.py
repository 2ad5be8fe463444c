"""Spatial padding with a constant other than zero (``-inf`` before a max pool)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_dmr")
class ConstantPadding2D(keras.layers.Layer):
    """Pads height and width with ``value``: ``padding`` is ``((top, bottom), (left, right))``.

    The converter emits it where a source model pads with ``keras.ops.pad(...,
    constant_values=-inf)`` before a max pool (KerasHub's ResNet v2 stem), which
    ``ZeroPadding2D`` cannot express. Channels-last only.
    """

    def __init__(self, padding, value: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        (top, bottom), (left, right) = padding
        self.padding = ((int(top), int(bottom)), (int(left), int(right)))
        if min(top, bottom, left, right) < 0:
            raise ValueError(f"`padding` must be non-negative; got {padding}")
        self.value = float(value)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"{self.name}: expects (batch, height, width, channels) inputs")
        self.built = True

    def call(self, x):
        (top, bottom), (left, right) = self.padding
        return ops.pad(
            x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=self.value
        )

    def compute_output_shape(self, input_shape):
        (top, bottom), (left, right) = self.padding
        batch, h, w, c = input_shape
        return (
            batch,
            None if h is None else h + top + bottom,
            None if w is None else w + left + right,
            c,
        )

    def get_config(self):
        return {**super().get_config(), "padding": self.padding, "value": self.value}
