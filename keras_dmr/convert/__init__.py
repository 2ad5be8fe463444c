"""Residual models rewritten as plain Conv→ReLU networks (the RM operation)."""

from keras_dmr.convert.ops import ConversionError
from keras_dmr.convert.plain import compare, plain_ops, to_plain

__all__ = ["ConversionError", "compare", "plain_ops", "to_plain"]
