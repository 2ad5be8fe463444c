"""LiteRT (TFLite) export through TensorFlow's converter: builtin ops only, float32, float16
or int8 (post-training, calibrated), with the exporters' input, outputs and metadata."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from keras_dmr.convert.streams import split_reserved_streams
from keras_dmr.export.calibration import (
    accuracy_record,
    in_batches,
    quantization_inputs,
    quantization_metadata,
)
from keras_dmr.export.serving import (
    INPUT_NAME,
    ExportError,
    check_class_names,
    check_classifier,
    check_exported_outputs,
    check_file_destination,
    metadata,
    prepare,
    resolve_preprocessing,
    serving_function,
    staged_saved_model,
)
from keras_dmr.utils.files import atomic_output
from keras_dmr.utils.native import native_output_to_log

QUANTIZE = (None, "float16", "int8")
METADATA_NAME = "keras_dmr"


def litert(
    model: keras.Model,
    path: str | Path,
    *,
    preprocessing,
    quantize: str | None = None,
    calibration=None,
    evaluation=None,
    plain: bool = True,
    class_names: Sequence[str] | None = None,
    tolerance: float = 1e-4,
    overwrite: bool = False,
) -> str:
    """Export ``model`` as a LiteRT flatbuffer (``.tflite``) and return its path.

    The signature ``serving_default`` takes ``images`` (uint8 0..255 with ``preprocessing``,
    float32 as the model expects without) of any batch size and returns ``logits``,
    ``probabilities`` and ``classes``, as the SavedModel does. Only builtin LiteRT operators are
    emitted (no Flex/TensorFlow ops, so the plain ``ai-edge-litert`` runtime runs it): grouped
    convolutions are written as one convolution per group. ``quantize``: ``None`` (float32),
    ``"float16"`` (weights) or ``"int8"`` (weights and activations, ranges calibrated on
    ``calibration``: up to 512 images in the export's input form, see
    :mod:`keras_dmr.export.calibration`; operators without an int8 kernel stay float).
    In int8, a plain model's activations that are ReLU on its own channels and identity on
    the reserved ones (slope-1 PReLU, slow in int8 LiteRT) are split into two convolutions
    first (:func:`keras_dmr.convert.streams.split_reserved_streams`, same outputs).
    ``evaluation`` (``(images, labels)`` batches in the same form) measures the float32 and the
    quantized file's accuracy with the LiteRT interpreter and stores both in the metadata, a
    JSON entry ``keras_dmr`` of the flatbuffer's metadata (:func:`read_metadata`). The exporter
    quantizes post-training (fine-tune through fake quantization first with
    :func:`keras_dmr.training.qat.fine_tune`); the input shape is fixed but for the batch.
    The float32 graph (converted apart when quantizing) runs in LiteRT's interpreter on random
    images and must match the Keras model within ``tolerance``, else :class:`ExportError` and
    no file.

    Args:
        model: the Keras model to export (converted first with ``plain=True``).
        path: the ``.tflite`` file to write.
        preprocessing: a dataset name, a ``(mean, std)`` pair or ``"none"`` (see
            :func:`keras_dmr.export.saved_model`).
        quantize: ``None``, ``"float16"`` or ``"int8"``.
        calibration: images for int8 ranges.
        evaluation: ``(images, labels)`` batches to measure accuracy on.
        plain: convert a residual model with :func:`keras_dmr.to_plain` first.
        class_names: names of the classes, stored in the metadata.
        tolerance: maximum relative error of the conversion and of the file's float32 outputs.
        overwrite: replace an existing file.

    Returns:
        The path written.
    """
    path = Path(path)
    check_file_destination(path, ".tflite", overwrite)
    source, exported, head, conversion = prepare(model, plain=plain, tolerance=tolerance)
    check_class_names(class_names, head)
    if evaluation is not None:
        check_classifier(head, "`evaluation` (accuracy)")
    streams = 0
    if quantize == "int8":  # XNNPACK has no int8 PReLU: the reserved channels as their own convs
        split, streams = split_reserved_streams(head.model)
        head = dataclasses.replace(head, model=split)
    norm = resolve_preprocessing(preprocessing)
    shape = tuple(head.model.inputs[0].shape[1:])
    images, held_out = quantization_inputs(
        quantize, QUANTIZE, calibration, evaluation, shape, uint8=norm is not None
    )

    name = head.model.name
    serve, _ = serving_function(head, preprocessing, check_shape=False)
    with staged_saved_model(serve, head.model) as saved:
        blob = _convert(saved, name, quantize, images)
        float_blob = blob if quantize is None else _convert(saved, name, None, None)
    check_exported_outputs(  # the converter's graph; a quantized file states its accuracy
        lambda output: interpreter_predict(float_blob, output),
        serve,
        head,
        tolerance,
        norm is not None,
        "the LiteRT file" if quantize is None else "the LiteRT file's float32 graph",
    )
    compare = quantize is not None and held_out is not None
    info = metadata(source, exported, conversion, norm, class_names, fmt="litert", head=head)
    if quantize is not None:
        float_run = quant_run = None
        if compare:
            float_run = accuracy_record(interpreter_predict(float_blob), held_out)
            quant_run = accuracy_record(interpreter_predict(blob), held_out)
        info["quantization"] = quantization_metadata(
            mode=quantize,
            engine="litert",
            calibration=0 if images is None else len(images),
            details={
                "converter": "tf.lite.TFLiteConverter",
                "supported_ops": "TFLITE_BUILTINS",
                "reserved_streams_split": streams,
            },
            float_run=float_run,
            quant_run=quant_run,
        )
    elif held_out is not None:
        acc, _ = accuracy_record(interpreter_predict(blob), held_out)
        info["accuracy"] = {"float32": acc, "images": sum(len(y) for _, y in held_out)}
    blob = _with_metadata(blob, info)
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(blob)
    return str(path)


def _convert(saved: str, name: str, quantize: str | None, images: np.ndarray | None) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved, ["serving_default"])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([b] for b in in_batches(images, 1))
    with native_output_to_log("litert-converter") as log:
        try:
            blob = converter.convert()
        except Exception as err:  # the converter raises ConverterError and others, with MLIR text
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:400]
            raise ExportError(
                f"model {name!r}: the LiteRT converter failed ({type(err).__name__}: "
                f"{first}); only builtin LiteRT operators are emitted, so a layer without one "
                f"cannot be exported (the converter's own output: {log})"
            ) from None
    non_builtin = [name for name in operator_names(blob) if name.startswith(("CUSTOM", "Flex"))]
    if non_builtin:
        raise ExportError(
            f"model {name!r}: the LiteRT file would need non-builtin operators "
            f"{sorted(set(non_builtin))}"
        )
    return blob


def operator_names(blob: bytes) -> list[str]:
    """The operator of every node of a flatbuffer: builtin names, ``CUSTOM:<code>`` else."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))
    codes = []
    for code in model.operatorCodes:
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        if builtin == schema.BuiltinOperator.CUSTOM:
            custom = code.customCode.decode() if code.customCode else "?"
            codes.append(f"CUSTOM:{custom}")
        else:
            codes.append(names.get(builtin, str(builtin)))
    return [codes[op.opcodeIndex] for graph in model.subgraphs for op in graph.operators]


def _with_metadata(blob: bytes, info: dict) -> bytes:
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(blob))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(info).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_litert_metadata(path: Path) -> dict:
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(path.read_bytes()))
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name == METADATA_NAME:
            return json.loads(bytes(model.buffers[entry.buffer].data).decode())
    raise ExportError(f"{path} carries no keras_dmr metadata")


def interpreter(blob_or_path, threads: int | None = None, *, delegate: bool = True):
    """A LiteRT interpreter of a flatbuffer (bytes) or file: ``ai-edge-litert``'s when it is
    installed, else TensorFlow's ``tf.lite.Interpreter``; ``delegate=False`` runs LiteRT's own
    kernels only (no XNNPACK)."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
        OpResolverType = tf.lite.experimental.OpResolverType  # noqa: N806
    kwargs = {"num_threads": threads} if threads else {}
    if not delegate:
        kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    if isinstance(blob_or_path, bytes | bytearray):
        return Interpreter(model_content=bytes(blob_or_path), **kwargs)
    return Interpreter(model_path=str(blob_or_path), **kwargs)


def interpreter_predict(blob_or_path, output: str = "logits", threads: int | None = None):
    """``predict(images) -> outputs[output]`` through the file's ``serving_default`` signature,
    resizing the batch as needed."""
    runner = interpreter(blob_or_path, threads).get_signature_runner("serving_default")

    def predict(images: np.ndarray) -> np.ndarray:
        return runner(**{INPUT_NAME: images})[output]

    return predict
