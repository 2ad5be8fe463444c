"""Residual models rewritten as plain Conv→ReLU networks (the RM operation)."""

from keras_dmr.convert.keras_applications import from_keras_application
from keras_dmr.convert.plain import compare, output_names, plain_ops, to_plain
from keras_dmr.convert.randomize import randomize
from keras_dmr.convert.recalibrate import recalibrate_bn, reestimate_bn
from keras_dmr.convert.unfold import unfold
from keras_dmr.errors import ConversionError

__all__ = [
    "ConversionError",
    "compare",
    "from_keras_application",
    "output_names",
    "plain_ops",
    "randomize",
    "recalibrate_bn",
    "reestimate_bn",
    "to_plain",
    "unfold",
]
