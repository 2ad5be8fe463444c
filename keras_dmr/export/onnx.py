"""ONNX export through tf2onnx, with the SavedModel's input and output names."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import keras

from keras_dmr.export.serving import (
    INPUT_NAME,
    OUTPUT_NAMES,
    ExportError,
    check_class_names,
    check_writable,
    metadata,
    prepare,
    serving_function,
)
from keras_dmr.layers.conv import split_grouped_convolutions
from keras_dmr.utils.files import atomic_output


def onnx(
    model: keras.Model,
    path: str | Path,
    *,
    preprocessing,
    opset: int = 17,
    plain: bool = True,
    class_names: Sequence[str] | None = None,
    tolerance: float = 1e-4,
    overwrite: bool = False,
) -> str:
    """Export ``model`` as an ONNX file (dynamic batch) and return its path.

    The graph is the SavedModel's serving function, so input ``images`` and outputs ``logits``,
    ``probabilities`` and ``classes`` mean the same (see :func:`keras_dmr.export.saved_model` for
    ``preprocessing`` and ``plain``); the metadata JSON is stored in the model's
    ``metadata_props`` under ``keras_dmr``. Written to a temporary file and renamed at the end.
    """
    import onnx as onnx_lib
    import tensorflow as tf
    import tf2onnx

    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"`path` must end in .onnx; got {str(path)!r}")
    check_writable(path.parent)
    if path.is_dir():
        raise ExportError(f"`path` {path} is a directory; give a file path ending in .onnx")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists; pass overwrite=True to replace it")
    if not isinstance(opset, int) or not 13 <= opset <= 18:
        raise ExportError(f"`opset` must be an integer in 13..18 (tf2onnx 1.17); got {opset!r}")
    source, exported, logits_model, conversion = prepare(model, plain=plain, tolerance=tolerance)
    check_class_names(class_names, logits_model.outputs[0].shape[-1])
    serve, norm = serving_function(logits_model, preprocessing)
    spec = serve.input_signature
    with split_grouped_convolutions():  # standard ops, whatever this machine's kernels
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset)
    _rename_io(proto)
    info = metadata(source, exported, conversion, norm, class_names, fmt="onnx")
    info["opset"] = opset
    entry = proto.metadata_props.add()
    entry.key, entry.value = "keras_dmr", json.dumps(info)
    onnx_lib.checker.check_model(proto)
    with atomic_output(path) as tmp:  # a plain file's permissions, as SavedModel files get
        onnx_lib.save(proto, str(tmp))
    del tf
    return str(path)


def _rename_io(proto) -> None:
    """tf2onnx names tensors after graph ops (``images:0``, ``Identity:0``); give the graph's
    inputs and outputs the serving names, in the order the serving function returns them."""
    graph = proto.graph
    renames = {graph.input[0].name: INPUT_NAME}
    outputs = sorted(graph.output, key=lambda o: o.name)
    for out, name in zip(outputs, sorted(OUTPUT_NAMES), strict=True):
        renames[out.name] = name
    for value in [*graph.input, *graph.output]:
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
