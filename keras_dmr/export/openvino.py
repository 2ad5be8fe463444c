"""OpenVINO IR (``.xml`` + ``.bin``) of the serving function, float32 or int8 (NNCF).

The IR is converted from the ONNX graph :func:`keras_dmr.export.onnx` writes, not from a
SavedModel: OpenVINO 2026.4's TensorFlow frontend mistranslates a strided 1×1 convolution of
the sum of two channel slices (DMRNet's merge-and-run projection: 13% relative error in the
logits of DMRNet-14, measured), and its ONNX frontend does not."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import keras

from keras_dmr.export.calibration import (
    accuracy_record,
    in_batches,
    quantization_inputs,
    quantization_metadata,
)
from keras_dmr.export.onnx import float_graph
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
)
from keras_dmr.utils.files import umask

QUANTIZE = (None, "int8")
RT_INFO_KEY = "keras_dmr"
ONNX_OPSET = 17  # of the graph OpenVINO's ONNX frontend converts


def openvino(
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
    """Export ``model`` as OpenVINO IR and return the ``.xml`` path (its weights beside it in
    the ``.bin`` of the same stem).

    The graph is the SavedModel's serving function (see :func:`keras_dmr.export.saved_model`
    for ``preprocessing``, ``plain`` and the outputs: a classifier's ``logits``,
    ``probabilities`` and ``classes``, or a backbone's named feature maps), as the ONNX
    exporter writes it (:func:`keras_dmr.export.onnx.float_graph`), converted by
    ``openvino.convert_model`` and saved uncompressed (float32 weights). The float32 IR is run
    in OpenVINO's runtime (``Core().compile_model``, CPU, float32 precision hint) on random
    images and must match the Keras model within ``tolerance`` (maximum relative error over
    every output), else :class:`ExportError`. The metadata JSON is stored in the IR's
    ``rt_info`` under ``keras_dmr`` (:func:`read_openvino_metadata`).

    ``quantize="int8"``: OpenVINO's own post-training quantization (NNCF's ``quantize``,
    its default mixed preset, calibrated on ``calibration``: up to 512 images in the export's
    input form); the input stays the same. ``evaluation`` (``(images, labels)`` batches of a
    classifier) measures the float32 and the int8 IR's accuracy in OpenVINO's runtime, stored
    in the metadata's ``quantization`` as the other exporters do.

    The two files are written to a hidden temporary directory beside ``path`` and renamed into
    place, the ``.bin`` first, so an ``.xml`` never points at a partial ``.bin``.

    Args:
        model: the Keras model to export (converted first with ``plain=True``).
        path: the ``.xml`` file to write.
        preprocessing: a dataset name, a ``(mean, std)`` pair or ``"none"``.
        quantize: ``None`` or ``"int8"``.
        calibration: images for int8 ranges.
        evaluation: ``(images, labels)`` batches to measure accuracy on.
        plain: convert a residual model with :func:`keras_dmr.to_plain` first.
        class_names: names of the classes, stored in the metadata.
        tolerance: maximum relative error of the conversion and of the IR's float32 outputs.
        overwrite: replace existing files.

    Returns:
        The ``.xml`` path written.
    """
    try:
        import openvino as ov
    except ImportError as err:
        raise ExportError(
            "the OpenVINO export needs the openvino package: pip install openvino"
        ) from err
    path = Path(path)
    check_file_destination(path, ".xml", overwrite)
    weights_path = path.with_suffix(".bin")
    if weights_path.exists() and not overwrite:
        raise ExportError(f"{weights_path} exists; pass overwrite=True to replace it")
    source, exported, head, conversion = prepare(model, plain=plain, tolerance=tolerance)
    check_class_names(class_names, head)
    if evaluation is not None:
        check_classifier(head, "`evaluation` (accuracy)")
    if quantize == "int8":
        try:
            import nncf
        except ImportError as err:
            raise ExportError("quantize='int8' for OpenVINO uses NNCF: pip install nncf") from err
    norm = resolve_preprocessing(preprocessing)
    shape = tuple(head.model.inputs[0].shape[1:])
    images, held_out = quantization_inputs(
        quantize, QUANTIZE, calibration, evaluation, shape, uint8=norm is not None
    )
    proto, head, _, serve = float_graph(head, preprocessing, ONNX_OPSET, tolerance)
    with tempfile.TemporaryDirectory(prefix="keras_dmr_ir_") as scratch:
        onnx_path = Path(scratch) / "float.onnx"
        onnx_path.write_bytes(proto.SerializeToString())
        ir = ov.convert_model(str(onnx_path))
    _name_outputs(ir, head.names)
    check_exported_outputs(
        lambda name: ir_predict(ir, name),
        serve,
        head,
        tolerance,
        norm is not None,
        "the OpenVINO IR",
    )
    info = metadata(source, exported, conversion, norm, class_names, fmt="openvino", head=head)
    info["openvino"] = ov.get_version()
    if quantize == "int8":
        float_ir = ir
        ir = nncf.quantize(ir, nncf.Dataset(list(in_batches(images, 1))), subset_size=len(images))
        runs = (None, None)
        if held_out is not None:
            runs = tuple(accuracy_record(ir_predict(m), held_out) for m in (float_ir, ir))
        info["quantization"] = quantization_metadata(
            mode="int8",
            engine="openvino",
            calibration=len(images),
            details={"quantizer": f"nncf {nncf.__version__}", "preset": "default"},
            float_run=runs[0],
            quant_run=runs[1],
        )
    elif held_out is not None:
        acc, _ = accuracy_record(ir_predict(ir), held_out)
        info["accuracy"] = {"float32": acc, "images": sum(len(y) for _, y in held_out)}
    ir.set_rt_info(json.dumps(info), [RT_INFO_KEY])
    _save(ov, ir, path)
    return str(path)


def _name_outputs(ir, names: Sequence[str]) -> None:
    """Give each output of the converted graph its serving name (the signature's keys; the
    converter may add its own tensor names beside them)."""
    by_name = {}
    for output in ir.outputs:
        for name in output.get_names():
            by_name[name.split(":")[0]] = output
    for name in names:
        if name not in by_name:
            raise ExportError(
                f"the OpenVINO converter left no output named {name!r} (it has {sorted(by_name)})"
            )
        by_name[name].get_tensor().set_names({name})
    ir.inputs[0].get_tensor().set_names({INPUT_NAME})


def ir_predict(ir, output: str = "logits", *, threads: int | None = None):
    """``predict(images) -> outputs[output]`` of an IR (an ``openvino.Model`` or an ``.xml``
    path) compiled for the CPU with float32 arithmetic (int8 layers stay int8)."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(
        ir if not isinstance(ir, str | Path) else str(ir), "CPU", config
    )
    request, port = compiled.create_infer_request(), compiled.output(output)
    return lambda images: request.infer({INPUT_NAME: images})[port]


def _save(ov, ir, path: Path) -> None:
    """Both files into a hidden directory beside ``path``, then renamed: ``.bin`` first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export.", suffix=".tmp", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        ov.save_model(ir, str(staged), compress_to_fp16=False)
        for suffix in (".bin", ".xml"):
            part = staged.with_suffix(suffix)
            os.chmod(part, 0o666 & ~umask())
            os.replace(part, path.with_suffix(suffix))


def read_openvino_metadata(path: Path) -> dict:
    """The ``keras_dmr`` metadata in an IR's ``rt_info``."""
    import openvino as ov

    ir = ov.Core().read_model(str(path))
    if not ir.has_rt_info([RT_INFO_KEY]):
        raise ExportError(f"{path} carries no keras_dmr metadata")
    return json.loads(ir.get_rt_info([RT_INFO_KEY]).astype(str))
