"""Deployment: TF Serving SavedModels and ONNX files of plain models."""

from keras_dmr.export.onnx import onnx
from keras_dmr.export.saved_model import check_no_xla, saved_model
from keras_dmr.export.serving import ExportError, read_metadata

__all__ = ["ExportError", "check_no_xla", "onnx", "read_metadata", "saved_model"]
