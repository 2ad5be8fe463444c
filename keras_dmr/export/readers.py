"""Reading back what an export carries: one entry point over the formats, each format owning its
reader (:mod:`keras_dmr.export.litert`, :mod:`~keras_dmr.export.onnx`,
:mod:`~keras_dmr.export.openvino`, :mod:`~keras_dmr.export.saved_model`), so no format module
imports another."""

from __future__ import annotations

from pathlib import Path

from keras_dmr.export.litert import read_litert_metadata
from keras_dmr.export.onnx import read_onnx_metadata
from keras_dmr.export.openvino import read_openvino_metadata
from keras_dmr.export.saved_model import read_saved_model_metadata


def read_metadata(path: str | Path) -> dict:
    """The ``keras_dmr`` metadata of an exported file or SavedModel version directory.

    Args:
        path: a ``.tflite``, ``.onnx`` or OpenVINO ``.xml`` file, or a SavedModel version
            directory.

    Returns:
        The metadata written at export (source, conversion, preprocessing, quantization).

    Raises:
        ExportError: the file or directory carries no keras_dmr metadata.
    """
    path = Path(path)
    if path.suffix == ".tflite":
        return read_litert_metadata(path)
    if path.suffix == ".onnx":
        return read_onnx_metadata(path)
    if path.suffix == ".xml":
        return read_openvino_metadata(path)
    return read_saved_model_metadata(path)
