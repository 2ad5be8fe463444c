"""Deployment: TF Serving SavedModels, ONNX, LiteRT and OpenVINO IR files of plain models,
float or int8."""

from keras_dmr.export.litert import litert
from keras_dmr.export.onnx import onnx
from keras_dmr.export.openvino import openvino
from keras_dmr.export.readers import read_metadata
from keras_dmr.export.saved_model import check_no_xla, saved_model
from keras_dmr.export.serving import ExportError

__all__ = [
    "ExportError",
    "check_no_xla",
    "litert",
    "onnx",
    "openvino",
    "read_metadata",
    "saved_model",
]
